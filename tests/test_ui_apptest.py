"""Every UI page's logic under ``streamlit.testing.v1.AppTest``, against an in-memory OpenAI-shaped server
(``tests.ui_fake``, behind ``httpx.MockTransport``) injected through session state, and against nothing at all
(a closed port) for the server-down message."""

from __future__ import annotations

import json
import time
import tomllib
from collections.abc import Callable
from typing import Any

import orjson
import polars as pl
import pyarrow as pa
import pytest
from streamlit.runtime.pages_manager import PagesManager
from streamlit.testing.v1 import AppTest

from obatch.client import Client
from obatch.testing.server import free_port
from obatch.ui import views
from obatch.ui.launch import APP, find_app
from obatch.ui.session import CLIENT_KEY, HEALTH_TTL
from tests.helpers import ROOT, chat_line
from tests.helpers import jsonl as server_jsonl
from tests.serverkit import FINAL, KEYS, ServerProcess
from tests.serverkit import chat_line as server_line
from tests.ui_fake import FakeServer

TIMEOUT = 60
UI = APP.parent  # the packaged app.py and pages/


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
        at = AppTest.from_file(str(UI / name), default_timeout=TIMEOUT)
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


# --------------------------------------------------------------------------------------------- batches


def uploader(at: AppTest) -> Any:
    """The file uploader (its key changes after each submission: that is how the form is emptied)."""
    (widget,) = at.get("file_uploader")
    return widget


def upload(at: AppTest, name: str, data: bytes) -> AppTest:
    return uploader(at).set_value((name, data, "application/octet-stream")).run()


def test_upload_shows_each_bad_line_and_blocks_submit(page: Callable[..., AppTest], fake: FakeServer) -> None:
    at = page("pages/batches.py")
    no_exception(at)
    assert texts(at.info) == ["No batch yet: upload a file above."]
    upload(at, "bad.jsonl", BAD)
    no_exception(at)
    assert "2 problem(s) in 3 line(s)" in texts(at.error)[0]
    problems = table(at, "line", "code", "message")
    assert list(problems["line"]) == [2, 3]
    assert "not valid JSON" in problems["message"][0]
    assert "appears more than once (first on line 1)" in problems["message"][1]  # names the first occurrence
    styled = table(at, "line", "status", "prompt_tokens")  # every line, bad ones highlighted
    assert list(styled["status"]) == ["ok", "error", "error"]
    # "49", not "49.000000"; a bad line has no estimate: "—", not a grey "None"
    assert str(styled["prompt_tokens"][0]).isdigit() and int(styled["prompt_tokens"][0]) > 0
    assert list(styled["prompt_tokens"][1:]) == [views.BLANK] * 2 and not styled.isna().any().any()
    assert at.button(key="submit").disabled
    assert not fake.sent("POST", "/v1/files")


def test_only_the_valid_lines_can_be_submitted(page: Callable[..., AppTest], fake: FakeServer) -> None:
    at = upload(page("pages/batches.py"), "bad.jsonl", BAD)
    (download,) = [b for b in at.get("download_button") if "valid line" in b.label]
    assert download.label == "Download the 1 valid line(s)"
    at.button(key="submit_valid").click().run()
    no_exception(at)
    (created,) = fake.batches.values()
    obj, content = fake.files[created["input_file_id"]]
    assert content == jsonl(chat_line("q1")) and obj["filename"] == "bad.valid.jsonl"


def test_the_valid_lines_of_a_file_with_problems_are_estimated(page: Callable[..., AppTest],
                                                               fake: FakeServer) -> None:
    at = upload(page("pages/batches.py"), "bad.jsonl", BAD)
    no_exception(at)
    assert "Expected duration of the 1 valid line(s) from the benchmarks: about 42 s (30 s – 1 min 0 s) " \
           "(num_ctx 2048 · concurrency 4)." in texts(at.caption)
    (asked,) = fake.sent("GET", "/v1/benchmarks/estimate")
    assert asked.url.params["num_requests"] == "1" and asked.url.params["model"] == "llama3.2:1b"
    assert int(asked.url.params["prompt_tokens"]) > 0


