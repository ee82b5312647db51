"""What batch work runs with (``Services``), and how each step reads and writes its batch's row.

Its own module because the files, results and lifecycle modules all take these, and none of them should import
another only to reach them.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from obatch import lease
from obatch.backends.base import Backend
from obatch.backends.pool import Pool
from obatch.config import Settings
from obatch.runner import RetryPolicy
from obatch.store import repo
from obatch.store.db import Sessions
from obatch.store.tables import BatchRow

Estimator = Callable[[Sessions, BatchRow, Backend, int | None], Awaitable[str | None]]


class Progress(Protocol):
    """What a run reports to: lines done, and a note (the concurrency level and why). tqdm bars are one."""

    def update(self, n: int | float | None = 1) -> bool | None: ...

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None: ...


@dataclass
class Services:
    """What batch work needs, built by the process that owns it and passed in.

    ``pool`` is the backend's engine hosts with their concurrency levels (``settings.concurrency``: a number, or
    ``"auto"``). It lives as long as the services: every batch run through them leases slots from it, so runs share
    the engines fairly and an auto level learned by one run carries over to the next. ``estimator``, when given,
    makes the duration estimate kept with a batch before it runs (the benchmarks provide it; the lifecycle does not
    depend on them).
    """

    settings: Settings
    sessions: Sessions
    backend: Backend
    clock: Callable[[], float] = time.time
    estimator: Estimator | None = None
    owner: str = field(default_factory=lease.new_owner)  # this process's name on the leases it holds
    pool: Pool = field(init=False)

    def __post_init__(self) -> None:
        self.pool = Pool.of(self.backend, concurrency=self.settings.concurrency,
                            maximum=self.settings.max_concurrency)

    @property
    def policy(self) -> RetryPolicy:
        return RetryPolicy.from_settings(self.settings)


async def update_batch(svc: Services, batch: BatchRow, **values: Any) -> None:
    """Write fields of a batch and mirror them on the object in hand."""
    async with svc.sessions() as session:
        await repo.set_batch(session, batch.id, **values)
        await session.commit()
    for key, value in values.items():
        setattr(batch, key, value)


async def reload(svc: Services, batch_id: str) -> BatchRow:
    async with svc.sessions() as session:
        return await repo.get_batch(session, batch_id)
