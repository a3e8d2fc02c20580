"""base upgrades: an operation moving every adapter served on one base to another

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07 23:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0015'
down_revision: str | None = '0014'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _when(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table('base_upgrades',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('old_base_id', sa.Integer(), nullable=False),
    sa.Column('new_base_id', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('options', sa.JSON(), nullable=False),
    sa.Column('report', sa.JSON(), nullable=True),
    sa.Column('created_by', sa.String(length=256), nullable=False),
    _when('created_at'),
    _when('updated_at'),
    sa.ForeignKeyConstraint(['old_base_id'], ['base_models.id'], ),
    sa.ForeignKeyConstraint(['new_base_id'], ['base_models.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('base_upgrades', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_base_upgrades_old_base_id'), ['old_base_id'])
        batch_op.create_index(batch_op.f('ix_base_upgrades_state'), ['state'])
    op.create_table('base_upgrade_items',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('upgrade_id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('adapter_id', sa.Integer(), nullable=False),
    sa.Column('adapter', sa.String(length=128), nullable=False),
    sa.Column('old_version', sa.Integer(), nullable=False),
    sa.Column('old_version_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('metric', sa.String(length=64), nullable=True),
    sa.Column('eval_job', sa.String(length=40), nullable=True),
    sa.Column('retrain_job', sa.String(length=40), nullable=True),
    sa.Column('scores', sa.JSON(), nullable=False),
    sa.Column('new_version', sa.Integer(), nullable=True),
    _when('deadline', nullable=True),
    _when('canary_started_at', nullable=True),
    sa.Column('choice', sa.String(length=16), nullable=True),
    sa.Column('note', sa.String(length=2048), nullable=False),
    _when('updated_at'),
    sa.ForeignKeyConstraint(['upgrade_id'], ['base_upgrades.id'], ),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], ),
    sa.ForeignKeyConstraint(['old_version_id'], ['adapter_versions.id'], ),
    sa.ForeignKeyConstraint(['eval_job'], ['fine_tuning_jobs.id'], ),
    sa.ForeignKeyConstraint(['retrain_job'], ['fine_tuning_jobs.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('upgrade_id', 'adapter_id')
    )
    with op.batch_alter_table('base_upgrade_items', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_base_upgrade_items_upgrade_id'), ['upgrade_id'])
        batch_op.create_index(batch_op.f('ix_base_upgrade_items_tenant_id'), ['tenant_id'])


def downgrade() -> None:
    with op.batch_alter_table('base_upgrade_items', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_base_upgrade_items_tenant_id'))
        batch_op.drop_index(batch_op.f('ix_base_upgrade_items_upgrade_id'))
    op.drop_table('base_upgrade_items')
    with op.batch_alter_table('base_upgrades', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_base_upgrades_state'))
        batch_op.drop_index(batch_op.f('ix_base_upgrades_old_base_id'))
    op.drop_table('base_upgrades')
