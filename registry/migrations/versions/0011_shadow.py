"""shadow traffic: results of candidate versions answering copies of production requests

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04 23:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COUNTS = (
    'compared',
    'agreed',
    'json_checked',
    'json_valid',
    'failed',
    'prompt_tokens',
    'completion_tokens',
)


def upgrade() -> None:
    op.create_table('shadow_results',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('candidate_version_id', sa.Integer(), nullable=False),
    sa.Column('production_version_id', sa.Integer(), nullable=False),
    *(sa.Column(name, sa.Integer(), nullable=False) for name in _COUNTS),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['candidate_version_id'], ['adapter_versions.id'], ),
    sa.ForeignKeyConstraint(['production_version_id'], ['adapter_versions.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('candidate_version_id', 'production_version_id')
    )
    with op.batch_alter_table('shadow_results', schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f('ix_shadow_results_candidate_version_id'),
            ['candidate_version_id'],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table('shadow_results', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_shadow_results_candidate_version_id'))
    op.drop_table('shadow_results')
