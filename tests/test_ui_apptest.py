"""Every UI page's logic under ``streamlit.testing.v1.AppTest``, against an in-memory OpenAI-shaped server
(``tests.ui_fake``, behind ``httpx.MockTransport``) injected through session state, and against nothing at all
(a closed port) for the server-down message."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from obatch.client import Client
from obatch.ui.session import CLIENT_KEY
from tests.helpers import ROOT, chat_line
from tests.helpers import jsonl as server_jsonl
from tests.serverkit import FINAL, KEYS, ServerProcess
from tests.serverkit import chat_line as server_line
from tests.ui_fake import FakeServer

TIMEOUT = 60


def jsonl(*objs: object) -> bytes:
    return b"".join((o if isinstance(o, bytes) else orjson.dumps(o)) + b"\n" for o in objs)


GOOD = jsonl(chat_line("q1", "What is 2+2?"), chat_line("q2", "please fail"), chat_line("q3", "Name a colour."))
BAD = jsonl(chat_line("q1"), b'{"custom_id": "q2", "method": "POST"', chat_line("q1"))


@pytest.fixture
def fake() -> FakeServer:
    return FakeServer()


@pytest.fixture
def page(fake: FakeServer) -> Callable[..., AppTest]:
    def open_page(name: str, server: FakeServer | None = None) -> AppTest:
        at = AppTest.from_file(str(ROOT / name), default_timeout=TIMEOUT)
        at.session_state[CLIENT_KEY] = (server or fake).client()
        return at.run()

    return open_page


def texts(elements: Any) -> list[str]:
    return [str(e.value) for e in elements]


def table(at: AppTest, *columns: str, index: int = 0) -> Any:
    """The ``index``-th dataframe shown that has all these columns (dataframes carry no key in AppTest)."""
    return [d.value for d in at.dataframe if set(columns) <= set(d.value.columns)][index]


def no_exception(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def chart_data(at: AppTest) -> list[tuple[dict[str, Any], list[pl.DataFrame]]]:
    """Each rendered altair chart's Vega-Lite spec and every dataset Streamlit shipped with it."""
    out = []
    for chart in at.get("vega_lite_chart"):
        proto = chart.proto  # type: ignore[attr-defined]
        tables = [d.data.data for d in proto.datasets] if proto.datasets else [proto.data.data]
        frames = [pl.from_arrow(pa.ipc.open_stream(t).read_all()) for t in tables]
        out.append((json.loads(proto.spec), frames))  # type: ignore[misc]
    return out


def chart_specs(at: AppTest) -> list[tuple[dict[str, Any], pl.DataFrame]]:
    """Each single-dataset chart's spec and its data."""
    return [(spec, frames[0]) for spec, frames in chart_data(at)]


# --------------------------------------------------------------------------------------------- batches


def test_upload_shows_each_bad_line_and_blocks_submit(page: Callable[..., AppTest], fake: FakeServer) -> None:
    at = page("pages/batches.py")
    no_exception(at)
    assert texts(at.info) == ["No batch yet: upload a file above."]
    at.file_uploader(key="upload").set_value(("bad.jsonl", BAD, "application/octet-stream")).run()
    no_exception(at)
    assert "2 problem(s) in 3 line(s)" in texts(at.error)[0]
    problems = table(at, "line", "code", "message")
    assert list(problems["line"]) == [2, 3]
    assert "not valid JSON" in problems["message"][0]
    assert "appears more than once" in problems["message"][1]
    styled = table(at, "line", "status", "prompt_tokens")  # every line, bad ones highlighted
    assert list(styled["status"]) == ["ok", "error", "error"]
    assert at.button(key="submit").disabled
    assert not fake.sent("POST", "/v1/files")


