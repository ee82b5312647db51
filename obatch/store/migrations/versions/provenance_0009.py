"""provenance: the engine hosts a batch ran on (with versions and model digests), and per line which of them
answered, its seed and the answers the structured-output check refused; the batch's invalid-output counts

Revision ID: provenance_0009
Revises: 0008_rate
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = 'provenance_0009'
down_revision: str | None = '0008_rate'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('batches') as batch:
        batch.add_column(sa.Column('engines_json', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch.add_column(sa.Column('output_retries', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('invalid_output', sa.Integer(), nullable=False, server_default='0'))
        batch.add_column(sa.Column('refused_answers', sa.Integer(), nullable=False, server_default='0'))
    with op.batch_alter_table('requests') as batch:
        batch.add_column(sa.Column('host', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('seed', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True))
        batch.add_column(sa.Column('refused', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('requests') as batch:
        batch.drop_column('refused')
        batch.drop_column('seed')
        batch.drop_column('host')
    with op.batch_alter_table('batches') as batch:
        batch.drop_column('refused_answers')
        batch.drop_column('invalid_output')
        batch.drop_column('output_retries')
        batch.drop_column('engines_json')
