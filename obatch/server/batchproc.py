"""The server's batches in a child process: ``obatch serve`` answers the API, a supervised child drives the batches.

Driving batches flat out is CPU work (building, sending and parsing engine requests, committing results). In the
API's process, even on a loop of its own in a thread, every API request waited for the GIL behind it, and on a small
machine for the CPU as well (``perf/responsiveness.py``). In a process of its own, at a lower CPU priority
(``OBATCH_WORKER_NICE``: batch work is background work, the API is interactive), the API answers as if idle.

The child is an ordinary ``BatchWorker`` on the same store: leases (``obatch.lease``) keep a batch to one driver, as
with several servers. It is started and stopped with the server, started again when it dies (holding the server's
lease owner id, so it takes its predecessor's batches back at once), and dies with the server: SIGTERM on the
parent's death (Linux ``PR_SET_PDEATHSIG``) and, anywhere, the end of its stdin.

The pipe between them: the server writes the settings (one JSON line) and then ``k`` (look for new batches now) or
``s`` (report); the child answers each ``s``, and once when ready, with one JSON line: its engine hosts as its pool
sees them (levels learned there, for ``/health``), the batches it drives, and its engine-latency histogram's samples
(for ``/metrics``). The child's stdout is the pipe; its logs go to stderr, which it shares with the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from pydantic import SecretStr

from obatch import _loop, batches
from obatch.backends import Backend, open_backend
from obatch.backends.pool import Pool
from obatch.bench.estimate.request import estimate_json_for_batch
from obatch.config import Settings
from obatch.server.metrics import Metrics
from obatch.store import db
from obatch.worker import BatchWorker

log = logging.getLogger("obatch.worker")

READY_TIMEOUT = 120.0  # seconds the child may take to import, open the store and the engine client
STOP_TIMEOUT = 20.0  # seconds the child may take to stop its batches before it is killed
REPORT_TIMEOUT = 2.0  # seconds /health waits for a fresh report before showing the last one
_PR_SET_PDEATHSIG = 1


def batch_services(settings: Settings, sessions: db.Sessions, client: Backend, metrics: Metrics
                   ) -> batches.Services:
    """What batch work needs: every engine host metered, each at the server's level (fixed or auto)."""
    level = settings.server_concurrency or settings.concurrency
    metered = client.mapped(metrics.wrap) if isinstance(client, Pool) else metrics.wrap(client)
    return batches.Services(settings.model_copy(update={"concurrency": level}), sessions, metered,
                            estimator=estimate_json_for_batch)


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    return str(value) if isinstance(value, Path) else value


