"""Both benchmark notebooks executed by papermill on the simulator: ``obatch sweep`` runs notebooks/sweep.ipynb
into data/runs/<timestamp>-<name>.ipynb (parameters injected, recorded with the run); report.ipynb charts it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nbformat
import orjson
import pytest

from obatch.bench.cli import run_notebook
from obatch.cli import main
from obatch.config import Settings
from obatch.store import bench_repo
from obatch.store.db import open_store
from tests.helpers import ROOT, notebook_outputs

CHAT = "llama3.2:1b"


def test_obatch_sweep_then_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    monkeypatch.chdir(ROOT)  # the command finds notebooks/sweep.ipynb from the project root, as a user runs it
    status = main(["sweep", "-p", "backend=sim", "-p", f"models={CHAT}", "-p", "num_ctx=[2048,4096]",
                   "-p", "concurrency=1,2,4", "-p", "requests=4", "-p", "workload=tiny", "-p", "warmup=0",
                   "--name", "tiny sweep", "--data-dir", str(data)])

    assert status == 0
    [executed] = sorted((data / "runs").glob("*-tiny-sweep.ipynb"))
    assert executed.name[:8].isdigit() and f"done: {executed}" in capsys.readouterr().out
    notebook = nbformat.read(executed, as_version=4)
    assert notebook.metadata["papermill"]["parameters"]["models"] == CHAT  # papermill kept what it injected
    texts = notebook_outputs(executed)
    assert any("vega" in t for t in texts)  # the throughput charts were drawn

    async def stored() -> tuple[str, str | None, dict[str, object], int]:
        engine, sessions = await open_store(Settings(data_dir=data).db_url)
        try:
            async with sessions() as session:
                [run] = await bench_repo.list_runs(session)
                return (run.name, run.notebook_path, orjson.loads(run.params_json or "{}"),
                        len(await bench_repo.list_points(session, run_id=run.id)))
        finally:
            await engine.dispose()

    name, notebook_path, params, points = asyncio.run(stored())
    assert (name, notebook_path, points) == ("tiny sweep", str(executed), 6)
    assert params["num_ctx"] == [2048, 4096] and params["concurrency"] == [1, 2, 4] and params["backend"] == "sim"

    assert main(["bench", "--backend", "sim", "--data-dir", str(data), "--model", CHAT, "--rate", "2,4",
                 "--requests", "4", "--workload", "tiny", "--warmup", "0", "--quiet"]) == 0  # request-rate points
    report = run_notebook(ROOT / "notebooks" / "report.ipynb", tmp_path / "report.ipynb",
                          {"data_dir": str(data)}, cwd=ROOT)
    texts = notebook_outputs(report)
    charts = [t for t in texts if "vega" in t]
    assert len(charts) >= 7  # throughput (req/s, tokens/s) and latency vs num_ctx, vs concurrency, vs the offered
    assert any("Pareto front" in t for t in charts)  # rate, Pareto, estimates
    [rated] = [t for t in charts if "vs the offered rate" in t]
    assert '"rate": 2.0' in rated and '"rate": 4.0' in rated and "achieved_rate" in rated  # both rates plotted
    assert any("saturates_at" in t for t in texts) and any(CHAT in t for t in texts)
