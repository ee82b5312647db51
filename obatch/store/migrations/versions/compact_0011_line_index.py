"""compaction: a request row's index into its batch's output or error file, and the files a batch's compacted rows
index

Existing rows keep NULL indexes: they keep their text, and read as before. The model identity a row's answer is
reused under becomes a 16-character hash of it (``cache_repo.identity_tag``), existing rows' included.

Revision ID: compact_0011
Revises: plans_deadline
"""
import hashlib
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = 'compact_0011'
down_revision: str | None = 'plans_deadline'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('requests') as batch:
        batch.add_column(sa.Column('out_offset', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True))
        batch.add_column(sa.Column('out_length', sa.Integer(), nullable=True))
    with op.batch_alter_table('batches') as batch:
        batch.add_column(sa.Column('results_files', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
    connection = op.get_bind()
    identities = connection.execute(sa.text(
        "SELECT DISTINCT cache_identity FROM requests WHERE cache_identity IS NOT NULL")).scalars().all()
    for identity in identities:  # a store has a few: one per model and weights it ran
        tag = hashlib.blake2b(identity.encode(), digest_size=8).hexdigest()
        connection.execute(sa.text("UPDATE requests SET cache_identity = :tag WHERE cache_identity = :identity"),
                           {"tag": tag, "identity": identity})


def downgrade() -> None:
    # the identities' hashes stay (their digests cannot be made again from them): earlier answers no longer hit
    with op.batch_alter_table('batches') as batch:
        batch.drop_column('results_files')
    with op.batch_alter_table('requests') as batch:
        batch.drop_column('out_length')
        batch.drop_column('out_offset')
