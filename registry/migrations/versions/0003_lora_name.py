"""adapter_versions.engine_name renamed lora_name

"engine" now means a vLLM replica only; the per-version name engines load an
adapter under is its LoRA name. The column is renamed in place, so every
existing row keeps its value and stays servable under the same name.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 17:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The index is dropped and made outside the batch: SQLite's batch mode copies the table
    # and would look for the index's column under its new name before the rename.
    op.drop_index('ix_adapter_versions_engine_name', table_name='adapter_versions')
    with op.batch_alter_table('adapter_versions', schema=None) as batch_op:
        batch_op.alter_column('engine_name', new_column_name='lora_name')
    op.create_index('ix_adapter_versions_lora_name', 'adapter_versions', ['lora_name'])


def downgrade() -> None:
    op.drop_index('ix_adapter_versions_lora_name', table_name='adapter_versions')
    with op.batch_alter_table('adapter_versions', schema=None) as batch_op:
        batch_op.alter_column('lora_name', new_column_name='engine_name')
    op.create_index('ix_adapter_versions_engine_name', 'adapter_versions', ['engine_name'])
