"""capture: tenants' capture settings, stored chat completions and their feedback

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 11:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('capture_settings',
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('store_by_default', sa.Boolean(), nullable=False),
    sa.Column('retention_days', sa.Integer(), nullable=False),
    sa.Column('max_body_bytes', sa.Integer(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ),
    sa.PrimaryKeyConstraint('tenant_id')
    )
    op.create_table('stored_completions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('completion_id', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('model', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('adapter', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('version', sa.Integer(), nullable=True),
    sa.Column('route', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('user', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=True),
    sa.Column('metadata', sa.JSON(), nullable=False),
    sa.Column('stream', sa.Boolean(), nullable=False),
    sa.Column('prompt_tokens', sa.Integer(), nullable=False),
    sa.Column('completion_tokens', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('body', sa.JSON(), nullable=True),
    sa.Column('body_blob', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=True),
    sa.Column('body_sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('body_bytes', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('tenant_id', 'completion_id')
    )
    with op.batch_alter_table('stored_completions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_stored_completions_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_stored_completions_tenant_id'), ['tenant_id'], unique=False)
    op.create_table('completion_feedback',
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('completion', sa.Integer(), nullable=False),
    sa.Column('completion_id', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('thumbs', sqlmodel.sql.sqltypes.AutoString(length=8), nullable=True),
    sa.Column('rating', sa.Integer(), nullable=True),
    sa.Column('correction', sa.Text(), nullable=True),
    sa.Column('note', sqlmodel.sql.sqltypes.AutoString(length=4096), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['completion'], ['stored_completions.id'], ),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('id')
    )
    with op.batch_alter_table('completion_feedback', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_completion_feedback_completion'), ['completion'], unique=False)
        batch_op.create_index(batch_op.f('ix_completion_feedback_tenant_id'), ['tenant_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('completion_feedback', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_completion_feedback_tenant_id'))
        batch_op.drop_index(batch_op.f('ix_completion_feedback_completion'))
    op.drop_table('completion_feedback')
    with op.batch_alter_table('stored_completions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_stored_completions_tenant_id'))
        batch_op.drop_index(batch_op.f('ix_stored_completions_created_at'))
    op.drop_table('stored_completions')
    op.drop_table('capture_settings')
