"""the response cache: each request row's cache key (kind and hash of its canonical body), the identity of the
model that answered it, and where a reused answer came from

Existing rows keep NULL keys: they are never looked up nor reused.

Revision ID: cache_0010
Revises: provenance_0009
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = 'cache_0010'
down_revision: str | None = 'retry_0009_parent'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('requests') as batch:
        batch.add_column(sa.Column('cache_key', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch.add_column(sa.Column('cache_identity', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch.add_column(sa.Column('cached_from', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
    op.create_index('ix_requests_cache_key', 'requests', ['cache_key'])


def downgrade() -> None:
    op.drop_index('ix_requests_cache_key', table_name='requests')
    with op.batch_alter_table('requests') as batch:
        batch.drop_column('cached_from')
        batch.drop_column('cache_identity')
        batch.drop_column('cache_key')
