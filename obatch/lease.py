"""Leases: one process drives a batch at a time, whichever of several processes share the store.

A process claims a batch's lease row before driving it (``hold``), renews it every ``lease_heartbeat`` seconds while
it works and deletes it when done. A process that dies stops renewing; once the lease has expired (``lease_ttl``)
another process claims it and ``batches.process`` finishes only what is missing. A process that cannot renew (its
lease was taken over after a stall, or the store is unreachable until expiry) stops driving the batch at once, so
two processes never run one batch's lines side by side for longer than a heartbeat.

Expiry compares wall clocks of the processes sharing a store: keep them in sync (NTP) to well under ``lease_ttl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from obatch import errors
from obatch.config import Settings
from obatch.store import leases
from obatch.store.db import Sessions

log = logging.getLogger("obatch.lease")


def new_owner() -> str:
    """An owner id that says where the holder runs (for people reading the table) and is unique per process."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class BatchBusy(errors.ConflictError):
    """Another live process holds the batch's lease."""

    def __init__(self, batch_id: str, owner: str, expires_in: float) -> None:
        super().__init__(f"Batch {batch_id} is being run by another process ({owner}); its lease expires in "
                         f"{max(expires_in, 0):.0f} s unless renewed.", code="batch_busy")
        self.expires_in = max(expires_in, 0.0)


class LeaseLost(errors.ConflictError):
    """The lease ran out under a process still driving the batch (it stalled past ``lease_ttl``)."""


async def claim(sessions: Sessions, settings: Settings, batch_id: str, owner: str,
                clock: Callable[[], float] = time.time) -> None:
    """Take the batch's lease or raise ``BatchBusy``."""
    now = clock()
    async with sessions() as session:
        holder = await leases.claim_lease(session, batch_id, owner, now, settings.lease_ttl)
        await session.commit()
    if holder is not None:
        raise BatchBusy(batch_id, holder.owner, holder.expires_at - now)


@asynccontextmanager
async def hold(sessions: Sessions, settings: Settings, batch_id: str, owner: str,
               clock: Callable[[], float] = time.time) -> AsyncIterator[None]:
    """Claim the lease, keep it alive while the body runs, release it after.

    If the lease cannot be renewed before it would expire, the body is cancelled and ``LeaseLost`` raised: the
    store's rows stay as they are (a row takes a result only while pending), and the new holder finishes them.
    """
    await claim(sessions, settings, batch_id, owner, clock)
    task = asyncio.current_task()
    assert task is not None
    lost = False

    async def beat() -> None:
        nonlocal lost
        valid_until = clock() + settings.lease_ttl
        while True:
            await asyncio.sleep(settings.lease_heartbeat)
            now = clock()
            try:
                # A renewal kept waiting (a store busy with another writer, a locked row) is given up while the
                # lease surely holds: this process stops before its lease can expire under it.
                async with asyncio.timeout(max(valid_until - now - settings.lease_heartbeat, settings.lease_heartbeat)):
                    async with sessions() as session:
                        ours = await leases.renew_lease(session, batch_id, owner, now, settings.lease_ttl)
                        await session.commit()
            except Exception:
                log.warning("lease renewal failed", exc_info=True, extra={"batch_id": batch_id})
                ours = clock() < valid_until - settings.lease_heartbeat  # keep going while it surely holds
            else:
                if ours:
                    valid_until = now + settings.lease_ttl
            if not ours:
                lost = True
                log.warning("lease lost; stopping this batch here", extra={"batch_id": batch_id})
                task.cancel()
                return

    beater = asyncio.create_task(beat(), name=f"lease {batch_id}")
    try:
        yield
    except asyncio.CancelledError:
        if lost and task.uncancel() == 0:
            raise LeaseLost(f"Lost the lease of batch {batch_id}; another process continues it.",
                            code="lease_lost") from None
        raise
    finally:
        beater.cancel()
        await asyncio.gather(beater, return_exceptions=True)
        if not lost:  # a release kept waiting is given up once the lease would have expired anyway
            with contextlib.suppress(Exception):
                await asyncio.shield(asyncio.wait_for(release(sessions, batch_id, owner), settings.lease_ttl))


async def release(sessions: Sessions, batch_id: str, owner: str) -> None:
    """Give up our lease, if we still hold it, so another process need not wait for its expiry."""
    async with sessions() as session:
        await leases.release_lease(session, batch_id, owner)
        await session.commit()
