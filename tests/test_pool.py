"""A pool of engine hosts: one shared queue over hosts of different speeds, a host killed mid-batch, per-host models.

Each host is an Ollama simulator on loopback; the batch goes through the notebook/CLI path (``run_batch_file``)
with ``OBATCH_OLLAMA_URL`` holding both URLs, as a user with two GPUs would configure it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from obatch import errors
from obatch.api import run_batch_file
from obatch.backends import open_backend, pinned_settings
from obatch.backends import pool as pool_module
from obatch.backends.base import capabilities_of
from obatch.backends.local import LocalBackend
from obatch.backends.ollama import OllamaBackend
from obatch.config import Settings
from obatch.testing.ollama_sim import OllamaSim, SimConfig, SimModel
from tests.helpers import chat_line, write_jsonl


def output_ids(path: Path) -> Counter[str]:
    return Counter(orjson.loads(line)["custom_id"] for line in path.read_bytes().splitlines())


async def test_two_hosts_share_one_queue_by_their_speed(tmp_path: Path, make_settings: Callable[..., Settings]
                                                        ) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"r{i}", max_tokens=16) for i in range(300)])
    async with OllamaSim(SimConfig(num_parallel=1, decode_tps=400)) as slow, \
            OllamaSim(SimConfig(num_parallel=4, decode_tps=400)) as fast:
        settings = make_settings(f"{slow.url},{fast.url}", concurrency=4)
        report = await run_batch_file(path, settings=settings, progress=False)
    assert report.batch.completed == 300 and report.batch.failed == 0
    assert output_ids(report.output) == Counter({f"r{i}": 1 for i in range(300)})
    assert slow.stats.served > 0 and fast.stats.served > 2 * slow.stats.served  # the faster host took more
    assert slow.stats.served + fast.stats.served == 300  # nothing ran twice
    hosts = orjson.loads(report.batch.concurrency_json or "{}")["hosts"]
    assert {h["url"] for h in hosts} == {slow.url, fast.url}


async def test_a_host_killed_mid_batch_is_drained_and_every_line_ends_once(
        tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"r{i}", max_tokens=16) for i in range(300)])
    async with OllamaSim(SimConfig(num_parallel=2, decode_tps=400)) as keeper:
        doomed = OllamaSim(SimConfig(num_parallel=2, decode_tps=400))
        await doomed.start()
        settings = make_settings(f"{keeper.url},{doomed.url}", max_attempts=6)
        run = asyncio.create_task(run_batch_file(path, settings=settings, progress=False))
        while doomed.stats.served < 20:  # noqa: ASYNC110 (polling the simulator's counters)
            await asyncio.sleep(0.01)
        await doomed.stop()
        report = await run
    assert report.batch.completed == 300 and report.batch.failed == 0
    assert output_ids(report.output) == Counter({f"r{i}": 1 for i in range(300)})
    hosts = {h["url"]: h for h in orjson.loads(report.batch.concurrency_json or "{}")["hosts"]}
    assert hosts[doomed.url]["state"] == "down" and hosts[keeper.url]["state"] == "up"
    assert keeper.stats.served + doomed.stats.served >= 300


async def test_a_drained_host_rejoins_when_it_answers_again(tmp_path: Path,
                                                            make_settings: Callable[..., Settings]) -> None:
    lines = [chat_line(f"r{i}", max_tokens=16) for i in range(600)]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    async with OllamaSim(SimConfig(num_parallel=1, decode_tps=200)) as keeper:
        flaky = OllamaSim(SimConfig(num_parallel=2, decode_tps=400))
        await flaky.start()
        port = flaky.port
        settings = make_settings(f"{keeper.url},{flaky.url}", concurrency=2, max_attempts=6)
        run = asyncio.create_task(run_batch_file(path, settings=settings, progress=False))
        while flaky.stats.served < 10:  # noqa: ASYNC110 (polling the simulator's counters)
            await asyncio.sleep(0.01)
        await flaky.stop()
        await asyncio.sleep(1.0)  # drained by now, and probed with backoff
        back = OllamaSim(SimConfig(num_parallel=2, decode_tps=400), port=port)
        await back.start()
        report = await run
        await back.stop()
    assert report.batch.completed == 600 and report.batch.failed == 0
    assert back.stats.served > 0  # it took lines again after it came back
    assert output_ids(report.output) == Counter({f"r{i}": 1 for i in range(600)})


async def test_a_line_goes_only_to_hosts_that_have_its_model(tmp_path: Path,
                                                             make_settings: Callable[..., Settings]) -> None:
    lines = [chat_line(f"a{i}", model="alpha") for i in range(40)]
    lines += [chat_line(f"b{i}", model="beta") for i in range(40)]
    lines += [chat_line("nowhere", model="gamma")]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    async with OllamaSim(SimConfig(models=(SimModel("alpha"),), num_parallel=2)) as host_a, \
            OllamaSim(SimConfig(models=(SimModel("beta"),), num_parallel=2)) as host_b:
        report = await run_batch_file(path, settings=make_settings(f"{host_a.url},{host_b.url}"), progress=False)
    assert report.batch.completed == 80 and report.batch.failed == 1
    # each host's lines went there only (its slots were counted with /api/generate, the lines are /api/chat)
    assert host_a.stats.requests["/api/chat"] == 40 and host_b.stats.requests["/api/chat"] == 40
    failed = [orjson.loads(line) for line in report.errors.read_bytes().splitlines()]
    assert [f["custom_id"] for f in failed] == ["nowhere"]
    assert failed[0]["error"]["code"] == "model_not_found"


async def test_a_pool_is_unreachable_only_when_every_host_is(make_settings: Callable[..., Settings]) -> None:
    async with OllamaSim(SimConfig()) as up:
        down = OllamaSim(SimConfig())
        await down.start()
        await down.stop()  # a port that refuses connections
        pool = await open_backend(make_settings(f"{up.url},{down.url}"))
        try:
            assert (await pool.version() or "").endswith(", unreachable")
        finally:
            await pool.aclose()
        pool = await open_backend(make_settings(f"{down.url},{down.url}"))
        try:
            with pytest.raises(errors.BackendError):
                await pool.version()
        finally:
            await pool.aclose()


async def test_batches_elsewhere_open_the_engines_the_server_found(make_settings: Callable[..., Settings]) -> None:
    """What ``auto`` found is pinned for a batch process or thread (it does not look again); a pool of two kinds keeps
    ``auto``. Only a backend that owns its engine keeps its batches beside it, a pool of clients does not."""
    async with OllamaSim(SimConfig()) as sim:
        auto = make_settings(sim.url, backend="auto", openai_base_url=None)
        found = await open_backend(auto)
        try:
            assert found.name == "ollama" and pinned_settings(auto, found).backend == "ollama"
            assert not capabilities_of(found).embedded
        finally:
            await found.aclose()
        mixed = await open_backend(make_settings(sim.url, backend="auto", openai_base_url=f"{sim.url}/v1"))
        try:
            assert isinstance(mixed, pool_module.Pool) and pinned_settings(auto, mixed).backend == "auto"
            assert not mixed.capabilities.embedded
        finally:
            await mixed.aclose()
    assert LocalBackend.capabilities.embedded


async def test_a_busy_host_is_not_sent_more_than_it_holds(tmp_path: Path, make_settings: Callable[..., Settings],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine with one slot and no queue answers 503 to everything beyond it. At a fixed level of 8 each refusal
    used to free a slot for the next line, refused in turn; now a refusal makes no room for a moment."""
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"r{i}", max_tokens=16) for i in range(20)])

    async def refusals() -> int:
        async with OllamaSim(SimConfig(num_parallel=1, max_queue=0, decode_tps=400)) as sim:
            settings = make_settings(sim.url, concurrency=8, max_attempts=1000, commit_every=1)
            report = await run_batch_file(path, settings=settings, progress=False)
        assert report.batch.completed == 20 and output_ids(report.output) == Counter({f"r{i}": 1 for i in range(20)})
        return sim.stats.busy_503

    paused = await refusals()
    monkeypatch.setattr(pool_module, "BUSY_PAUSE", 0.0)
    monkeypatch.setattr(pool_module, "BUSY_PAUSE_MAX", 0.0)
    unpaused = await refusals()
    assert paused < 60 and unpaused > 3 * paused, (paused, unpaused)


