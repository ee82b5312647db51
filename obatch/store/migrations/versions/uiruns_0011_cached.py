"""batches count the lines answered by reuse (a stored answer or an identical line's): ``cached``

Revision ID: uiruns_0011_cached
Revises: cache_0010
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'uiruns_0011_cached'
down_revision: str | None = 'cache_0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('batches') as batch:
        batch.add_column(sa.Column('cached', sa.Integer(), nullable=False, server_default='0'))
    # Batches that ran before the count existed: their reused lines, counted once here.
    op.execute("UPDATE batches SET cached = (SELECT count(*) FROM requests WHERE requests.batch_id = batches.id "
               "AND requests.cached_from IS NOT NULL)")


def downgrade() -> None:
    with op.batch_alter_table('batches') as batch:
        batch.drop_column('cached')