def test_a_pilot_is_offered_before_any_benchmark(page: Callable[..., AppTest]) -> None:
    """No benchmark points: the estimate is a 404, and a pilot of the file is the measurement (the README says so);
    the page used to say "no duration estimate" and offer nothing."""
    bare = FakeServer(with_benchmarks=False)
    at = upload(page("pages/batches.py", bare), "chat.jsonl", GOOD)
    no_exception(at)
    assert any(t.startswith("No benchmark of this model yet: a pilot runs a sample") for t in texts(at.caption))
    at.button(key="pilot").click().run()
    no_exception(at)
    (piloted,) = [r for r in bare.sent("GET", "/v1/benchmarks/estimate") if r.url.params.get("pilot") == "auto"]
    (stored,) = bare.files.values()
    assert piloted.url.params["input_file_id"] == stored[0]["id"] and stored[1] == GOOD
    assert any(t.startswith("Expected duration from the benchmarks: about 42 s") for t in texts(at.caption))


def test_results_of_only_the_valid_lines_keep_the_users_line_numbers(page: Callable[..., AppTest],
                                                                     fake: FakeServer) -> None:
    data = jsonl(chat_line("q1"), b'{"custom_id": "q2"', chat_line("q3"), b"not json", chat_line("q5"))
    at = upload(page("pages/batches.py"), "mixed.jsonl", data)
    at.button(key="submit_valid").click().run()
    (created,) = fake.batches.values()
    assert created["metadata"]["user_lines"] == "1,3,5"
    fake.complete(created["id"])
    at.run()
    no_exception(at)
    results = table(at, "line", "custom_id", "status")
    assert list(zip(results["line"], results["custom_id"], strict=True)) == [(1, "q1"), (3, "q3"), (5, "q5")]
    assert "Only the valid lines of the uploaded file ran; `line` numbers them as in that file." in texts(at.caption)


def test_submit_sends_file_and_options(page: Callable[..., AppTest], fake: FakeServer) -> None:
    at = upload(page("pages/batches.py"), "chat.jsonl", GOOD)
    assert "3 requests, all valid" in texts(at.success)[0]
    assert texts(at.caption)[0] == ("Expected duration from the benchmarks: about 42 s (30 s – 1 min 0 s) "
                                    "(num_ctx 2048 · concurrency 4).")
    concurrency = at.number_input[0]
    assert concurrency.value is None and concurrency.proto.placeholder == "auto"  # type: ignore[attr-defined]
    at.button(key="pilot").click().run()  # the answer lengths are unknown: a pilot of the uploaded file is offered
    no_exception(at)
    assert any("pilot=auto" in str(r.url) and "input_file_id=" in str(r.url) for r in fake.requests)
    at.selectbox[0].set_value("qwen2.5:0.5b")
    at.number_input[0].set_value(3)  # the widget as drawn after the pilot's rerun
    at.selectbox[1].set_value("1h")
    at.button(key="submit").click().run()
    no_exception(at)
    (created,) = fake.batches.values()
    assert f"Submitted {created['id']} (in_progress)." in [t.replace("**", "") for t in texts(at.success)]
    assert fake.files[created["input_file_id"]][1] == GOOD
    assert len(fake.files) == 1  # the file estimated (and piloted) is the file submitted
    assert fake.files[created["input_file_id"]][0]["purpose"] == "batch"
    assert (created["endpoint"], created["completion_window"]) == ("/v1/chat/completions", "1h")
    assert created["extra_sent"] == {"model": "qwen2.5:0.5b", "concurrency": 3}
    assert at.selectbox(key="batch_pick").value == created["id"]  # the new batch is the one shown
    assert uploader(at).value is None  # the form is emptied: a second click cannot resubmit it


def test_auto_concurrency_sends_none_and_the_model_column_names_the_model(
        page: Callable[..., AppTest], fake: FakeServer) -> None:
    at = upload(page("pages/batches.py"), "chat.jsonl", GOOD)
    at.button(key="submit").click().run()
    (created,) = fake.batches.values()
    assert created["extra_sent"] == {"model": None, "concurrency": None}
    assert list(table(at, "id", "progress")["model"]) == ["llama3.2:1b"]  # not "as in the file"
    assert "model `llama3.2:1b`" in texts(at.markdown)[0]


