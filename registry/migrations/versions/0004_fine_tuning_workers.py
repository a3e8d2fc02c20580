"""fine_tuning_workers: which workers are alive, for which base

A job for a base no live worker trains for stays queued and says so in its events.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 11:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('fine_tuning_workers',
    sa.Column('worker_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('base_fingerprint', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('worker_id')
    )
    with op.batch_alter_table('fine_tuning_workers', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_fine_tuning_workers_base_fingerprint'), ['base_fingerprint'], unique=False)
        batch_op.create_index(batch_op.f('ix_fine_tuning_workers_seen_at'), ['seen_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('fine_tuning_workers', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_fine_tuning_workers_seen_at'))
        batch_op.drop_index(batch_op.f('ix_fine_tuning_workers_base_fingerprint'))
    op.drop_table('fine_tuning_workers')
