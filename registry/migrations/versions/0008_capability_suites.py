"""capability suites: a generic regression set registered with a base, its reference scores, and the gate margin below the base

Also a fine-tuning job's ``answer_regex`` (its task suite's regex check).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 23:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes  # autogenerate renders AutoString from it
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('capability_suites',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('base_id', sa.Integer(), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('examples', sa.JSON(), nullable=False),
    sa.Column('examples_sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('created_by', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['base_id'], ['base_models.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('base_id', 'name')
    )
    with op.batch_alter_table('capability_suites', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_capability_suites_base_id'), ['base_id'], unique=False)

    op.create_table('capability_references',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('suite_id', sa.Integer(), nullable=False),
    sa.Column('examples_sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('sample_count', sa.Integer(), nullable=False),
    sa.Column('details', sa.JSON(), nullable=False),
    sa.Column('created_by', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['suite_id'], ['capability_suites.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('suite_id')
    )

    with op.batch_alter_table('promotion_gates', schema=None) as batch_op:
        batch_op.add_column(sa.Column('max_below_base', sa.Float(), nullable=True))

    with op.batch_alter_table('fine_tuning_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('answer_regex', sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('fine_tuning_jobs', schema=None) as batch_op:
        batch_op.drop_column('answer_regex')

    with op.batch_alter_table('promotion_gates', schema=None) as batch_op:
        batch_op.drop_column('max_below_base')

    op.drop_table('capability_references')
    with op.batch_alter_table('capability_suites', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_capability_suites_base_id'))
    op.drop_table('capability_suites')
