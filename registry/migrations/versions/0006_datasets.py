"""datasets: versioned datasets, their examples and sources; jobs name their dataset
version and the adapter version whose weights they start from; files can be deleted;
erasures record what deleting a file, a completion or a user's records reached

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 18:35:46.371191
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes  # autogenerate renders AutoString from it
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('dataset_examples',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('content', sa.Text(), nullable=True),
    sa.Column('erased_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('tenant_id', 'sha256')
    )
    with op.batch_alter_table('dataset_examples', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dataset_examples_tenant_id'), ['tenant_id'], unique=False)

    op.create_table('datasets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('description', sqlmodel.sql.sqltypes.AutoString(length=4096), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('tenant_id', 'name')
    )
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_datasets_tenant_id'), ['tenant_id'], unique=False)

    op.create_table('dataset_example_sources',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('example_id', sa.Integer(), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('ref', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('user', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=True),
    sa.ForeignKeyConstraint(['example_id'], ['dataset_examples.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('example_id', 'kind', 'ref')
    )
    with op.batch_alter_table('dataset_example_sources', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dataset_example_sources_example_id'), ['example_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_dataset_example_sources_ref'), ['ref'], unique=False)
        batch_op.create_index(batch_op.f('ix_dataset_example_sources_user'), ['user'], unique=False)

    op.create_table('dataset_versions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('parent_id', sa.Integer(), nullable=True),
    sa.Column('sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('method', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('example_count', sa.Integer(), nullable=False),
    sa.Column('added', sa.Integer(), nullable=False),
    sa.Column('removed', sa.Integer(), nullable=False),
    sa.Column('file_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('source', sa.JSON(), nullable=False),
    sa.Column('audit', sa.JSON(), nullable=True),
    sa.Column('created_by', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], ),
    sa.ForeignKeyConstraint(['file_id'], ['training_files.id'], ),
    sa.ForeignKeyConstraint(['parent_id'], ['dataset_versions.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('dataset_id', 'number')
    )
    with op.batch_alter_table('dataset_versions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dataset_versions_dataset_id'), ['dataset_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_dataset_versions_file_id'), ['file_id'], unique=False)

    op.create_table('dataset_version_examples',
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('example_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['example_id'], ['dataset_examples.id'], ),
    sa.ForeignKeyConstraint(['version_id'], ['dataset_versions.id'], ),
    sa.PrimaryKeyConstraint('version_id', 'position')
    )
    with op.batch_alter_table('dataset_version_examples', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dataset_version_examples_example_id'), ['example_id'], unique=False)

    op.create_table('erasures',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('subject', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('lineage', sa.JSON(), nullable=False),
    sa.Column('retrain_jobs', sa.JSON(), nullable=False),
    sa.Column('created_by', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('erasures', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_erasures_tenant_id'), ['tenant_id'], unique=False)

    with op.batch_alter_table('training_files', schema=None) as batch_op:
        batch_op.add_column(sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True))

    with op.batch_alter_table('fine_tuning_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('dataset_version_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('init_version_id', sa.Integer(), nullable=True))
        batch_op.create_foreign_key('fk_fine_tuning_jobs_init_version', 'adapter_versions', ['init_version_id'], ['id'])
        batch_op.create_foreign_key('fk_fine_tuning_jobs_dataset_version', 'dataset_versions', ['dataset_version_id'], ['id'])



def downgrade() -> None:
    with op.batch_alter_table('fine_tuning_jobs', schema=None) as batch_op:
        batch_op.drop_constraint('fk_fine_tuning_jobs_dataset_version', type_='foreignkey')
        batch_op.drop_constraint('fk_fine_tuning_jobs_init_version', type_='foreignkey')
        batch_op.drop_column('init_version_id')
        batch_op.drop_column('dataset_version_id')

    with op.batch_alter_table('training_files', schema=None) as batch_op:
        batch_op.drop_column('deleted_at')

    with op.batch_alter_table('erasures', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_erasures_tenant_id'))

    op.drop_table('erasures')

    with op.batch_alter_table('dataset_version_examples', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dataset_version_examples_example_id'))

    op.drop_table('dataset_version_examples')
    with op.batch_alter_table('dataset_versions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dataset_versions_file_id'))
        batch_op.drop_index(batch_op.f('ix_dataset_versions_dataset_id'))

    op.drop_table('dataset_versions')
    with op.batch_alter_table('dataset_example_sources', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dataset_example_sources_user'))
        batch_op.drop_index(batch_op.f('ix_dataset_example_sources_ref'))
        batch_op.drop_index(batch_op.f('ix_dataset_example_sources_example_id'))

    op.drop_table('dataset_example_sources')
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_datasets_tenant_id'))

    op.drop_table('datasets')
    with op.batch_alter_table('dataset_examples', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dataset_examples_tenant_id'))

    op.drop_table('dataset_examples')
