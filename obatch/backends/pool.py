"""Several engine hosts as one backend: each host keeps its own concurrency level, all pull from one queue.

People with several GPUs run one engine per GPU (one Ollama per GPU behind a balancer kept 28 GPUs above 90% busy,
where one Ollama across 4 GPUs kept them near 25%). A ``Pool`` drives such hosts — any mix of Ollama and
OpenAI-compatible engines — without a balancer: a request *leases* a slot on a host that serves its model and has
room under that host's level (``obatch.concurrency``), waiters are served first come first served (so concurrent
batches share the hosts fairly), and a faster host frees its slots sooner and so takes more lines by itself.

A host that keeps failing (refused connections, repeated 5xx, timeouts: ``FAILURES_TO_DRAIN`` in a row) is drained:
it takes no new request, its in-flight requests fail and are retried on the others, and it is probed with backoff
until it answers again. A pool of one host is never drained: there is no other host to hand its lines to, and the
retry policy alone decides when a line gives up. For the same reason the last host up is never drained: with every
host failing, lines spend their attempts and fail as they would against one engine, rather than wait for ever.

A host that answers "busy" (503/429: its queue is full) is given, for a moment (``BUSY_PAUSE``, doubling while it
stays busy, reset by an answer), no more requests than it still holds: one that ends makes room for one more, a
refusal makes none. Without this a slot freed by a refusal went at once to the next line, which the full queue
refused in turn: a stream of 503s as fast as the client could send, at any fixed level.

While every host's last ``SILENT_TO_WAIT`` attempts got no answer at all (refused or reset connections, timeouts),
the pool is in an outage; ``Pool.outages`` keeps when, for the live ETA (``obatch.progress``) to pause its clock.
During an outage the pool asks every host for its models every few seconds (``WATCH_INITIAL`` doubling to
``WATCH_MAX``); the first answer ends the outage and wakes every line waiting out a retry's backoff (``pause``), so
that the batch goes on as soon as the engine is back rather than up to ``retry_max_wait`` later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from obatch import errors
from obatch.backends.base import (
    Backend,
    Capabilities,
    ModelInfo,
    Result,
    capabilities_of,
    count_slots,
    loaded_context,
)
from obatch.concurrency import Concurrency, FixedLimit, Limit, make_limit
from obatch.outages import Outages
from obatch.protocol import HostStatus

log = logging.getLogger("obatch.pool")

FAILURES_TO_DRAIN = 3
SILENT_TO_WAIT = 2  # attempts in a row that got no answer (refused, reset, timed out) before a host counts as silent
PROBE_INITIAL, PROBE_MAX = 0.5, 30.0
WATCH_INITIAL, WATCH_MAX = 0.5, 2.0  # seconds between two asks of every host while none answers
BUSY_PAUSE, BUSY_PAUSE_MAX = 0.25, 4.0  # seconds a busy host is left alone; doubles while it stays busy


def host_url(backend: Backend) -> str:
    """How a host is named to people: its URL where it has one."""
    for attr in ("url", "base_url"):
        value = getattr(backend, attr, None)
        if isinstance(value, str):
            return value
    inner = getattr(backend, "inner", None)
    return host_url(inner) if inner is not None else backend.name


@dataclass(eq=False)
class Host:
    """One engine host of a pool: its backend, level, in-flight count and health."""

    backend: Backend
    limit: Limit
    url: str = ""
    inflight: int = 0
    up: bool = True
    failures: int = 0
    served: int = 0
    models: set[str] | None = None  # None: not asked yet
    error: str | None = None
    busy_until: float = 0.0  # time.monotonic() until which the host holds at most ``busy_room`` (it answered busy)
    busy_room: int = 0
    busy_pause: float = 0.0  # the last pause; 0 after an answer
    silent: int = 0  # attempts in a row that got no answer at all (connection faults, timeouts)
    silent_since: float = 0.0  # time.monotonic() of the first of them
    _probe: asyncio.Task[None] | None = field(default=None, repr=False)

    def has_room(self) -> bool:
        room = self.limit.admit if time.monotonic() >= self.busy_until else min(self.limit.admit, self.busy_room)
        return self.up and self.inflight < room

    def serves(self, model: str | None) -> bool:
        return model is None or self.models is None or model in self.models

    def status(self) -> HostStatus:
        return HostStatus(url=self.url, backend=self.backend.name, state="up" if self.up else "down",
                          concurrency=self.limit.level, best=self.limit.best, auto=self.limit.auto,
                          reason=self.limit.reason, in_flight=self.inflight, served=self.served, error=self.error,
                          models=sorted(self.models) if self.models is not None else None)


@dataclass(eq=False, slots=True)
class Lease:
    """One slot on one host for one attempt; ``release`` reports how the attempt went."""

    pool: Pool
    host: Host
    epoch: int
    started: float

    def release(self, *, work: float | None = None, error: errors.BackendError | None = None,
                engine: float | None = None) -> None:
        """``work`` delivered on success; an ``error``; or neither when the attempt was abandoned (cancelled);
        ``engine``: the seconds the engine says it worked on the request, where it tells."""
        self.pool.release(self, work=work, error=error, engine=engine)


class Pool:
    """Hosts behind the ``Backend`` protocol (for single requests, listings), plus leases for the runner."""

    def __init__(self, backends: Sequence[Backend], *, concurrency: Concurrency = "auto", maximum: int = 256) -> None:
        if not backends:
            raise errors.ConfigError("A pool needs at least one engine host.")
        self.hosts = [Host(b, make_limit(concurrency, maximum=maximum), url=host_url(b)) for b in backends]
        names = {b.name for b in backends}
        self.name = names.pop() if len(names) == 1 else "pool"
        self.concurrency: Concurrency = concurrency
        self.context_lengths: dict[str, int | None] = {}  # per model, what ``route`` learnt (None: not told)
        self.outages = Outages()  # when no host answered (the live ETA's clock leaves these out)
        self._back: asyncio.Event | None = None  # set when an outage ends (made as one begins, in the running loop)
        self._watch: asyncio.Task[None] | None = None  # asks the hosts while an outage goes on
        self._stopped = False  # after ``stop``, until a new lease, no task asks a host (a closed client would
        # open a new session that nothing closes)
        self._waiters: deque[tuple[str | None, asyncio.Future[Lease]]] = deque()

    @classmethod
    def of(cls, backend: Backend, *, concurrency: Concurrency = "auto", maximum: int = 256) -> Pool:
        return backend if isinstance(backend, Pool) else cls([backend], concurrency=concurrency, maximum=maximum)

    def mapped(self, wrap: Callable[[Backend], Backend]) -> Pool:
        """The same hosts, each seen through ``wrap`` (metrics, clocks); levels start afresh."""
        return Pool([wrap(h.backend) for h in self.hosts], concurrency=self.concurrency,
                    maximum=getattr(self.hosts[0].limit, "maximum", 256))

    @property
    def fixed(self) -> int | None:
        """The pinned level per host, or None when each host's level is found by measuring."""
        return self.concurrency if isinstance(self.concurrency, int) else None

    def ceiling(self, model: str | None) -> int:
        """The most requests the hosts serving ``model`` could ever hold at once (their levels' maxima)."""
        return sum(getattr(h.limit, "maximum", h.limit.level) for h in self.hosts if h.serves(model))

    @property
    def sets_num_ctx(self) -> bool:
        """Whether any host takes a per-request context window (Ollama, the embedded engine)."""
        return self.capabilities.sets_num_ctx

    @property
    def capabilities(self) -> Capabilities:
        """What the hosts can do together: a context window is set when any host takes one, reloads and timings
        are expected when any host has them, and the pool owns an engine when any host does."""
        each = [capabilities_of(h.backend) for h in self.hosts]
        return Capabilities(sets_num_ctx=any(c.sets_num_ctx for c in each),
                            reloads_on_num_ctx=any(c.reloads_on_num_ctx for c in each),
                            engine_timings=any(c.engine_timings for c in each),
                            embedded=any(c.embedded for c in each))

    def describe(self) -> list[dict[str, Any]]:
        return [h.status().model_dump() for h in self.hosts]

    def settled_level(self) -> int | None:
        """The level the hosts up run at once each has settled (auto: past its first climb; the level it holds
        best), their mean; None before, or with no host up."""
        up = [h for h in self.hosts if h.up]
        if not up or not all(h.limit.settled for h in up):
            return None
        return round(sum(h.limit.best for h in up) / len(up))

    def levels(self) -> str:
        """The progress line's note: each host's level and the reason for it."""
        parts = []
        for h in self.hosts:
            state = "" if h.up else " down"
            parts.append(f"c={h.limit.level}{state} ({h.limit.reason})")
        return "; ".join(parts)

    # --------------------------------------------------------------------------------------------- leases

    def _free_host(self, model: str | None) -> Host | None:
        best: Host | None = None
        for h in self.hosts:
            if h.has_room() and h.serves(model) and (
                    best is None or h.limit.level - h.inflight > best.limit.level - best.inflight):
                best = h
        return best

    def _grant(self, host: Host) -> Lease:
        host.inflight += 1
        return Lease(self, host, host.limit.begin(), time.perf_counter())

    async def lease(self, model: str | None) -> Lease:
        """A slot on a host that serves ``model``; waits (first come, first served) until one is free."""
        if not any(h.serves(model) for h in self.hosts):
            raise errors.ModelNotFoundError(f"No engine host serves {model!r}.", param="model")
        self._stopped = False  # in use again (a pool passed to one run after another)
        if not self._waiters:
            host = self._free_host(model)
            if host is not None:
                return self._grant(host)
        waiter: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        entry = (model, waiter)
        self._waiters.append(entry)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                waiter.result().release()  # granted just as we were cancelled: give it back
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
            raise

    def _wake(self) -> None:
        """Grant waiting leases in arrival order, each to a free host serving its model."""
        if not self._waiters:
            return
        blocked: set[str | None] = set()
        for entry in list(self._waiters):
            model, waiter = entry
            if waiter.done():
                self._waiters.remove(entry)
                continue
            if model in blocked:
                continue
            host = self._free_host(model)
            if host is None:
                blocked.add(model)  # later waiters for this model must not overtake this one
                continue
            self._waiters.remove(entry)
            waiter.set_result(self._grant(host))

    def release(self, lease: Lease, *, work: float | None, error: errors.BackendError | None,
                engine: float | None = None) -> None:
        host = lease.host
        host.inflight -= 1
        latency = time.perf_counter() - lease.started
        busy = isinstance(error, errors.ServerBusyError)
        host.limit.done(lease.epoch, work=work if error is None else None, latency=latency, overloaded=busy,
                        engine=engine)
        if busy:
            self._pause(host)
        if (error is None and work is not None) or (error is not None and error.status is not None):
            self._heard(host, time.monotonic() - latency)  # an answer, even an error's, from when it was asked
        elif isinstance(error, errors.TransientError):
            self._silence(host)
        if error is None and work is not None:
            host.served += 1
            host.failures, host.error, host.busy_pause = 0, None, 0.0
        elif isinstance(error, errors.TransientError) and not busy:
            host.failures += 1
            host.error = error.message
            others_up = any(h.up for h in self.hosts if h is not host)
            if host.failures >= FAILURES_TO_DRAIN and host.up and others_up:
                self._drain(host)
        self._wake()

    def _pause(self, host: Host) -> None:
        """A busy host holds no more than it still has in flight for a moment; refusals of requests already sent
        lower that room but do not lengthen the pause."""
        now = time.monotonic()
        if now < host.busy_until:
            host.busy_room = min(host.busy_room, host.inflight)
            return
        host.busy_room = host.inflight
        host.busy_pause = min(BUSY_PAUSE_MAX, host.busy_pause * 2 or BUSY_PAUSE)
        host.busy_until = now + host.busy_pause
        asyncio.get_running_loop().call_later(host.busy_pause, self._wake)

    # ---------------------------------------------------------------------------------------------- health

    def _heard(self, host: Host, asked: float) -> None:
        host.silent = 0
        self.outages.end(asked)
        if self._back is not None:
            self._back.set()
            self._back = None

    async def pause(self, seconds: float) -> None:
        """The wait before a line's next attempt: ``seconds``, or until the outage going on ends, if sooner."""
        back = self._back
        if back is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await back.wait()

    async def _watch_outage(self) -> None:
        """Ask every host for its models until one answers (that ends the outage: ``_heard``)."""
        wait = WATCH_INITIAL
        while self.outages.ongoing and not self._stopped:
            await asyncio.sleep(wait)
            for host in self.hosts:
                if self._stopped:
                    break
                asked = time.monotonic()
                if await self._ask(host, wait) is not None:
                    continue  # still silent
                self._heard(host, asked)
                log.warning("engine host %s answers again; the lines waiting to retry go on", host.url)
                self._wake()
                break
            wait = min(wait * 2, WATCH_MAX)
        self._watch = None

    def _silence(self, host: Host) -> None:
        """An attempt got no answer: when every host has had ``SILENT_TO_WAIT`` such in a row, an outage began
        at the first of those on the host that fell silent last."""
        if not host.silent:
            host.silent_since = time.monotonic()
        host.silent += 1
        if all(h.silent >= SILENT_TO_WAIT for h in self.hosts):
            self.outages.begin(max(h.silent_since for h in self.hosts))
            if self._back is None:
                self._back = asyncio.Event()
            if self._watch is None and not self._stopped:
                self._watch = asyncio.get_running_loop().create_task(self._watch_outage(), name="outage watch")

    def _drain(self, host: Host) -> None:
        host.up = False
        log.warning("engine host %s drained after %d failures in a row: %s", host.url, host.failures, host.error)
        if not self._stopped:
            host._probe = asyncio.get_running_loop().create_task(self._reprobe(host), name=f"probe {host.url}")

    @staticmethod
    async def _ask(host: Host, wait: float) -> Exception | None:
        """Ask ``host`` for its models (within ``wait`` seconds, 2 at least): None when it answered, else why not."""
        try:
            async with asyncio.timeout(max(wait, 2.0)):
                await host.backend.models()
        except Exception as exc:  # any failure: no answer
            return exc
        return None

    async def _reprobe(self, host: Host) -> None:
        wait = PROBE_INITIAL
        while not self._stopped:
            await asyncio.sleep(wait)
            if (exc := await self._ask(host, wait)) is not None:  # still down
                host.error = f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
                wait = min(wait * 2, PROBE_MAX)
                continue
            host.up, host.failures, host._probe = True, 0, None
            self._heard(host, time.monotonic())
            log.warning("engine host %s answers again; it rejoins the pool", host.url)
            self._wake()
            return

    # --------------------------------------------------------------------------------------------- routing

    async def route(self, model: str) -> ModelInfo:
        """Learn which hosts serve ``model`` (a line goes only to those); raises ModelNotFoundError if none does."""
        found: ModelInfo | None = None
        last: errors.BackendError | None = None
        for host in self.hosts:
            try:
                info = await host.backend.show(model)
            except errors.PermanentError as exc:
                last = exc
                host.models = (host.models or set()) - {model}
                continue
            except errors.BackendError as exc:  # unreachable now: keep it eligible, its probe decides
                last = exc
                continue
            host.models = (host.models or set()) | {model}
            found = found or info
        if found is None:
            raise last or errors.ModelNotFoundError(f"No engine host serves {model!r}.", param="model")
        self.context_lengths[model] = found.context_length
        return found

    async def prepare(self, model: str, *, num_ctx: int | None, parallel: int | None, lines: int = 0) -> float:
        """Ready every host serving ``model``; an auto level starts from the slots each engine reports, else (for a
        run of ``lines`` more than one burst of them) from those counted on it (``count_slots``), unless an earlier
        run's are remembered (``obatch.batches.slots``)."""
        seconds = 0.0
        for host in self.hosts:
            if not host.up or not host.serves(model):
                continue
            seconds = max(seconds, await host.backend.prepare(model, num_ctx=num_ctx, parallel=parallel))
            if host.limit.auto:
                slots = await host.backend.slots()
                host.limit.hint(slots, host.backend.name)
        await asyncio.gather(*(self._count(host, model, num_ctx) for host in self.hosts
                               if host.up and host.serves(model) and 0 < host.limit.to_count < lines))
        self._wake()
        return seconds

    @staticmethod
    async def _count(host: Host, model: str, num_ctx: int | None) -> None:
        """Count the slots of an engine that tells none, where its backend can (``count_slots``)."""
        most = host.limit.to_count
        slots = await count_slots(host.backend, model, num_ctx=num_ctx, most=most)
        if slots is not None:
            host.limit.counted(slots, most, f"counted: {host.url} ran {slots if slots < most else 'all'} of {most} "
                                            f"short requests sent together at once")

    # --------------------------------------------------------------------------- the Backend protocol

    async def complete(self, url: str, body: dict[str, Any], *, num_ctx: int | None = None,
                       stream: bool = False) -> Result:
        lease = await self.lease(body.get("model") if isinstance(body.get("model"), str) else None)
        try:
            result = await lease.host.backend.complete(url, body, num_ctx=num_ctx, stream=stream)
        except errors.BackendError as exc:
            lease.release(error=exc)
            raise
        except BaseException:
            lease.release()
            raise
        lease.release(work=float(result.timings.completion_tokens or 1))
        return result

    def stream_chat(self, body: dict[str, Any], *, num_ctx: int | None = None) -> AsyncIterator[dict[str, Any]]:
        return self._leased(body, lambda backend: backend.stream_chat(body, num_ctx=num_ctx))

    def stream_completion(self, body: dict[str, Any], *, num_ctx: int | None = None
                          ) -> AsyncIterator[dict[str, Any]]:
        return self._leased(body, lambda backend: backend.stream_completion(body, num_ctx=num_ctx))

    async def _leased(self, body: dict[str, Any], open_stream: Callable[[Backend], AsyncIterator[dict[str, Any]]]
                      ) -> AsyncIterator[dict[str, Any]]:
        """A stream from a host serving the body's model, holding one of its slots until the stream ends."""
        lease = await self.lease(body.get("model") if isinstance(body.get("model"), str) else None)
        try:
            async for chunk in open_stream(lease.host.backend):
                yield chunk
        finally:
            lease.release()

    async def models(self) -> list[ModelInfo]:
        seen: dict[str, ModelInfo] = {}
        for host in self.hosts:
            try:
                listed = await host.backend.models()
            except errors.BackendError as exc:
                host.error = exc.message
                continue
            host.models = {m.id for m in listed}
            for info in listed:
                seen.setdefault(info.id, info)
        return list(seen.values())

    async def show(self, model: str) -> ModelInfo:
        return await self.route(model)

    async def slots(self) -> int | None:
        counts = [await h.backend.slots() for h in self.hosts]
        return sum(c for c in counts if c) or None

    async def loaded_context(self, model: str) -> int | None:
        """The context the first host serving ``model`` really loaded (hosts of one pool load the same fit)."""
        for host in self.hosts:
            if host.up and host.serves(model) and (found := await loaded_context(host.backend, model)):
                return found
        return None

    async def version(self) -> str | None:
        """Each host's version; the pool is unreachable only when every host is (its first error is raised)."""
        versions: list[str] = []
        failures: list[errors.BackendError] = []
        for host in self.hosts:
            try:
                versions.append(await host.backend.version() or "?")
            except errors.BackendError as exc:
                failures.append(exc)
                versions.append("unreachable")
        if len(failures) == len(self.hosts):
            raise failures[0]
        return ", ".join(versions)

    async def aclose(self) -> None:
        """``stop``, then close the hosts' clients."""
        await self.stop()
        for host in self.hosts:
            await host.backend.aclose()

    async def stop(self) -> None:
        """Stop the outage watch and the drained hosts' probes, and start none after: a task asking a host after
        its client closed would open a new session that nothing closes. A pool made around a backend
        (``Pool.of``) is stopped by whoever made it before the backend's owner closes the backend; a new lease
        starts it again."""
        self._stopped = True
        tasks = [t for t in (self._watch, *(host._probe for host in self.hosts)) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._watch = None
        for host in self.hosts:
            host._probe = None


def fixed(backend: Backend, level: int) -> Pool:
    """A pool of one host held at ``level`` (benchmarks pin their levels)."""
    pool = Pool([backend], concurrency=level)
    assert isinstance(pool.hosts[0].limit, FixedLimit)
    return pool
