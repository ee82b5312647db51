"""deadline-aware plans: a batch's plan, its estimate made at creation against its completion_window

Existing rows keep NULL: their batch objects carry no plan.

Revision ID: plans_deadline
Revises: uiruns_0011_cached
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = 'plans_deadline'
down_revision: str | None = 'uiruns_0011_cached'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('batches') as batch:
        batch.add_column(sa.Column('plan_json', sqlmodel.sql.sqltypes.AutoString(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('batches') as batch:
        batch.drop_column('plan_json')
