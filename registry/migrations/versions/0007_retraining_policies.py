"""retraining policies: per-adapter triggers (a period, new feedback) that queue a job
on the adapter's dataset, and the outcome of their last run

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 18:51:30.984901
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes  # autogenerate renders AutoString from it
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('retraining_policies',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('adapter_id', sa.Integer(), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('every_seconds', sa.Integer(), nullable=True),
    sa.Column('after_feedback', sa.Integer(), nullable=True),
    sa.Column('start_from', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('method', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('seed', sa.Integer(), nullable=False),
    sa.Column('hyperparameters', sa.JSON(), nullable=False),
    sa.Column('json_schema', sa.JSON(), nullable=True),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('next_run_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_run_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_feedback_seq', sa.Integer(), nullable=False),
    sa.Column('last_job', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True),
    sa.Column('last_dataset_version_id', sa.Integer(), nullable=True),
    sa.Column('last_outcome', sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], ),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], ),
    sa.ForeignKeyConstraint(['last_dataset_version_id'], ['dataset_versions.id'], ),
    sa.ForeignKeyConstraint(['last_job'], ['fine_tuning_jobs.id'], ),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('adapter_id')
    )
    with op.batch_alter_table('retraining_policies', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_retraining_policies_dataset_id'), ['dataset_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_retraining_policies_next_run_at'), ['next_run_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_retraining_policies_tenant_id'), ['tenant_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('retraining_policies', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_retraining_policies_tenant_id'))
        batch_op.drop_index(batch_op.f('ix_retraining_policies_next_run_at'))
        batch_op.drop_index(batch_op.f('ix_retraining_policies_dataset_id'))
    op.drop_table('retraining_policies')