def test_a_second_submit_of_the_same_file_is_guarded(page: Callable[..., AppTest], fake: FakeServer) -> None:
    at = upload(page("pages/batches.py"), "chat.jsonl", GOOD)
    at.button(key="submit").click().run()
    (first,) = fake.batches.values()
    upload(at, "chat.jsonl", GOOD)  # the same file again
    no_exception(at)
    (warning,) = [t for t in texts(at.warning) if "submitted as" in t]
    assert f"This file was submitted as **{first['id']}**" in warning and " ago " in warning
    assert at.button(key="submit").disabled
    at.checkbox[0].check().run()
    assert not at.button(key="submit").disabled
    at.button(key="submit").click().run()
    assert len(fake.batches) == 2


def test_the_valid_lines_downloaded_and_uploaded_again_are_guarded(page: Callable[..., AppTest],
                                                                    fake: FakeServer) -> None:
    """The common case: submit only the valid lines, then upload the "valid lines" download — the same lines."""
    at = upload(page("pages/batches.py"), "bad.jsonl", BAD)
    at.button(key="submit_valid").click().run()
    (first,) = fake.batches.values()
    valid = jsonl(chat_line("q1"))
    upload(at, "bad.valid.jsonl", valid)
    no_exception(at)
    (warning,) = [t for t in texts(at.warning) if "submitted as" in t]
    assert warning.startswith(f"These lines were submitted as **{first['id']}**")
    assert at.button(key="submit").disabled
    upload(at, "other.jsonl", jsonl(chat_line("q9")))  # other lines: no warning
    assert not [t for t in texts(at.warning) if "submitted as" in t]
    assert not at.button(key="submit").disabled


def test_the_banner_follows_the_batch(page: Callable[..., AppTest], fake: FakeServer) -> None:
    at = upload(page("pages/batches.py"), "chat.jsonl", GOOD)
    at.button(key="submit").click().run()
    (created,) = fake.batches.values()
    assert f"Submitted **{created['id']}** (in_progress)." in texts(at.success)
    fake.complete(created["id"])
    at.run()
    assert f"Submitted **{created['id']}** (completed)." in texts(at.success)
    assert not [t for t in texts(at.success) if "(in_progress)" in t]


def test_running_batch_shows_progress_and_cancel_asks_first(page: Callable[..., AppTest], fake: FakeServer) -> None:
    api = fake.client()
    batch = api.create_batch(api.upload_file(GOOD, "chat.jsonl").id, endpoint="/v1/chat/completions")
    fake.progress(batch.id, completed=1, failed=1, output_tokens=50)
    at = page("pages/batches.py")
    no_exception(at)
    (bar,) = at.get("progress")
    assert bar.proto.text == "2 of 3 requests run · 1 succeeded · 1 failed"  # type: ignore[attr-defined]
    metrics = {m.label: m.value for m in at.metric}
    # started 10 s ago (a second or two more by now): 1 success, 50 tokens, 2 of 3 done
    assert 0.08 <= float(metrics["Requests / s"]) <= 0.1
    assert 4.0 <= float(metrics["Output tokens / s"]) <= 5.0
    assert metrics["ETA"].endswith(" s") and 5.0 <= float(metrics["ETA"].split()[0]) <= 6.5
    at.button(key=f"cancel-{batch.id}").click().run()
    no_exception(at)
    assert not fake.sent("POST", f"/v1/batches/{batch.id}/cancel")  # not yet: it asks first
    assert any(f"Cancel **{batch.id}**?" in t and "1 request(s) not yet run" in t for t in texts(at.warning))
    at.button(key=f"cancel-no-{batch.id}").click().run()
    assert not fake.sent("POST", f"/v1/batches/{batch.id}/cancel")
    assert not any("Cancel **" in t for t in texts(at.warning))
    at.button(key=f"cancel-{batch.id}").click().run()
    at.button(key=f"cancel-yes-{batch.id}").click().run()
    no_exception(at)
    assert fake.sent("POST", f"/v1/batches/{batch.id}/cancel")
    assert fake.batches[batch.id]["status"] == "cancelling"
    assert not any(b.key == f"cancel-{batch.id}" for b in at.button)


