"""Alembic environment: runs on the connection obatch hands in (``obatch.store.db.migrate``)."""

from alembic import context
from sqlmodel import SQLModel

from obatch.store import bench_tables, tables  # noqa: F401  (registers the tables on the metadata)

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("Run migrations through obatch.store.db.migrate(engine).")
context.configure(connection=connection, target_metadata=SQLModel.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
