"""retries: a batch made of another batch's failed lines names it (``parent_id``), indexed both ways

Revision ID: retry_0009_parent
Revises: provenance_0009
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = 'retry_0009_parent'
down_revision: str | None = 'schedule_prefix_groups'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('batches') as batch:
        batch.add_column(sa.Column('parent_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch.create_index('ix_batches_parent_id', ['parent_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('batches') as batch:
        batch.drop_index('ix_batches_parent_id')
        batch.drop_column('parent_id')
