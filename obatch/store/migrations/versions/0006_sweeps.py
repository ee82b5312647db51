"""sweeps: benchmark sweeps run by the server, kept so a restart resumes them

Revision ID: 0006_sweeps
Revises: 0005_leases
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0006_sweeps'
down_revision: str | None = '0005_leases'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    text = sqlmodel.sql.sqltypes.AutoString()
    op.create_table('bench_sweeps',
    sa.Column('id', text, nullable=False),
    sa.Column('owner', text, nullable=True),
    sa.Column('status', text, nullable=False),
    sa.Column('params_json', text, nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('started_at', sa.Float(), nullable=True),
    sa.Column('finished_at', sa.Float(), nullable=True),
    sa.Column('points_done', sa.Integer(), nullable=False),
    sa.Column('points_total', sa.Integer(), nullable=False),
    sa.Column('current', text, nullable=True),
    sa.Column('run_id', text, nullable=True),
    sa.Column('backend', text, nullable=True),
    sa.Column('error', text, nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_bench_sweeps_owner'), 'bench_sweeps', ['owner'], unique=False)
    op.create_index(op.f('ix_bench_sweeps_status'), 'bench_sweeps', ['status'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_bench_sweeps_status'), table_name='bench_sweeps')
    op.drop_index(op.f('ix_bench_sweeps_owner'), table_name='bench_sweeps')
    op.drop_table('bench_sweeps')