class ProcessWorker(BatchWorker):
    """The server's side of the child: spawns it, passes ``kick`` on, asks for reports, restarts it when it dies."""

    def __init__(self, settings: Settings, *, owner: str, metrics: Metrics) -> None:
        """``settings``: the API process's, its backend pinned to the kind it opened (``pinned_settings``)."""
        self._config = orjson.dumps({"settings": {k: _plain(v) for k, v in settings.model_dump().items()},
                                     "owner": owner}) + b"\n"
        self._nice = settings.worker_nice
        self._metrics = metrics
        self._proc: asyncio.subprocess.Process | None = None
        self._reports: list[asyncio.Future[None]] = []
        self._report: dict[str, Any] = {}
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pool(self) -> Pool | None:
        return None  # the pool lives in the child: see ``describe``

    @property
    def running(self) -> list[str]:
        return list(self._report.get("running", []))

    def describe(self) -> list[dict[str, Any]] | None:
        hosts = self._report.get("hosts")
        return list(hosts) if hosts is not None else None

    async def start(self) -> None:
        if self._supervisor is None:
            proc = await self._spawn()
            self._supervisor = asyncio.create_task(self._watch(proc), name="obatch-batch-process")
            try:
                await asyncio.wait_for(self._wait_report(), READY_TIMEOUT)
            except BaseException:
                await self.stop()
                raise

    def kick(self) -> None:
        self._send(b"k\n")

    async def refresh(self) -> None:
        """Ask the child for a fresh report (the hosts' counts and levels change by the second)."""
        if self._send(b"s\n"):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wait_report(), REPORT_TIMEOUT)

    async def stop(self) -> None:
        """Close the child's stdin (it stops its batches and releases their leases), kill it if it lingers."""
        self._stopping = True
        if self._supervisor is not None:  # first, so that no new child is started meanwhile
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        self._supervisor = None
        proc = self._proc
        if proc is not None and proc.returncode is None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                log.warning("batch process did not stop in time; killing it", extra={"pid": proc.pid})
                proc.kill()
                await proc.wait()

    def _send(self, line: bytes) -> bool:
        proc = self._proc
        if proc is None or proc.returncode is not None or proc.stdin is None or proc.stdin.is_closing():
            return False
        proc.stdin.write(line)
        return True

    async def _wait_report(self) -> None:
        future = asyncio.get_running_loop().create_future()
        self._reports.append(future)
        try:
            await future
        finally:
            with contextlib.suppress(ValueError):  # answered (the list was swapped) or given up on
                self._reports.remove(future)

    async def _spawn(self) -> asyncio.subprocess.Process:
        env = {**os.environ, "OBATCH_PARENT_PID": str(os.getpid()), "OBATCH_WORKER_NICE": str(self._nice)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "obatch.server.batchproc", env=env, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, limit=64 << 20)
        assert proc.stdin is not None
        proc.stdin.write(self._config)
        self._proc = proc
        log.info("batch process started", extra={"pid": proc.pid})
        return proc

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        delay = 1.0
        while True:
            started = time.monotonic()
            assert proc.stdout is not None
            while line := await proc.stdout.readline():
                self._report = orjson.loads(line)
                self._metrics.remote_backend_samples = self._report.get("latency", [])
                reports, self._reports = self._reports, []
                for future in reports:
                    if not future.done():
                        future.set_result(None)
            code = await proc.wait()
            if self._stopping:
                return
            for future in self._reports:
                if not future.done():
                    future.set_exception(RuntimeError(f"the batch process exited with {code}"))
            self._reports = []
            delay = 1.0 if time.monotonic() - started > 60 else min(delay * 2, 30.0)
            log.error("batch process exited; starting another", extra={"code": code, "after_seconds": delay})
            await asyncio.sleep(delay)
            if self._stopping:
                return
            proc = await self._spawn()


# ------------------------------------------------------------------------------------------------ the child


def _die_with_parent(parent: int) -> None:
    """SIGTERM when the server dies (Linux); elsewhere the end of stdin tells the same, a moment later."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the line above
        raise SystemExit(0)


async def _child(out: int) -> None:
    from obatch.server.observe import configure_logging

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    config = orjson.loads(await reader.readline() or b"{}")
    if not config:
        return
    settings = Settings(_env_file=None, **config["settings"])
    configure_logging(settings.log_level)
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    engine = db.create_engine(settings.db_url)
    client = await open_backend(settings)
    metrics = Metrics()
    try:
        svc = batch_services(settings, db.sessions(engine), client, metrics)
        svc.owner = str(config["owner"])
        worker = BatchWorker(svc, poll_interval=settings.worker_poll_interval)
        writer_transport, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(out, "wb"))

        def report() -> None:
            latency = [[s.name, s.labels, s.value] for family in metrics.backend_seconds.collect()
                       for s in family.samples]
            writer_transport.write(orjson.dumps({"hosts": worker.describe(), "running": worker.running,
                                                 "latency": latency}, default=str) + b"\n")

        async def listen() -> None:
            while line := await reader.readline():
                if line == b"k\n":
                    worker.kick()
                elif line == b"s\n":
                    report()
            stopping.set()  # stdin closed: the server stops, or died

        await worker.start()
        report()  # ready
        listener = asyncio.create_task(listen())
        try:
            await stopping.wait()
        finally:
            listener.cancel()
            await worker.stop()
            await svc.pool.stop()
    finally:
        await client.aclose()
        await engine.dispose()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server stops us in order
    _die_with_parent(int(os.environ.get("OBATCH_PARENT_PID", os.getppid())))
    with contextlib.suppress(OSError):
        os.nice(int(os.environ.get("OBATCH_WORKER_NICE", "0")))
    out = os.dup(1)
    os.dup2(2, 1)  # anything printed goes to the log, not into the pipe
    _loop.run(_child(out))


if __name__ == "__main__":
    main()
