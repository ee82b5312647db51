"""reasoning tokens, loaded context, output file expiry

Revision ID: 0003_contract
Revises: 0002
Create Date: 2026-12-01 12:40:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003_contract'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('requests') as table:
        table.add_column(sa.Column('reasoning_tokens', sa.Integer(), nullable=True))
        table.add_column(sa.Column('loaded_context', sa.Integer(), nullable=True))
    with op.batch_alter_table('batches') as table:
        table.add_column(sa.Column('reasoning_tokens', sa.Integer(), nullable=False, server_default='0'))
        table.add_column(sa.Column('output_expires_after', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('batches') as table:
        table.drop_column('output_expires_after')
        table.drop_column('reasoning_tokens')
    with op.batch_alter_table('requests') as table:
        table.drop_column('loaded_context')
        table.drop_column('reasoning_tokens')
