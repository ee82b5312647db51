"""``obatch run`` from the command line: refusal of invalid files, resume after SIGKILL, exactly-once output."""

from __future__ import annotations

import sqlite3
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from obatch.cli import main
from obatch.testing.ollama_sim import SimConfig, run_in_thread
from tests.helpers import chat_line, killable_run, sigkill_once_done, succeeded_rows, write_jsonl


def ids_in(*paths: Path) -> Counter[str]:
    return Counter(orjson.loads(line)["custom_id"] for path in paths for line in path.read_bytes().splitlines())


def test_invalid_file_is_refused_before_any_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(orjson.dumps(chat_line("a")) + b"\n{broken\n" + orjson.dumps({**chat_line("c"), "url": "/x"})
                     + b"\n")
    url, stop = run_in_thread()
    try:
        code = main(["run", str(path), "--backend", "ollama", "--url", url, "--data-dir", str(tmp_path / "d"), "-q"])
    finally:
        stop()
    err = capsys.readouterr().err
    assert code == 2
    assert "line 2: [invalid_json_line]" in err and "line 3: [invalid_url]" in err


def test_a_batch_failed_by_the_store_reports_its_stored_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose batch ends ``failed`` (here: given up on by another process) raises with the problems the store
    holds, and the CLI prints each."""
    from obatch import api
    from obatch.store import repo

    async def given_up(svc: Any, batch_id: str, **_: Any) -> Any:
        async with svc.sessions() as session:
            await repo.mark_failed(session, batch_id, "internal_error", "The worker gave up.", at=1)
            await session.commit()
            return await repo.get_batch(session, batch_id)

    monkeypatch.setattr(api, "process", given_up)
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line("a")])
    code = main(["run", str(path), "--backend", "ollama", "--url", "http://127.0.0.1:9", "--data-dir",
                 str(tmp_path / "d"), "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines()[1:] == ["  file: [internal_error] The worker gave up."], err


def test_run_with_30_percent_transient_faults(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OBATCH_RETRY_INITIAL_WAIT", "0.01")
    monkeypatch.setenv("OBATCH_RETRY_MAX_WAIT", "0.1")
    lines = [chat_line(f"r{i}", max_tokens=3) for i in range(500)] + [chat_line("x", model="ghost")]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    url, stop = run_in_thread(SimConfig(num_parallel=8, error_rate=0.15, reset_rate=0.15, seed=5))
    try:
        code = main(["run", str(path), "-o", str(tmp_path / "out.jsonl"), "-e", str(tmp_path / "err.jsonl"),
                     "--backend", "ollama", "--url", url, "--data-dir", str(tmp_path / "d"), "-c", "8", "-q"])
    finally:
        stop()
    assert code == 0
    assert ids_in(tmp_path / "out.jsonl") == Counter(f"r{i}" for i in range(500))
    assert ids_in(tmp_path / "err.jsonl") == Counter(["x"])  # only the permanent error
    assert "500 succeeded, 1 failed of 501" in capsys.readouterr().out


def test_sigkill_mid_batch_then_rerun_resumes_exactly_once(tmp_path: Path) -> None:
    n = 120
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"r{i}", f"q{i}", max_tokens=8) for i in range(n)])
    url, stop = run_in_thread(SimConfig(num_parallel=4, decode_tps=300))
    data = tmp_path / "data"
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    args, env = killable_run(path, url, tmp_path)
    try:
        sigkill_once_done(args, env, data / "obatch.db", 20)
        done_before = succeeded_rows(data / "obatch.db")
        assert 20 <= done_before < n and not out.exists()

        rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    finally:
        stop()
    assert rerun.returncode == 0, rerun.stderr
    assert ids_in(out) == Counter(f"r{i}" for i in range(n))
    assert err.read_bytes() == b""
    with sqlite3.connect(data / "obatch.db") as conn:
        assert conn.execute("SELECT count(*) FROM batches").fetchone()[0] == 1  # resumed, not started again
        assert conn.execute("SELECT count(*) FROM requests").fetchone()[0] == n
    assert f"{n} succeeded, 0 failed of {n}" in rerun.stdout


def test_models_lists_each_models_trained_context(capsys: pytest.CaptureFixture[str]) -> None:
    """Ollama's model list (``/api/tags``) has no context length: ``obatch models`` asks the engine for each."""
    from obatch.testing.ollama_sim import _default_models

    url, stop = run_in_thread()
    try:
        code = main(["models", "--backend", "ollama", "--url", url])
    finally:
        stop()
    out = capsys.readouterr().out
    assert code == 0
    rows = {line.split()[0].removesuffix(":latest"): line for line in out.splitlines() if line.startswith("  ")}
    assert {m.name: f"context {m.context_length}" in rows[m.name] for m in _default_models()} == {
        m.name: True for m in _default_models()}, out