def test_engine_down_while_a_batch_runs_pauses_its_eta_and_says_why(page: Callable[..., AppTest],
                                                                      fake: FakeServer) -> None:
    """The page follows /health on every draw: a warning and a paused ETA while the engine is down, both gone once
    it is back (the ETA used to climb while progress was frozen, with no word of the engine)."""
    api = fake.client()
    batch = api.create_batch(api.upload_file(GOOD, "chat.jsonl").id, endpoint="/v1/chat/completions")
    fake.progress(batch.id, completed=1, failed=0, output_tokens=50)
    at = page("pages/batches.py")
    assert {m.label: m.value for m in at.metric}["ETA"].endswith(" s")
    assert not at.warning

    fake.backend_ok = False
    time.sleep(HEALTH_TTL)
    at.run()
    no_exception(at)
    assert {m.label: m.value for m in at.metric}["ETA"] == "waiting"
    (warning,) = [t for t in texts(at.warning) if "engine does not answer" in t]
    assert "connection refused at http://127.0.0.1:11434" in warning and "ETA is paused" in warning

    fake.backend_ok = True
    time.sleep(HEALTH_TTL)
    at.run()
    assert {m.label: m.value for m in at.metric}["ETA"].endswith(" s")
    assert not [t for t in texts(at.warning) if "engine does not answer" in t]


def test_a_running_batch_shows_its_concurrency_and_hosts(page: Callable[..., AppTest], fake: FakeServer) -> None:
    api = fake.client()
    batch = api.create_batch(api.upload_file(GOOD, "chat.jsonl").id, endpoint="/v1/chat/completions")
    fake.progress(batch.id, completed=1)
    at = page("pages/batches.py")
    no_exception(at)
    assert ("Concurrency: at most 6 requests in flight (auto: raised to 6: 5 gave 98.0/s against 91.5/s) on "
            "`http://127.0.0.1:11434`") in texts(at.caption)
    hosts = table(at, "host", "changes")
    assert hosts.to_dict("records") == [{
        "host": "http://127.0.0.1:11434", "state": "up", "concurrency": 6, "mode": "auto",
        "why": "raised to 6: 5 gave 98.0/s against 91.5/s", "in flight": 6, "served": 40, "changes": 1}]
    levels = table(at, "step", "why")
    assert list(levels["concurrency"]) == [4, 6]


def test_a_cancelled_batch_shows_its_unrun_lines_as_cancelled(page: Callable[..., AppTest], fake: FakeServer) -> None:
    lines = jsonl(*[chat_line(f"q{i}", f"question {i}") for i in range(5)])
    api = fake.client()
    batch = api.create_batch(api.upload_file(lines, "five.jsonl").id, endpoint="/v1/chat/completions")
    fake.complete(batch.id, latency=True, ran=2, status="cancelled")
    at = page("pages/batches.py")
    no_exception(at)
    (bar,) = at.get("progress")
    assert bar.proto.text == "2 of 5 requests run · 2 succeeded · 0 failed · 3 cancelled (not run)"  # type: ignore[attr-defined]
    assert bar.proto.value == 40  # type: ignore[attr-defined]  # percent: the lines that ran, not 100%
    assert {m.label: m.value for m in at.metric}["ETA"] == "cancelled"
    listed = table(at, "id", "progress")
    assert (listed["completed"][0], listed["failed"][0], listed["not run"][0]) == (2, 0, 3)
    status = at.multiselect(key=f"st-{batch.id}")
    assert status.options == ["succeeded (2)", "failed (0)", "cancelled (3)", "expired (0)"]
    status.set_value(["cancelled"]).run()
    results = table(at, "custom_id", "finish_reason")
    assert list(results["custom_id"]) == ["q2", "q3", "q4"]
    assert list(results.columns[:5]) == ["line", "custom_id", "status", "error_code", "error_message"]
    assert list(results.columns).index("content") > list(results.columns).index("error_message")


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
    slider = at.slider(key=f"lat-{batch.id}")
    # latencies 100.4567 and 300.4567 ms (q2 failed without one): bounds rounded outward, whole milliseconds
    assert (slider.min, slider.max, slider.step, slider.value) == (100, 301, 1, (100, 301))
    slider.set_value((100, 150)).run()
    assert at.slider(key=f"lat-{batch.id}").value == (100, 150)  # kept, not reset to the default
    assert list(table(at, "custom_id", "finish_reason")["custom_id"]) == ["q1"]
    assert "1 of 3 requests · click a row to read it whole" in texts(at.caption)


