"""request-rate (open-loop) benchmark points: offered rate, arrival kind and achieved rate beside concurrency;
the rates a run measured

Existing points keep a NULL rate: closed-loop concurrency. The unique key of a point becomes two partial unique
indexes, one per kind of load, so a rate point never collides with a concurrency point (NULL is never equal to
NULL in a plain unique key).

Revision ID: 0008_rate
Revises: 0007_estimates
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0008_rate'
down_revision: str | None = '0007_estimates'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CLOSED = sa.text("rate IS NULL")
OPEN = sa.text("rate IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table('bench_runs') as batch:
        batch.add_column(sa.Column('rates_json', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
    with op.batch_alter_table('bench_points') as batch:
        batch.add_column(sa.Column('rate', sa.Float(), nullable=True))
        batch.add_column(sa.Column('arrival', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch.add_column(sa.Column('achieved_rate', sa.Float(), nullable=True))
        batch.drop_constraint('uq_bench_points_config', type_='unique')
    op.create_index('uq_bench_points_config', 'bench_points', ['run_id', 'model', 'num_ctx', 'concurrency', 'repeat'],
                    unique=True, sqlite_where=CLOSED, postgresql_where=CLOSED)
    op.create_index('uq_bench_points_rate', 'bench_points',
                    ['run_id', 'model', 'num_ctx', 'concurrency', 'rate', 'arrival', 'repeat'],
                    unique=True, sqlite_where=OPEN, postgresql_where=OPEN)


def downgrade() -> None:
    op.execute(sa.text("DELETE FROM bench_samples WHERE point_id IN (SELECT id FROM bench_points WHERE rate IS NOT "
                       "NULL)"))
    op.execute(sa.text("DELETE FROM bench_points WHERE rate IS NOT NULL"))  # the old schema cannot hold them
    op.drop_index('uq_bench_points_rate', table_name='bench_points')
    op.drop_index('uq_bench_points_config', table_name='bench_points')
    with op.batch_alter_table('bench_points') as batch:
        batch.drop_column('achieved_rate')
        batch.drop_column('arrival')
        batch.drop_column('rate')
        batch.create_unique_constraint('uq_bench_points_config',
                                       ['run_id', 'model', 'num_ctx', 'concurrency', 'repeat'])
    # not in batch mode: recreating bench_runs would break bench_points' foreign key (SQLite ≥ 3.35 drops columns)
    op.drop_column('bench_runs', 'rates_json')
