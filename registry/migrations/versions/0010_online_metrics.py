"""online metrics: per-version error and latency counters in the usage book

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 23:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Rows written before this revision counted no errors and no latency: zeros are right.
    with op.batch_alter_table('usage', schema=None) as batch_op:
        batch_op.add_column(sa.Column('errors', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(
            sa.Column('latency_seconds', sa.Float(), nullable=False, server_default='0')
        )
        batch_op.add_column(
            sa.Column('latency_count', sa.Integer(), nullable=False, server_default='0')
        )
        batch_op.add_column(sa.Column('latency_buckets', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('usage', schema=None) as batch_op:
        batch_op.drop_column('latency_buckets')
        batch_op.drop_column('latency_count')
        batch_op.drop_column('latency_seconds')
        batch_op.drop_column('errors')