def test_failed_batch_lists_its_problems(page: Callable[..., AppTest], fake: FakeServer) -> None:
    api = fake.client()
    batch = api.create_batch(api.upload_file(GOOD, "chat.jsonl").id, endpoint="/v1/chat/completions")
    fake.batches[batch.id].update(status="failed", failed_at=1, errors={"object": "list", "data": [
        {"code": "invalid_json_line", "line": 2, "message": "The line is not valid JSON.", "param": None}]})
    at = page("pages/batches.py")
    no_exception(at)
    assert any("refused" in t for t in texts(at.error))
    assert list(table(at, "line", "code", "message")["code"]) == ["invalid_json_line"]


# ---------------------------------------------------------------------------------------------- models


def test_models_page_lists_models_and_backend(page: Callable[..., AppTest]) -> None:
    at = page("pages/models.py")
    no_exception(at)
    assert {m.label: m.value for m in at.metric} == {"Server": "up", "Backend": "ollama", "Backend reachable": "yes"}
    assert texts(at.caption)[0] == "Backend ollama at `http://127.0.0.1:11434` · version `0.9.0`"
    models = table(at, "id", "context_length")
    assert list(models["id"]) == ["llama3.2:1b", "qwen2.5:0.5b"]
    assert list(models["context_length"]) == ["131072", "32768"]
    assert list(models["loaded_context_length"]) == ["—", "—"]  # not reported: a dash, not "None"
    assert not models.isna().any().any()
    hosts = table(at, "host", "concurrency")
    assert list(hosts["concurrency"]) == ["4 (auto)"]
    assert list(hosts["why"]) == ["kept 4: 5 gave 101.0/s against 100.2/s"]
    assert not hosts.isna().any().any()
    assert not at.warning


def test_backend_down_says_what_happened_and_waits_for_nothing(page: Callable[..., AppTest]) -> None:
    down = FakeServer(backend_ok=False)
    at = page("pages/models.py", down)
    no_exception(at)
    assert "does not answer: connection refused at http://127.0.0.1:11434" in texts(at.warning)[0]
    assert list(table(at, "host", "state")["state"]) == ["down"]  # the hosts agree with the backend's state
    assert "`http://127.0.0.1:11434` (down): connection refused at http://127.0.0.1:11434" in texts(at.caption)
    assert not down.sent("GET", "/v1/models")  # the backend is known down: no request that would wait on it
    assert any("once the backend answers" in t for t in texts(at.info))
    at = page("pages/batches.py", down)
    no_exception(at)
    assert not down.sent("GET", "/v1/models")


def test_every_page_asks_health_once(page: Callable[..., AppTest], fake: FakeServer) -> None:
    """The sidebar badge and the page share one /health answer (each page draw used to ask twice)."""
    at = page("app.py")
    no_exception(at)
    assert len(fake.sent("GET", "/health")) == 1
    time.sleep(HEALTH_TTL)  # a later page draw asks again
    at.switch_page("pages/models.py").run()
    no_exception(at)
    assert {m.label: m.value for m in at.metric}["Backend reachable"] == "yes"
    assert "Server up · backend ollama" in texts(at.sidebar.success)[0]  # the frame around the page
    assert len(fake.sent("GET", "/health")) == 2


