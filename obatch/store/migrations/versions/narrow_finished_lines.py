"""finished lines: a narrow row for each succeeded line a finished batch moves out of requests

A batch's moved lines keep a small number for their batch (``finished_batches``), one for their model
(``finished_models``), their place in the output file, their token counts and, for a line the cache may answer
from, a 16-byte digest of its cache key and model identity. Existing rows stay in requests and read as before.

Revision ID: narrow_lines
Revises: reuse2_owners
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = 'narrow_lines'
down_revision: str | None = 'reuse2_owners'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DIGEST = sa.text('cache_digest IS NOT NULL')


def upgrade() -> None:
    text = sqlmodel.sql.sqltypes.AutoString
    op.create_table(
        'finished_batches',
        sa.Column('key', sa.Integer(), nullable=False),
        sa.Column('batch_id', text(), nullable=False),
        sa.ForeignKeyConstraint(['batch_id'], ['batches.id']),
        sa.PrimaryKeyConstraint('key'),
        sa.UniqueConstraint('batch_id'),
    )
    op.create_table(
        'finished_models',
        sa.Column('batch_key', sa.Integer(), nullable=False),
        sa.Column('number', sa.Integer(), nullable=False),
        sa.Column('model', text(), nullable=False),
        sa.ForeignKeyConstraint(['batch_key'], ['finished_batches.key']),
        sa.PrimaryKeyConstraint('batch_key', 'number'),
    )
    op.create_table(
        'finished_lines',
        sa.Column('batch_key', sa.Integer(), nullable=False),
        sa.Column('line', sa.Integer(), nullable=False),
        sa.Column('out_offset', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('out_length', sa.Integer(), nullable=False),
        sa.Column('model', sa.Integer(), nullable=False),
        sa.Column('host', sa.Integer(), nullable=True),
        sa.Column('reused', sa.Boolean(), nullable=False),
        sa.Column('prompt_tokens', sa.Integer(), nullable=True),
        sa.Column('completion_tokens', sa.Integer(), nullable=True),
        sa.Column('reasoning_tokens', sa.Integer(), nullable=True),
        sa.Column('cache_digest', sa.LargeBinary(), nullable=True),
        sa.PrimaryKeyConstraint('batch_key', 'line'),
        sqlite_with_rowid=False,
    )
    op.create_index('ix_finished_lines_cache_digest', 'finished_lines', ['cache_digest'], unique=False,
                    sqlite_where=DIGEST, postgresql_where=DIGEST)


def downgrade() -> None:
    moved = op.get_bind().execute(sa.text('SELECT count(*) FROM finished_lines')).scalar()
    if moved:  # their rows keep no custom_id: only their output lines could make them whole again
        raise RuntimeError(f'{moved} finished lines live only in finished_lines; downgrading would lose them.')
    op.drop_index('ix_finished_lines_cache_digest', table_name='finished_lines')
    op.drop_table('finished_lines')
    op.drop_table('finished_models')
    op.drop_table('finished_batches')
