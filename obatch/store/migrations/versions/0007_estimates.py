"""estimates: pilot lines run ahead of their batch, and the live remaining-time estimate of a running batch

Revision ID: 0007_estimates
Revises: 0006_sweeps
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0007_estimates'
down_revision: str | None = '0006_sweeps'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('pilots',
    sa.Column('file_sha256', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('custom_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('body_sha256', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('model', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('url', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('max_tokens', sa.Integer(), nullable=True),
    sa.Column('completion_tokens', sa.Integer(), nullable=True),
    sa.Column('finish_reason', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('latency_ms', sa.Float(), nullable=True),
    sa.Column('concurrency', sa.Integer(), nullable=True),
    sa.Column('result_json', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('used_by', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.PrimaryKeyConstraint('file_sha256', 'custom_id')
    )
    with op.batch_alter_table('batches') as batch:
        batch.add_column(sa.Column('eta_json', sqlmodel.sql.sqltypes.AutoString(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('batches') as batch:
        batch.drop_column('eta_json')
    op.drop_table('pilots')
