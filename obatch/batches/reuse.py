"""Reuse before running: a model group's pending lines answered from stored answers, and lines of the batch that
share a key run once (``obatch.cache`` makes the keys and says which kinds the policy looks up).

Before a group's lines become jobs, ``before_group`` names the model that answers them (its identity goes on the
rows, so their answers can be reused later), then finds the lines whose key some succeeded row shares (one query,
inside the database) and takes those rows' answers a page of keys at a time, from the owner's rows whose answers can
still be read. A hit finishes the line through the same guarded
write as any result (only a pending row takes it), with a new request id and ``cached_from`` naming the line it came
from; the engine is not asked. Of the lines still pending that share a key, the first runs and the others are held
back; once the group has run, ``answer_held`` gives each held line its leader's answer. A held line whose leader
failed runs itself in a second round. A crash anywhere leaves rows pending or finished, never half-done: the next
run looks everything up again and a held line finds its leader's answer, or runs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from obatch import cache
from obatch.batches import compact
from obatch.batches.services import Progress, Services
from obatch.protocol import new_id
from obatch.store import cache_repo, repo
from obatch.store.tables import BatchRow

# A reused answer keeps what the answer says (body, content, usage, finish reason, context); what measured the
# engine's work on it, and which of this batch's hosts answered, are left empty: no engine worked on it
# (``cached_from`` names the line whose provenance it has).
_NOT_COPIED = ("latency_ms", "ttft_ms", "engine_prompt_ms", "engine_decode_ms", "engine_load_ms", "host", "refused")


@dataclass
class Plan:
    """What the cache did for one model group before it runs."""

    identity: str | None = None
    kinds: tuple[str, ...] = ()
    answered: int = 0  # lines answered from stored answers
    held: frozenset[int] = field(default_factory=frozenset)  # lines waiting for an identical earlier line


def identity(hosts: Mapping[str, Mapping[str, Any]], model: str) -> str | None:
    """The identity of ``model`` on the hosts that serve it (their digests, sorted and joined), from the entries
    ``provenance.ask`` found; None when a host cannot tell, so nothing is reused for a model whose weights are not
    known."""
    digests = {entry["models"].get(model) for entry in hosts.values()}
    if not digests or None in digests:
        return None
    return "|".join(sorted(digests))


async def before_group(svc: Services, batch: BatchRow, model: str, progress: Progress | None,
                       hosts: Mapping[str, Mapping[str, Any]]) -> Plan:
    """Answer what can be answered from stored answers and hold back repeated lines (module docstring); ``hosts``:
    what ``provenance.ask`` found of the hosts serving ``model``."""
    policy = cache.policy_of(svc.settings.cache, batch.metadata_json)
    kinds = cache.kinds(policy)
    if not kinds:
        return Plan()
    plan = Plan(identity=identity(hosts, model), kinds=kinds)
    if plan.identity is None:
        return plan
    async with svc.sessions() as session:
        await cache_repo.set_cache_identity(session, batch.id, model, plan.identity)
        await session.commit()
    plan.answered = await _answer(svc, batch, model, plan, progress)
    async with svc.sessions() as session:
        plan.held = frozenset(await cache_repo.cache_followers(session, batch.id, model, kinds))
    return plan


async def answer_held(svc: Services, batch: BatchRow, model: str, plan: Plan, progress: Progress | None) -> None:
    """After the group's first round: each held line takes its leader's answer (those whose leader failed stay
    pending, and run)."""
    if plan.held:
        plan.answered += await _answer(svc, batch, model, plan, progress)


async def _answer(svc: Services, batch: BatchRow, model: str, plan: Plan, progress: Progress | None) -> int:
    assert plan.identity is not None
    answered = 0
    async for page in cache_repo.iter_cache_candidates(svc.sessions, batch.id, model, plan.identity):
        wanted = [(line, key) for line, key in page if key.split(":", 1)[0] in plan.kinds]
        if not wanted:
            continue
        async with svc.sessions() as session:
            found = await compact.answers(
                await cache_repo.cached_answers(session, batch.owner, plan.identity, sorted({k for _, k in wanted})),
                svc.settings.data_dir)
            results = []
            now = time.time()
            for line, key in wanted:
                if (source := found.get(key)) is None:
                    continue
                source_batch, source_custom_id, *values = source
                stored = dict(zip(repo.FINISH_COLUMNS, values, strict=True))
                stored.update(dict.fromkeys(_NOT_COPIED), attempts=0, finished_at=now,
                              request_id=new_id("batch_req", sep="_", length=32, secret=False))
                origin = orjson.dumps({"batch_id": source_batch, "custom_id": source_custom_id}).decode()
                results.append((*(stored[c] for c in repo.FINISH_COLUMNS), origin, line))
            if results:
                await repo.finish_requests(session, batch.id, results, reused=True)
                await session.commit()
        answered += len(results)
        if progress is not None and results:
            progress.update(len(results))
    return answered
