"""Crash safety: ``obatch serve`` killed with SIGKILL mid-batch, started again on the same data directory; the batch
resumes and every input custom_id ends in exactly one of the two result files, once."""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from obatch.testing.ollama_sim import OllamaSim
from tests.helpers import jsonl
from tests.serverkit import (
    ADMIN_KEY,
    FINAL,
    KEYS,
    ServerProcess,
    assert_exactly_once,
    chat_line,
    parse_jsonl,
    server_env,
)


def test_sigkill_mid_batch_loses_and_doubles_nothing(obatch_sim: OllamaSim, tmp_path: Path, db_url: str | None
                                                     ) -> None:
    env = server_env(tmp_path / "data", obatch_sim.url, api_keys=KEYS["alice"], database_url=db_url)
    lines = [chat_line(f"c{i}", max_tokens=30) for i in range(48)]  # 0.15 s each, 4 at a time: ~2 s of work
    lines += [chat_line("doomed", model="no-such-model")]
    expected = [str(line["custom_id"]) for line in lines]

    server = ServerProcess.start(tmp_path / "data", env)
    try:
        with OpenAI(base_url=server.v1, api_key=KEYS["alice"], max_retries=0) as client:
            file_id = client.files.create(file=("crash.jsonl", io.BytesIO(jsonl(lines))), purpose="batch").id
            batch_id = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                             completion_window="24h").id
            deadline = time.monotonic() + 20
            while (counts := client.batches.retrieve(batch_id).request_counts) is None or counts.completed < 8:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        server.kill()
        assert server.proc.returncode == -9
    finally:
        server.kill()

    restarted = ServerProcess.start(tmp_path / "data", env)
    try:
        with OpenAI(base_url=restarted.v1, api_key=KEYS["alice"], max_retries=0) as client:
            batch = client.batches.retrieve(batch_id)
            assert batch.status == "in_progress"  # left as it was; the new worker picks it up
            deadline = time.monotonic() + 30
            while batch.status not in FINAL:
                assert time.monotonic() < deadline, batch
                time.sleep(0.1)
                batch = client.batches.retrieve(batch_id)
            assert batch.status == "completed", batch
            assert batch.request_counts is not None
            assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (
                49, 48, 1)
            output = parse_jsonl(client.files.content(batch.output_file_id or "").text)
            errors = parse_jsonl(client.files.content(batch.error_file_id or "").text)
        assert_exactly_once(expected, output, errors)
        assert [e["custom_id"] for e in errors] == ["doomed"]
    finally:
        restarted.stop()
    # SIGTERM shuts down cleanly (uvicorn re-raises the signal once the app's lifespan has ended).
    assert restarted.proc.returncode in (0, -15) and "Application shutdown complete." in restarted.log()


def children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_batch_process_is_niced_restarted_and_dies_with_the_server(obatch_sim: OllamaSim, tmp_path: Path
                                                                      ) -> None:
    """The server's batches run in a child at a lower CPU priority; a killed child is replaced (and /health shows
    the new child's hosts); a SIGKILLed server takes its child with it."""
    env = server_env(tmp_path / "data", obatch_sim.url, api_keys=KEYS["alice"], admin_keys=ADMIN_KEY)
    server = ServerProcess.start(tmp_path / "data", env)
    try:
        [first] = children(server.proc.pid)
        assert os.getpriority(os.PRIO_PROCESS, first) - os.getpriority(os.PRIO_PROCESS, server.proc.pid) == 10
        os.kill(first, signal.SIGKILL)
        with OpenAI(base_url=server.v1, api_key=KEYS["alice"], max_retries=0) as client:
            file_id = client.files.create(file=("after.jsonl", io.BytesIO(jsonl(
                chat_line(f"a{i}", max_tokens=4) for i in range(20)))), purpose="batch").id
            batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                          completion_window="24h")
            wait_for(lambda: client.batches.retrieve(batch.id).status in FINAL)
            assert client.batches.retrieve(batch.id).status == "completed"
        hosts = httpx.get(f"{server.url}/health", headers={"Authorization": f"Bearer {ADMIN_KEY}"}  # hosts: admin
                          ).json()["backend"]["hosts"]
        assert sum(h["served"] for h in hosts) == 20  # counted by the new child, which ran the whole batch
        [second] = children(server.proc.pid)
        assert second != first and "batch process exited; starting another" in server.log()
        server.kill()
        wait_for(lambda: not alive(second), timeout=10)
    finally:
        server.kill()