def test_deploy_button_is_hidden() -> None:
    """Streamlit reads .streamlit/config.toml from the folder it runs in: `obatch ui` runs it next to the packaged
    app; `streamlit run streamlit_app.py` in a checkout reads the same file through the checkout's link to it."""
    packaged = find_app(env={}).parent / ".streamlit" / "config.toml"
    config = tomllib.loads(packaged.read_text())
    assert config["client"]["toolbarMode"] == "viewer"
    assert (ROOT / ".streamlit" / "config.toml").resolve() == packaged


def test_a_checkouts_streamlit_app_runs_the_packaged_app(fake: FakeServer) -> None:
    """`streamlit run streamlit_app.py` in a checkout: the same home page and navigation, to the packaged pages."""
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=TIMEOUT)
    at.session_state[CLIENT_KEY] = fake.client()
    at.run()
    no_exception(at)
    assert texts(at.title) == ["obatch"]
    assert [m.label for m in at.metric] == ["Backend", "Batches running", "Batches (last 100)"]
    for page_name, title in (("batches", "Batches"), ("benchmarks", "Benchmarks"), ("models", "Models / backend")):
        at.switch_page(f"obatch/ui/pages/{page_name}.py").run()  # a page the navigation registered
        no_exception(at)
        assert texts(at.title) == [title]


def test_a_page_opened_outside_the_navigation_goes_through_it(page: Callable[..., AppTest]) -> None:
    """A fresh UI (Streamlit still in its legacy pages/ mode) opened at /batches: the page is sent back through
    the entrypoint instead of running alone."""
    at = AppTest.from_file(str(ROOT / "pages/batches.py"), default_timeout=TIMEOUT)
    at.session_state[CLIENT_KEY] = FakeServer().client()
    PagesManager.uses_pages_directory = True  # as `streamlit run streamlit_app.py` starts, next to pages/
    try:
        at.run()
        no_exception(at)
        assert PagesManager.uses_pages_directory is False
    finally:
        PagesManager.uses_pages_directory = None


# ------------------------------------------------------------------------------------------- server down


@pytest.mark.parametrize("name", ["obatch/ui/app.py", "obatch/ui/pages/batches.py", "obatch/ui/pages/benchmarks.py",
                                  "obatch/ui/pages/models.py",
                                  # a checkout's layout: thin scripts that run the packaged ones
                                  "streamlit_app.py", "pages/batches.py", "pages/benchmarks.py", "pages/models.py"])
def test_server_down_is_a_clear_message(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    monkeypatch.setenv("OBATCH_SERVER_URL", url)
    at = AppTest.from_file(str(ROOT / name), default_timeout=TIMEOUT).run()
    no_exception(at)
    (message,) = texts(at.main.error)
    assert f"The obatch server at {url} cannot be reached" in message
    assert "obatch serve" in message


def test_home_shows_health_and_links(page: Callable[..., AppTest], fake: FakeServer) -> None:
    api = fake.client()
    api.create_batch(api.upload_file(GOOD, "chat.jsonl").id, endpoint="/v1/chat/completions")
    at = page("app.py")
    no_exception(at)
    assert {m.label: m.value for m in at.metric} == {"Backend": "ollama", "Batches running": "1",
                                                     "Batches (last 100)": "1"}
    assert "Server up · backend ollama" in texts(at.sidebar.success)[0]
    assert len(at.get("page_link")) == 3


# ------------------------------------------------------------------------------------- a real server


def test_batches_page_round_trip_on_a_real_server(obatch_server: ServerProcess) -> None:
    """The same page against `obatch serve` (simulated Ollama): upload, submit, watch, results."""
    lines = [server_line(f"ui-{i}") for i in range(5)] + [server_line("ui-missing", model="no-such-model")]
    at = AppTest.from_file(str(UI / "pages/batches.py"), default_timeout=TIMEOUT)
    with Client(obatch_server.url, api_key=KEYS["dave"]) as api:  # closed: no socket left to the server
        at.session_state[CLIENT_KEY] = api
        at.run()
        upload(at, "ui.jsonl", server_jsonl(lines))
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