def test_submit_sends_file_and_options(page: Callable[..., AppTest], fake: FakeServer) -> None:
    at = page("pages/batches.py")
    at.file_uploader(key="upload").set_value(("chat.jsonl", GOOD, "application/octet-stream")).run()
    assert "3 requests, all valid" in texts(at.success)[0]
    assert texts(at.caption)[0] == ("Expected duration from the benchmarks: about 42 s (30 s – 1 min 0 s) "
                                    "(num_ctx 2048 · concurrency 4).")
    at.button(key="pilot").click().run()  # the answer lengths are unknown: a pilot of the uploaded file is offered
    no_exception(at)
    assert any("pilot=16" in str(r.url) and "input_file_id=" in str(r.url) for r in fake.requests)
    at.selectbox[0].set_value("qwen2.5:0.5b")
    at.number_input[0].set_value(3)
    at.selectbox[1].set_value("1h")
    at.button(key="submit").click().run()
    no_exception(at)
    (created,) = fake.batches.values()
    assert "Submitted" in texts(at.success)[-1] and created["id"] in texts(at.success)[-1]
    assert fake.files[created["input_file_id"]][1] == GOOD
    assert len(fake.files) == 1  # the file estimated (and piloted) is the file submitted
    assert fake.files[created["input_file_id"]][0]["purpose"] == "batch"
    assert (created["endpoint"], created["completion_window"]) == ("/v1/chat/completions", "1h")
    assert created["extra_sent"] == {"model": "qwen2.5:0.5b", "concurrency": 3}
    assert at.selectbox(key="batch_pick").value == created["id"]  # the new batch is the one shown


def test_running_batch_shows_progress_and_cancels(page: Callable[..., AppTest], fake: FakeServer) -> None:
    api = fake.client()
    batch = api.create_batch(api.upload_file(GOOD, "chat.jsonl").id, endpoint="/v1/chat/completions")
    fake.progress(batch.id, completed=1, failed=1, output_tokens=50)
    at = page("pages/batches.py")
    no_exception(at)
    (bar,) = at.get("progress")
    assert bar.proto.text == "2 of 3 requests · 1 succeeded · 1 failed"  # type: ignore[attr-defined]
    metrics = {m.label: m.value for m in at.metric}
    # started 10 s ago (a second or two more by now): 1 success, 50 tokens, 2 of 3 done
    assert 0.08 <= float(metrics["Requests / s"]) <= 0.1
    assert 4.0 <= float(metrics["Output tokens / s"]) <= 5.0
    assert metrics["ETA"].endswith(" s") and 5.0 <= float(metrics["ETA"].split()[0]) <= 6.5
    at.button(key=f"cancel-{batch.id}").click().run()
    no_exception(at)
    assert fake.sent("POST", f"/v1/batches/{batch.id}/cancel")
    assert fake.batches[batch.id]["status"] == "cancelling"
    assert not any(b.key == f"cancel-{batch.id}" for b in at.button)


def test_completed_batch_offers_downloads_and_filters(page: Callable[..., AppTest], fake: FakeServer) -> None:
    api = fake.client()
    batch = api.create_batch(api.upload_file(GOOD, "chat.jsonl").id, endpoint="/v1/chat/completions")
    fake.complete(batch.id, latency=True)
    at = page("pages/batches.py")
    no_exception(at)
    assert {b.label for b in at.get("download_button")} == {"Download output", "Download errors"}
    results = table(at, "custom_id", "finish_reason")
    assert list(results["custom_id"]) == ["q1", "q2", "q3"]
    assert list(results["status"]) == ["succeeded", "failed", "succeeded"]
    at.multiselect(key=f"st-{batch.id}").set_value(["succeeded"]).run()
    assert list(table(at, "custom_id", "finish_reason")["custom_id"]) == ["q1", "q3"]
    at.multiselect(key=f"fr-{batch.id}").set_value(["length"]).run()
    assert list(table(at, "custom_id", "finish_reason")["custom_id"]) == ["q3"]
    at.multiselect(key=f"fr-{batch.id}").set_value([]).run()
    at.slider(key=f"lat-{batch.id}").set_value((100.0, 150.0)).run()
    assert list(table(at, "custom_id", "finish_reason")["custom_id"]) == ["q1"]
    assert "1 of 3 requests" in texts(at.caption)


