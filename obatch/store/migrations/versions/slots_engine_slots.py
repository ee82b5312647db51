"""engine_slots: the slots auto concurrency read from an engine host for a model, where the next run starts

Revision ID: slots_engine
Revises: narrow_lines
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = 'slots_engine'
down_revision: str | None = 'narrow_lines'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('engine_slots',
    sa.Column('host', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('model', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('slots', sa.Integer(), nullable=False),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('host', 'model')
    )


def downgrade() -> None:
    op.drop_table('engine_slots')
