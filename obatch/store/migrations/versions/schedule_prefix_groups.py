"""prefix groups and schedules: each request row's prompt-prefix key and the num_ctx it sets itself, a batch's
schedule and what it found

Rows imported before keep NULLs (no group, no context of their own: they run as ungrouped lines).

Revision ID: schedule_prefix_groups
Revises: 0008_rate
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = 'schedule_prefix_groups'
down_revision: str | None = "provenance_0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('requests') as batch:
        batch.add_column(sa.Column('prefix_key', sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column('own_num_ctx', sa.Integer(), nullable=True))
    with op.batch_alter_table('batches') as batch:
        batch.add_column(sa.Column('schedule', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch.add_column(sa.Column('schedule_json', sqlmodel.sql.sqltypes.AutoString(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('batches') as batch:
        batch.drop_column('schedule_json')
        batch.drop_column('schedule')
    with op.batch_alter_table('requests') as batch:
        batch.drop_column('own_num_ctx')
        batch.drop_column('prefix_key')
