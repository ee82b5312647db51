"""leases: one process drives a batch at a time; 64-bit timestamps, sizes and token sums on PostgreSQL

SQLite's INTEGER is 64 bits already; PostgreSQL's is 32, and the Unix time leaves it in 2038.

Revision ID: 0005_leases
Revises: 0004_concurrency
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0005_leases'
down_revision: str | None = '0004_concurrency'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


WIDE = {
    "files": ("bytes", "created_at", "expires_at"),
    "batches": ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
                "expired_at", "cancelling_at", "cancelled_at", "input_tokens", "output_tokens", "reasoning_tokens"),
}


def upgrade() -> None:
    op.create_table('leases',
    sa.Column('batch_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('owner', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('claimed_at', sa.Float(), nullable=False),
    sa.Column('heartbeat', sa.Float(), nullable=False),
    sa.Column('expires_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('batch_id')
    )
    if op.get_bind().dialect.name == "postgresql":
        for table, columns in WIDE.items():
            for column in columns:
                op.alter_column(table, column, type_=sa.BigInteger(), existing_type=sa.Integer())


def downgrade() -> None:
    op.drop_table('leases')
    if op.get_bind().dialect.name == "postgresql":
        for table, columns in WIDE.items():
            for column in columns:
                op.alter_column(table, column, type_=sa.Integer(), existing_type=sa.BigInteger())
