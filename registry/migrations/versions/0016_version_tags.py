"""version tags: free-form key=value tags on adapter versions (registry.version_tags)

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07 23:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0016'
down_revision: str | None = '0015'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('version_tags',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('value', sa.String(length=256), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['version_id'], ['adapter_versions.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('version_id', 'key')
    )
    with op.batch_alter_table('version_tags', schema=None) as batch_op:
        batch_op.create_index('ix_version_tags_key_value', ['key', 'value'], unique=False)
        batch_op.create_index(
            batch_op.f('ix_version_tags_version_id'), ['version_id'], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table('version_tags', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_version_tags_version_id'))
        batch_op.drop_index('ix_version_tags_key_value')
    op.drop_table('version_tags')
