"""Helpers shared by tests: batch-line builders, file writers, executed-notebook outputs."""

from __future__ import annotations

import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import nbformat
import orjson
from aiohttp import web

from obatch.concurrency import Change

ROOT = Path(__file__).resolve().parents[1]


def chat_line(custom_id: str, content: str = "hello", *, model: str = "llama3.2:1b", **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": content}], **body}}


def jsonl(lines: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def write_jsonl(path: Path, lines: Iterable[dict[str, Any]]) -> Path:
    path.write_bytes(jsonl(lines))
    return path


def notebook_outputs(path: Path) -> list[str]:
    """Every code cell's displayed text (plain and HTML) of an executed notebook, in order; a cell error raises."""
    notebook = nbformat.read(path, as_version=4)
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "error":
                raise AssertionError(f"{path.name}: {output.ename}: {output.evalue}")
            data = output.get("data", {})
            texts.append(str(data.get("text/html", "")) + str(data.get("text/plain", output.get("text", ""))))
    return texts


class Scripted:
    """A loopback HTTP server whose every answer a test scripts: ``answer(path, json_body) -> (status, payload)``
    (JSON, or bytes sent as an event stream).

    ``async with Scripted(answer) as url`` — the backends' own HTTP client then talks to it for real."""

    def __init__(self, answer: Callable[[str, Any], tuple[int, Any]]) -> None:
        self.answer = answer
        self.runner: web.AppRunner | None = None

    async def __aenter__(self) -> str:
        async def handle(request: web.Request) -> web.StreamResponse:
            raw = await request.read()
            status, payload = self.answer(request.path, orjson.loads(raw) if raw else None)
            if isinstance(payload, bytes):  # a scripted event stream, sent as it is
                return web.Response(status=status, body=payload, content_type="text/event-stream")
            return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def succeeded_rows(db: Path) -> int:
    """Succeeded request rows in a SQLite store (0 while it is not there yet)."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return int(conn.execute("SELECT count(*) FROM requests WHERE state='succeeded'").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def sigkill_once_done(args: list[str], env: dict[str, str], db: Path, done: int) -> None:
    """Start the command and SIGKILL it once ``done`` lines of its store have succeeded (within a minute)."""
    victim = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while succeeded_rows(db) < done:
        assert victim.poll() is None, victim.stderr.read() if victim.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    if victim.stderr:
        victim.stderr.close()


def killable_run(path: Path, url: str, work: Path) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of an ``obatch run`` of ``path`` on the Ollama at ``url``, into ``work``'s out.jsonl,
    err.jsonl and data/ store, committing often. The killed run's lease stays until it expires: the rerun waits for
    it (a short one here)."""
    args = [sys.executable, "-m", "obatch.cli", "run", str(path), "-o", str(work / "out.jsonl"), "-e",
            str(work / "err.jsonl"), "--backend", "ollama", "--url", url, "--data-dir", str(work / "data"), "-c", "4",
            "-q"]
    env = {**os.environ, "OBATCH_COMMIT_INTERVAL": "0.05", "OBATCH_COMMIT_EVERY": "4", "OBATCH_LEASE_TTL": "2",
           "OBATCH_LEASE_HEARTBEAT": "0.5"}
    return args, env


def checks_held(history: list[Change], slots: int) -> list[float]:
    """Asserts that after ``slots`` were learnt the level went above them only by one, to check them, and each
    check ended back at them with the next one later than the last (the hold doubles); returns when each began."""
    above = [i for i, c in enumerate(history) if c.level > slots]
    assert all(history[i].level == slots + 1 and "once above the slots read" in history[i].reason
               for i in above), history
    assert all(history[i + 1].level == slots and history[i + 1].reason.startswith(f"kept {slots}")
               for i in above if i + 1 < len(history)), history
    began = [history[i].at for i in above]
    gaps = [b - a for a, b in itertools.pairwise([history[0].at, *began])]
    assert all(later > 1.5 * earlier for earlier, later in itertools.pairwise(gaps[1:])), history
    return began
