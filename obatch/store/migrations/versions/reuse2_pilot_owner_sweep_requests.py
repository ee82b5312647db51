"""pilot lines belong to an owner; a sweep keeps the engine requests it sends

Pilot lines were keyed by the file's content and custom_id alone, so two tenants who uploaded the same bytes shared
them. They gain the owner of the batch that may take them (the server's API key owner; "" for the CLI and
notebook) as the first part of their key. Existing lines become the local owner's ("").

A sweep's engine requests (points × requests) become a column, so a key's daily sweep budget is checked and a new
sweep recorded in one conditional insert (obatch.store.quota). Existing sweeps get theirs from their parameters.

Revision ID: reuse2_owners
Revises: compact_0011
"""
import json
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = 'reuse2_owners'
down_revision: str | None = 'compact_0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PILOT_KEY = ['owner', 'file_sha256', 'custom_id']


def _sent(params_json: str) -> int:
    """A sweep's engine requests, from its stored parameters (as SweepParams counts them)."""
    p = json.loads(params_json)
    levels = len(p.get('concurrency') or []) + len(p.get('rates') or [])
    return (len(p.get('models') or []) * len(p.get('num_ctx') or [2048]) * levels * int(p.get('repeats') or 1)
            * int(p.get('requests') or 16))


def _pilot_columns() -> list[sa.Column]:  # type: ignore[type-arg]
    """The pilots table's columns besides ``owner``, as 0007_estimates made them."""
    text = sqlmodel.sql.sqltypes.AutoString
    return [sa.Column('file_sha256', text(), nullable=False), sa.Column('custom_id', text(), nullable=False),
            sa.Column('body_sha256', text(), nullable=False), sa.Column('model', text(), nullable=False),
            sa.Column('url', text(), nullable=False), sa.Column('max_tokens', sa.Integer(), nullable=True),
            sa.Column('completion_tokens', sa.Integer(), nullable=True),
            sa.Column('finish_reason', text(), nullable=True), sa.Column('latency_ms', sa.Float(), nullable=True),
            sa.Column('concurrency', sa.Integer(), nullable=True), sa.Column('result_json', text(), nullable=False),
            sa.Column('created_at', sa.Float(), nullable=False), sa.Column('used_by', text(), nullable=True)]


def _owner() -> sa.Column:  # type: ignore[type-arg]
    return sa.Column('owner', sqlmodel.sql.sqltypes.AutoString(), nullable=False, server_default='')


def _rekey_pilots(owned: bool) -> None:
    """Give the pilots table its key with the owner (``owned``) or without it. PostgreSQL changes the key in place;
    SQLite cannot, so there the table is copied into a new one with the key (the local owner's lines only, going
    down: the old key holds one line per file and custom_id)."""
    key = PILOT_KEY if owned else PILOT_KEY[1:]
    if op.get_context().dialect.name == 'postgresql':
        if owned:
            op.add_column('pilots', _owner())
        else:
            op.execute(sa.text("DELETE FROM pilots WHERE owner <> ''"))
        op.drop_constraint('pilots_pkey', 'pilots', type_='primary')
        op.create_primary_key('pilots_pkey', 'pilots', key)
        if not owned:
            op.drop_column('pilots', 'owner')
        return
    columns = _pilot_columns()
    names = ', '.join(c.name for c in columns)
    op.create_table('_pilots_rekeyed', *([_owner()] if owned else []), *columns, sa.PrimaryKeyConstraint(*key))
    if owned:
        op.execute(sa.text(f"INSERT INTO _pilots_rekeyed (owner, {names}) SELECT '', {names} FROM pilots"))
    else:
        op.execute(sa.text(f"INSERT INTO _pilots_rekeyed ({names}) SELECT {names} FROM pilots WHERE owner = ''"))
    op.drop_table('pilots')
    op.rename_table('_pilots_rekeyed', 'pilots')


def upgrade() -> None:
    _rekey_pilots(owned=True)
    op.add_column('bench_sweeps', sa.Column('requests', sa.Integer(), nullable=False, server_default='0'))
    conn = op.get_bind()
    for sweep_id, params_json in conn.execute(sa.text('SELECT id, params_json FROM bench_sweeps')).all():
        conn.execute(sa.text('UPDATE bench_sweeps SET requests = :n WHERE id = :id'),
                     {'n': _sent(params_json), 'id': sweep_id})


def downgrade() -> None:
    with op.batch_alter_table('bench_sweeps') as batch:
        batch.drop_column('requests')
    _rekey_pilots(owned=False)