def test_failed_batch_lists_its_problems(page: Callable[..., AppTest], fake: FakeServer) -> None:
    api = fake.client()
    batch = api.create_batch(api.upload_file(GOOD, "chat.jsonl").id, endpoint="/v1/chat/completions")
    fake.batches[batch.id].update(status="failed", failed_at=1, errors={"object": "list", "data": [
        {"code": "invalid_json_line", "line": 2, "message": "The line is not valid JSON.", "param": None}]})
    at = page("pages/batches.py")
    no_exception(at)
    assert any("refused" in t for t in texts(at.error))
    assert list(table(at, "line", "code", "message")["code"]) == ["invalid_json_line"]


# ------------------------------------------------------------------------------------------ benchmarks


def test_benchmark_charts_are_built_from_the_points(page: Callable[..., AppTest]) -> None:
    at = page("pages/benchmarks.py")
    no_exception(at)
    best = table(at, "model", "tokens_per_s")
    assert sorted(best["model"]) == ["llama3.2:1b", "qwen2.5:0.5b"]
    specs = chart_specs(at)
    by_title = {spec["title"]: (spec, data) for spec, data in specs}
    spec, data = by_title["output tokens / s vs num_ctx"]
    assert spec["mark"]["type"] == "line" and spec["encoding"]["color"]["field"] == "model"
    assert spec["encoding"]["x"]["field"] == "num_ctx"
    assert data.sort("model", "num_ctx")["num_ctx"].to_list() == [2048, 4096, 8192] * 2
    assert set(data["concurrency"].to_list()) == {4}  # "best" concurrency per window
    assert "latency percentiles vs num_ctx" in by_title
    assert "requests / s vs concurrency" in by_title
    assert by_title["best output tokens / s per model"][0]["mark"]["type"] == "bar"
    at.selectbox(key="ctx_concurrency").set_value(1).run()
    data = {spec["title"]: d for spec, d in chart_specs(at)}["output tokens / s vs num_ctx"]
    assert set(data["concurrency"].to_list()) == {1}
    at.multiselect(key="models").set_value(["qwen2.5:0.5b"]).run()
    data = {spec["title"]: d for spec, d in chart_specs(at)}["output tokens / s vs num_ctx"]
    assert set(data["model"].to_list()) == {"qwen2.5:0.5b"}


def test_estimate_record_tab_charts_estimate_against_actual(page: Callable[..., AppTest]) -> None:
    at = page("pages/benchmarks.py")
    record = table(at, "batch_id", "estimated_seconds", "actual_seconds")
    assert list(record["batch_id"]) == ["batch-old"]
    frames = next(f for spec, f in chart_data(at) if "Estimate vs actual" in str(spec.get("title")))
    assert [55.0] in [f["actual_seconds"].to_list() for f in frames]


