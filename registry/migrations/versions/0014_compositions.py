"""compositions: a version made from other versions records its recipe

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 23:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0014'
down_revision: str | None = '0013'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NULL for every version written before: none of them was composed.
    with op.batch_alter_table('adapter_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('composition', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('adapter_versions', schema=None) as batch_op:
        batch_op.drop_column('composition')