async def test_a_closed_pool_asks_no_host_when_a_late_attempt_fails() -> None:
    """An attempt that ends after the pool closed, with its host silent, starts no outage watch: the watch would
    ask the host on a closed client, which opens a new session that nothing closes."""
    backend = OllamaBackend("http://127.0.0.1:9")  # nothing listens there
    pool = pool_module.Pool([backend], concurrency=4)
    leases = [await pool.lease(None) for _ in range(pool_module.SILENT_TO_WAIT)]
    await pool.aclose()
    for lease in leases:
        lease.release(error=errors.TransientError("Connection to the engine failed: refused"))
    await asyncio.sleep(pool_module.WATCH_INITIAL * 2)
    assert pool.outages.ongoing  # the silence is still recorded
    assert pool._watch is None and backend._client._session is None


async def test_a_run_stops_the_pool_around_its_backend_before_the_backend_closes(
        make_settings: Callable[..., Settings]) -> None:
    """One engine host is a bare backend; the run's services make a pool around it, and the outage watch that pool
    started must end with the run, not ask the host on its closed client afterwards."""
    from obatch.api import _services

    async with _services(make_settings("http://127.0.0.1:9", concurrency=4), None) as svc:
        pool = svc.pool
        backend = pool.hosts[0].backend
        assert isinstance(backend, OllamaBackend) and svc.backend is backend
        for lease in [await pool.lease(None) for _ in range(pool_module.SILENT_TO_WAIT)]:
            lease.release(error=errors.TransientError("Connection to the engine failed: refused"))
        assert pool._watch is not None  # the host is silent: the watch runs
    await asyncio.sleep(pool_module.WATCH_INITIAL * 2)
    assert pool._watch is None and backend._client._session is None
    again = await pool.lease(None)  # a pool used again watches again
    again.release(error=errors.TransientError("refused"))
    again = await pool.lease(None)
    again.release(error=errors.TransientError("refused"))
    assert pool._watch is not None
    await pool.aclose()