def test_sweep_from_the_page_runs_obatch_bench(page: Callable[..., AppTest], obatch_sim: Any,
                                                 monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Start a one-point sweep in the form: a real `obatch bench` child measures the simulator."""
    for key in [k for k in os.environ if k.startswith("OBATCH_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("OBATCH_BACKEND", "ollama")
    monkeypatch.setenv("OBATCH_OLLAMA_URL", obatch_sim.url)
    monkeypatch.setenv("OBATCH_DATA_DIR", str(tmp_path / "data"))
    at = page("pages/benchmarks.py")
    at.multiselect(key="sweep_models").set_value(["qwen2.5:0.5b"])
    at.multiselect(key="sweep_ctx").set_value([2048])
    at.multiselect(key="sweep_conc").set_value([2])
    at.number_input(key="sweep_requests").set_value(2)
    at.selectbox(key="sweep_workload").set_value("tiny")
    at.button[-1].click().run()  # the form's submit button
    no_exception(at)
    job = at.session_state["sweep_job"]
    assert job.plan.points == 1
    assert "sweep: 0 of 1 point(s) measured" in at.get("progress")[0].proto.text  # type: ignore[attr-defined]
    assert job.process.wait(timeout=60) == 0, job.output()
    at.run()
    no_exception(at)
    assert texts(at.success) == ["Sweep finished."]
    assert "1 points measured" in texts(at.code)[0] and "qwen2.5:0.5b" in texts(at.code)[0]


def test_benchmarks_without_data_explain_how_to_get_some(page: Callable[..., AppTest]) -> None:
    at = page("pages/benchmarks.py", FakeServer(with_benchmarks=False))
    no_exception(at)
    assert any("No benchmark yet" in t for t in texts(at.info))


# ---------------------------------------------------------------------------------------------- models


def test_models_page_lists_models_and_backend(page: Callable[..., AppTest]) -> None:
    at = page("pages/models.py")
    no_exception(at)
    assert {m.label: m.value for m in at.metric} == {"Server": "up", "Backend": "ollama", "Backend reachable": "yes"}
    assert "version `0.9.0`" in texts(at.caption)[0]
    models = table(at, "id", "context_length")
    assert list(models["id"]) == ["llama3.2:1b", "qwen2.5:0.5b"]
    assert list(models["context_length"]) == [131072, 32768]
    hosts = table(at, "host", "concurrency")
    assert list(hosts["concurrency"]) == ["4 (auto)"]
    assert list(hosts["why"]) == ["kept 4: 5 gave 101.0/s against 100.2/s"]
    assert not at.warning


def test_backend_down_is_a_warning_not_a_trace(page: Callable[..., AppTest]) -> None:
    at = page("pages/models.py", FakeServer(backend_ok=False))
    no_exception(at)
    assert "does not answer: ConnectError" in texts(at.warning)[0]


# ------------------------------------------------------------------------------------------- server down


def closed_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("name", ["streamlit_app.py", "pages/batches.py", "pages/benchmarks.py", "pages/models.py"])
def test_server_down_is_a_clear_message(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = closed_url()
    monkeypatch.setenv("OBATCH_SERVER_URL", url)
    at = AppTest.from_file(str(ROOT / name), default_timeout=TIMEOUT).run()
    no_exception(at)
    (message,) = texts(at.main.error)
    assert f"The obatch server at {url} cannot be reached" in message
    assert "obatch serve" in message


def test_home_shows_health_and_links(page: Callable[..., AppTest], fake: FakeServer) -> None:
    api = fake.client()
    api.create_batch(api.upload_file(GOOD, "chat.jsonl").id, endpoint="/v1/chat/completions")
    at = page("streamlit_app.py")
    no_exception(at)
    assert {m.label: m.value for m in at.metric} == {"Backend": "ollama", "Batches running": "1",
                                                     "Batches (last 100)": "1"}
    assert "Server up · backend ollama" in texts(at.sidebar.success)[0]
    assert len(at.get("page_link")) == 3


# ------------------------------------------------------------------------------------- a real server


def test_batches_page_round_trip_on_a_real_server(obatch_server: ServerProcess) -> None:
    """The same page against `obatch serve` (simulated Ollama): upload, submit, watch, results."""
    lines = [server_line(f"ui-{i}") for i in range(5)] + [server_line("ui-missing", model="no-such-model")]
    at = AppTest.from_file(str(ROOT / "pages/batches.py"), default_timeout=TIMEOUT)
    with Client(obatch_server.url, api_key=KEYS["dave"]) as api:  # closed: no socket left to the server
        at.session_state[CLIENT_KEY] = api
        at.run()
        at.file_uploader(key="upload").set_value(("ui.jsonl", server_jsonl(lines), "application/octet-stream")).run()
        assert "6 requests, all valid" in texts(at.success)[0]
        at.button(key="submit").click().run()
        no_exception(at)
        batch_id = at.selectbox(key="batch_pick").value
        deadline = time.monotonic() + 30
        while api.get_batch(batch_id).status not in FINAL and time.monotonic() < deadline:
            time.sleep(0.2)
        at.run()
        no_exception(at)
        assert texts(at.markdown)[0].startswith(f"**{batch_id}** · status **`completed`**")
        assert {b.label for b in at.get("download_button")} == {"Download output", "Download errors"}
        results = table(at, "custom_id", "finish_reason")
        assert sorted(results["custom_id"]) == sorted(line["custom_id"] for line in lines)
        failed = results[results["status"] == "failed"]
        assert list(failed["custom_id"]) == ["ui-missing"]
        assert list(failed["error_code"]) == ["model_not_found"]
