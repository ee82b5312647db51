"""The SQLite store's connection pool: a read must not queue behind writers waiting for SQLite's write lock."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

from sqlalchemy import text

from obatch.store.db import open_store


async def test_a_read_does_not_wait_for_writers_queued_on_the_write_lock(tmp_path: Path) -> None:
    """Another process holds the write lock (as the batch process does while it commits) and twenty writers of this
    process wait for it, each holding a connection: a read still gets a connection and answers (WAL lets it)."""
    path = tmp_path / "obatch.db"
    engine, sessions = await open_store(f"sqlite+aiosqlite:///{path}")
    held, released = threading.Event(), threading.Event()

    def hold_the_write_lock() -> None:
        connection = sqlite3.connect(path, timeout=30)
        connection.execute("BEGIN IMMEDIATE")
        held.set()
        threading.Event().wait(3.0)
        connection.rollback()
        connection.close()
        released.set()

    async def write(i: int) -> None:
        async with sessions() as session:
            await session.execute(text("UPDATE files SET filename = :n WHERE id = 'none'"), {"n": str(i)})
            await session.commit()

    holder = threading.Thread(target=hold_the_write_lock)
    holder.start()
    try:
        await asyncio.to_thread(held.wait)
        writers = [asyncio.create_task(write(i)) for i in range(20)]
        await asyncio.sleep(0.3)  # every writer is waiting on the lock now
        async with sessions() as session:
            await session.execute(text("SELECT count(*) FROM batches"))
        assert not released.is_set()  # answered while the lock was still held
        await asyncio.gather(*writers)
    finally:
        await asyncio.to_thread(holder.join)
        await engine.dispose()
