"""routed models: versions of their routing policies, routing evals, live-version history

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 23:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0013'
down_revision: str | None = '0012'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_INDEXED = (
    ('routed_models', 'tenant_id'),
    ('routed_model_versions', 'routed_model_id'),
    ('routed_model_evals', 'version_id'),
    ('routed_model_history', 'routed_model_id'),
)


def _when(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _actor(name: str) -> sa.Column:
    return sa.Column(name, sa.String(length=256), nullable=False)


def upgrade() -> None:
    op.create_table('routed_models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('tombstone', sa.Integer(), nullable=False),
    sa.Column('live_version', sa.Integer(), nullable=True),
    sa.Column('gates', sa.JSON(), nullable=False),
    _when('created_at'),
    _when('deleted_at', nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('tenant_id', 'name', 'tombstone')
    )
    op.create_table('routed_model_versions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('routed_model_id', sa.Integer(), nullable=False),
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('policy', sa.JSON(), nullable=False),
    sa.Column('references', sa.JSON(), nullable=False),
    sa.Column('description', sa.String(length=4096), nullable=False),
    _actor('created_by'),
    _when('created_at'),
    sa.ForeignKeyConstraint(['routed_model_id'], ['routed_models.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('routed_model_id', 'number')
    )
    op.create_table('routed_model_evals',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('suite', sa.String(length=128), nullable=False),
    sa.Column('accuracy', sa.Float(), nullable=False),
    sa.Column('examples', sa.Integer(), nullable=False),
    sa.Column('confusion', sa.JSON(), nullable=False),
    _actor('created_by'),
    _when('created_at'),
    sa.ForeignKeyConstraint(['version_id'], ['routed_model_versions.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('routed_model_history',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('routed_model_id', sa.Integer(), nullable=False),
    sa.Column('action', sa.String(length=32), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=True),
    sa.Column('previous_version_id', sa.Integer(), nullable=True),
    sa.Column('undone', sa.Boolean(), nullable=False),
    _actor('actor'),
    _when('created_at'),
    sa.ForeignKeyConstraint(['previous_version_id'], ['routed_model_versions.id'], ),
    sa.ForeignKeyConstraint(['routed_model_id'], ['routed_models.id'], ),
    sa.ForeignKeyConstraint(['version_id'], ['routed_model_versions.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    for table, column in _INDEXED:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.create_index(batch_op.f(f'ix_{table}_{column}'), [column], unique=False)


def downgrade() -> None:
    for table, column in reversed(_INDEXED):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(batch_op.f(f'ix_{table}_{column}'))
    for table in ('routed_model_history', 'routed_model_evals', 'routed_model_versions',
                  'routed_models'):
        op.drop_table(table)
