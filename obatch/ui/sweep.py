"""Small benchmark sweeps started from the UI, and the estimate-vs-actual record.

The server has no sweep endpoint, so a sweep is ``obatch bench`` in a subprocess of the UI (it outlives the browser
tab). It inherits the UI's environment and working directory, so under ``make serve`` / ``obatch ui`` it measures
the server's backend and stores its points where the server reads them (``OBATCH_DATA_DIR``, default ``./data``).
Progress is what the server's benchmark API already shows: the points of this sweep stored so far.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import polars as pl

from obatch.client import Client, ClientError

WORKLOADS = ("tiny", "short", "chat", "long-prompt", "long-output")
NUM_CTX_CHOICES = (1024, 2048, 4096, 8192, 16384, 32768)
CONCURRENCY_CHOICES = (1, 2, 4, 8, 16)
TAIL = 6000


@dataclass(frozen=True)
class SweepPlan:
    """What the form asks for; ``points`` is how many configurations ``obatch bench`` will measure."""

    models: tuple[str, ...]
    num_ctx: tuple[int, ...]
    concurrency: tuple[int, ...]
    requests: int = 8
    workload: str = "short"
    name: str = "ui"

    @property
    def points(self) -> int:
        return len(self.models) * len(set(self.num_ctx)) * len(set(self.concurrency))

    def problem(self) -> str | None:
        """Why the sweep cannot start, or None."""
        if not self.models:
            return "Pick at least one model."
        if not self.num_ctx or not self.concurrency:
            return "Pick at least one context window and one concurrency level."
        if self.requests < 1:
            return "Measure at least one request per point."
        return None

    def command(self, *, python: str | None = None, extra: Sequence[str] = ()) -> list[str]:
        args = [python or sys.executable, "-m", "obatch", "bench"]
        for model in self.models:
            args += ["--model", model]
        args += ["--num-ctx", ",".join(map(str, sorted(set(self.num_ctx)))),
                 "--concurrency", ",".join(map(str, sorted(set(self.concurrency)))),
                 "--requests", str(self.requests), "--workload", self.workload, "--name", self.name, "--quiet",
                 *extra]
        return args


@dataclass
class SweepJob:
    """A running (or finished) ``obatch bench`` child and where its output goes."""

    plan: SweepPlan
    process: subprocess.Popen[bytes]
    log_path: Path
    started: float
    log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def output(self) -> str:
        """The tail of what the sweep printed (its summary table at the end, or its error)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-TAIL:]

    def finish(self) -> None:
        """Reap the child once it is done and close its log (no zombie, no open file)."""
        if self.process.poll() is not None:
            self.process.wait()
            if self.log is not None and not self.log.closed:
                self.log.close()

    def stop(self) -> None:
        if self.running:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.finish()


def start_sweep(plan: SweepPlan, *, env: Mapping[str, str] | None = None, cwd: Path | None = None,
                extra: Sequence[str] = ()) -> SweepJob:
    """Start ``obatch bench`` for the plan; stdout and stderr go to a temporary log file."""
    handle, name = tempfile.mkstemp(prefix="obatch-sweep-", suffix=".log")
    log = os.fdopen(handle, "wb")
    process = subprocess.Popen(plan.command(extra=extra), stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, env=dict(os.environ if env is None else env),
                               cwd=str(cwd) if cwd else None)
    return SweepJob(plan, process, Path(name), time.time(), log)


def measured_points(plan: SweepPlan, points: pl.DataFrame, since: float) -> int:
    """How many of the plan's configurations have a point stored since the sweep started."""
    if points.is_empty():
        return 0
    fresh = points.filter(
        pl.col("model").is_in(list(plan.models)) & pl.col("num_ctx").is_in(list(plan.num_ctx))
        & pl.col("concurrency").is_in(list(plan.concurrency)) & (pl.col("created_at") >= since - 1.0))
    return min(plan.points, fresh.select("model", "num_ctx", "concurrency").unique().height)


def sweep_progress(api: Client, job: SweepJob) -> int:
    """The sweep's points the server already shows (0 when it cannot tell)."""
    from obatch.ui.views import bench_frame

    frames = []
    for model in job.plan.models:
        try:
            frames.append(bench_frame(api.benchmark_history(model), model=model))
        except ClientError:
            return 0
    return measured_points(job.plan, pl.concat(frames) if frames else bench_frame([]), job.started)


def estimate_records(api: Client) -> list[dict[str, Any]]:
    """Finished batches' estimate vs actual, from the server (empty when it keeps none)."""
    try:
        body = api.estimate_history()
    except ClientError:
        return []
    return [d for d in _records(body) if isinstance(d, dict)]


def _records(body: Any) -> Iterable[Any]:
    if isinstance(body, Mapping):
        return body.get("data") or []
    return body if isinstance(body, list) else []
