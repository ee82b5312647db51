"""Where auto concurrency starts: the slots an earlier run read from the same engine host for the same model.

Ollama tells no slot count, so auto concurrency finds it: before a run's first line the pool counts it with
``JUMP`` short requests sent together (``Pool.prepare``, ``OllamaBackend.count_slots``), else a request at 1, a
burst of ``JUMP``, and the requests that waited inside the engine tell its slots (``obatch.concurrency``). Either
costs a round of requests at the start of a run. The ceiling a run reads is kept in the store per host (its base
URL) and model; the next run against them starts at that level at once (``AutoLimit.recall``), with no count, and
its history says where the start came from. Waits inside the engine lower a remembered level that is too high (the
engine restarted with fewer slots); the check above the ceiling raises one that is too low.

A change is written when the run's watcher next looks (every ``commit_interval``) and when a model group's run
ends: never a write per request. A fixed level (``-c N``) neither reads nor writes it, nor does an engine that
reports its slots (llama.cpp's ``/props``): its report is the start every time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from obatch.batches.services import Services
from obatch.store import engine_slots


@dataclass
class Memory:
    """What the store holds for one model's hosts: the slots kept per host URL (what a write would change)."""

    model: str
    kept: dict[str, int] = field(default_factory=dict)


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(at))


async def recall(svc: Services, model: str) -> Memory:
    """Start each auto host of the pool that serves ``model`` at the slots an earlier run read from it."""
    hosts = [h for h in svc.pool.hosts if h.limit.auto and h.serves(model)]
    if not hosts:
        return Memory(model)
    async with svc.sessions() as session:
        found = await engine_slots.remembered_slots(session, [h.url for h in hosts], model)
    for host in hosts:
        if host.url in found:
            slots, at = found[host.url]
            host.limit.recall(slots, f"an earlier run on {host.url} at {_when(at)}")
    return Memory(model, {url: slots for url, (slots, _) in found.items()})


async def remember(svc: Services, memory: Memory) -> None:
    """Keep the slots each host's auto level has read, where they differ from what the store holds."""
    changed = {h.url: learnt for h in svc.pool.hosts
               if (learnt := h.limit.learnt) is not None and memory.kept.get(h.url) != learnt}
    if not changed:
        return
    async with svc.sessions() as session:
        for url, slots in changed.items():
            await engine_slots.remember_slots(session, url, memory.model, slots, svc.clock())
        await session.commit()
    memory.kept.update(changed)
