"""lifecycle event webhooks: subscriptions and deliveries

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 21:15:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0012'
down_revision: str | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _when(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table('webhook_subscriptions',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('url', sa.String(length=2048), nullable=False),
    sa.Column('event_types', sa.JSON(), nullable=False),
    sa.Column('description', sa.String(length=256), nullable=False),
    sa.Column('secret', sa.String(length=128), nullable=False),
    sa.Column('previous_secret', sa.String(length=128), nullable=True),
    _when('previous_expires_at', nullable=True),
    sa.Column('cursor', sa.Integer(), nullable=False),
    _when('created_at'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('webhook_subscriptions', schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f('ix_webhook_subscriptions_tenant_id'), ['tenant_id'], unique=False
        )
    op.create_table('webhook_deliveries',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('subscription_id', sa.String(length=40), nullable=False),
    sa.Column('event_id', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    _when('next_attempt_at'),
    sa.Column('lease_owner', sa.String(length=128), nullable=True),
    _when('lease_expires_at', nullable=True),
    sa.Column('last_status', sa.Integer(), nullable=True),
    sa.Column('last_error', sa.String(length=512), nullable=True),
    _when('created_at'),
    _when('delivered_at', nullable=True),
    sa.ForeignKeyConstraint(['event_id'], ['audit_events.id'], ),
    sa.ForeignKeyConstraint(['subscription_id'], ['webhook_subscriptions.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('subscription_id', 'event_id')
    )
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        for column in ('next_attempt_at', 'state', 'subscription_id'):
            batch_op.create_index(
                batch_op.f(f'ix_webhook_deliveries_{column}'), [column], unique=False
            )


def downgrade() -> None:
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        for column in ('next_attempt_at', 'state', 'subscription_id'):
            batch_op.drop_index(batch_op.f(f'ix_webhook_deliveries_{column}'))
    op.drop_table('webhook_deliveries')
    with op.batch_alter_table('webhook_subscriptions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_webhook_subscriptions_tenant_id'))
    op.drop_table('webhook_subscriptions')
