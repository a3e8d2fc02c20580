"""drift: prompt sketches of training datasets and live traffic per adapter

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 23:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('drift_references',
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('prompts', sa.Integer(), nullable=False),
    sa.Column('sketch', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['version_id'], ['adapter_versions.id'], ),
    sa.PrimaryKeyConstraint('version_id')
    )
    op.create_table('drift_live',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('adapter', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('day', sa.Date(), nullable=False),
    sa.Column('prompts', sa.Integer(), nullable=False),
    sa.Column('sketch', sa.JSON(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('tenant_id', 'adapter', 'day')
    )
    with op.batch_alter_table('drift_live', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_drift_live_tenant_id'), ['tenant_id'], unique=False)
    op.create_table('drift_states',
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('adapter', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('score', sa.Float(), nullable=True),
    sa.Column('over', sa.Boolean(), nullable=False),
    sa.Column('changed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('checked_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ),
    sa.PrimaryKeyConstraint('tenant_id', 'adapter')
    )


def downgrade() -> None:
    op.drop_table('drift_states')
    with op.batch_alter_table('drift_live', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_drift_live_tenant_id'))
    op.drop_table('drift_live')
    op.drop_table('drift_references')
