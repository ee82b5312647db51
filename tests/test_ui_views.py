"""obatch.ui.views: the pure data → frame → chart functions behind the pages."""

from __future__ import annotations

from pathlib import Path

import orjson
import polars as pl
import pytest
from pydantic import ValidationError

from obatch.api import result_schema
from obatch.batches import results
from obatch.bench.schemas import EstimateRecord
from obatch.errors import ConfigError
from obatch.protocol import Batch, DurationEstimate, LineError, Model, OutputLine
from obatch.store.tables import RequestRow
from obatch.ui import views
from obatch.ui.launch import find_app, streamlit_command
from tests.helpers import chat_line


def jsonl(*objs: object) -> bytes:
    return b"".join((o if isinstance(o, bytes) else orjson.dumps(o)) + b"\n" for o in objs)


def test_preview_flags_each_bad_line_with_its_message() -> None:
    data = jsonl(chat_line("a"), b"{not json", chat_line("a"), {"custom_id": "c", "method": "GET"},
                 b"", chat_line("d", model=""))
    preview = views.preview_file(data)
    assert not preview.ok
    assert preview.n_requests == 1
    problems = preview.problems
    assert problems["line"].to_list() == [2, 3, 4, 6]
    assert problems["code"].to_list() == ["invalid_json_line", "duplicate_custom_id", "invalid_method",
                                          "missing_required_parameter"]
    assert "more than once" in problems["message"][1]
    assert preview.lines.filter(pl.col("line") == 3)["custom_id"].item() == "a"  # read from the raw line
    assert preview.lines.filter(pl.col("line") == 1)["text"].item() == "hello"


def test_preview_model_override_and_mixed_endpoints() -> None:
    no_model = chat_line("a", model="")
    assert not views.preview_file(jsonl(no_model)).ok
    fixed = views.preview_file(jsonl(no_model), model="qwen2.5:0.5b")
    assert fixed.ok and fixed.models == ["qwen2.5:0.5b"]
    embed = {"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "x"}}
    mixed = views.preview_file(jsonl(chat_line("a"), embed))
    assert mixed.endpoint == "/v1/chat/completions"
    assert mixed.problems["code"].to_list() == ["mismatched_endpoint"]
    empty = views.preview_file(b"\n\n")
    assert not empty.ok and empty.problems["code"].to_list() == ["empty_file"]


def test_preview_mean_tokens_feed_the_estimate() -> None:
    preview = views.preview_file(jsonl(chat_line("a", "x" * 300, max_tokens=50), chat_line("b", max_tokens=150)))
    prompt, output = preview.mean_tokens()
    assert prompt is not None and prompt > 50
    assert output == 100


ESTIMATE = DurationEstimate(model="m", num_requests=100, seconds=100, low=80, high=130, num_ctx=4096, concurrency=4)


def batch(**fields: object) -> Batch:
    base: dict[str, object] = {"id": "batch-1", "endpoint": "/v1/chat/completions", "input_file_id": "file-1",
                               "completion_window": "24h", "created_at": 1000, "status": "in_progress"}
    base.update(fields)
    return Batch.model_validate(base)


def test_progress_rates_count_successes_and_eta_falls_back_to_the_estimate() -> None:
    running = batch(in_progress_at=1000, request_counts={"total": 100, "completed": 30, "failed": 10},
                    usage={"output_tokens": 600})
    p = views.batch_progress(running, now=1020)
    assert (p.done, p.fraction, p.elapsed_s) == (40, 0.4, 20)
    assert p.requests_per_s == 1.5  # successes only
    assert p.tokens_per_s == 30
    assert p.eta_s == 30  # 60 left at 2 finished per second
    fresh = batch(in_progress_at=1000, request_counts={"total": 100, "completed": 0, "failed": 0})
    assert views.batch_progress(fresh, now=1010, estimate=ESTIMATE.model_copy(update={"seconds": 50})).eta_s == 40
    assert views.batch_progress(fresh, now=1010).eta_s is None
    done = batch(status="completed", in_progress_at=1000, completed_at=1050,
                 request_counts={"total": 10, "completed": 10, "failed": 0})
    assert views.batch_progress(done, now=9999).elapsed_s == 50
    assert views.batch_progress(done).eta_s == 0
    quick = batch(status="completed", in_progress_at=1000, completed_at=1000, usage={"output_tokens": 48},
                  request_counts={"total": 24, "completed": 24, "failed": 0})
    p = views.batch_progress(quick, now=1000.5)
    assert (p.requests_per_s, p.tokens_per_s, p.rates_at_least, p.elapsed_s) == (24, 48, True, 0)
    assert not views.batch_progress(done).rates_at_least
    assert views.format_seconds(95) == "1 min 35 s"
    assert views.format_seconds(None) == "—"
    assert views.format_seconds(0) == "< 1 s"


def test_eta_pauses_while_the_engine_is_down() -> None:
    running = batch(in_progress_at=1000, request_counts={"total": 100, "completed": 30, "failed": 10})
    down = views.batch_progress(running, now=1020, engine_up=False)
    assert (down.waiting, down.eta_s, down.eta_text) == (True, None, "waiting")
    assert (down.done, down.elapsed_s) == (40, 20)  # what ran is still shown
    up = views.batch_progress(running, now=1020)
    assert (up.waiting, up.eta_text) == (False, "30 s")
    done = batch(status="completed", in_progress_at=1000, completed_at=1050,
                 request_counts={"total": 10, "completed": 10, "failed": 0})
    assert not views.batch_progress(done, engine_up=False).waiting  # a finished batch waits for nothing


def test_a_batchs_concurrency_story() -> None:
    story = {"mode": "auto", "hosts": [
        {"url": "http://a", "state": "up", "concurrency": 4, "auto": True, "reason": "kept 4", "served": 9,
         "in_flight": 2, "history": [{"at": 1.0, "level": 2, "reason": "start"}, {"at": 2.0, "level": 4,
                                                                                  "reason": "kept 4"}]},
        {"url": "http://b", "state": "down", "concurrency": 3, "auto": True, "reason": "drained", "served": 1,
         "in_flight": 0, "history": [{"at": 1.0, "level": 3, "reason": "drained"}]}]}
    running = batch(in_progress_at=1000, obatch={"concurrency": story})
    assert views.concurrency_text(running) == ("at most 4 requests in flight (auto) over 2 hosts: `http://a` 4 (up); "
                                               "`http://b` 3 (down)")
    assert views.run_hosts_frame(running)["changes"].to_list() == [1, 0]
    assert views.level_history_frame(running).select("host", "concurrency").rows() == [
        ("http://a", 2), ("http://a", 4), ("http://b", 3)]
    assert views.concurrency_text(batch()) is None and views.run_hosts_frame(batch()).is_empty()


def test_an_opened_result_row_shows_its_request_and_facts() -> None:
    data = jsonl({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": [{"type": "text", "text": "Why?"}]}]}},
                 {"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": {"model": "m",
                                                                                     "prompt": "Once"}})
    assert views.request_prompt(data, "a") == "system: Be brief.\n\nuser: Why?"
    assert views.request_prompt(data, "b") == "Once"
    assert views.request_prompt(data, "zz") is None
    row = {"model": "m", "finish_reason": "length", "prompt_tokens": 10, "completion_tokens": 5,
           "latency_ms": 123.45, "ttft_ms": 20.0, "num_ctx": 2048, "truncated": False, "attempts": 2}
    assert views.row_facts(row) == ("model `m` · finish reason `length` · 10 prompt + 5 completion tokens · "
                                    "latency 123.5 ms (first token 20.0 ms) · num_ctx 2048 · 2 attempts")
    assert views.row_facts({"model": None, "attempts": 1}) == ""


def test_results_of_the_valid_lines_keep_the_uploaded_files_line_numbers() -> None:
    assert views.line_ranges([7, 1, 2, 3, 5, 8]) == "1-3,5,7-8"
    assert views.expand_ranges("1-3,5,7-8") == [1, 2, 3, 5, 7, 8]
    assert views.expand_ranges("x") == []
    frame = pl.DataFrame({"line": [1, 2, 3, None], "custom_id": ["a", "b", "c", "d"]})
    assert views.in_user_lines(frame, [1, 3, 6])["line"].to_list() == [1, 3, 6, None]
    assert views.in_user_lines(frame, [1, 3])["line"].to_list() == [1, 2, 3, None]  # a map that does not fit


def test_batches_frame_progress() -> None:
    frame = views.batches_frame([batch(request_counts={"total": 4, "completed": 1, "failed": 1}),
                                 batch(id="batch-2", status="validating")])
    assert frame["progress"].to_list() == [0.5, 0.0]
    assert frame.schema["created"] == pl.Datetime("ms")


def test_cancelled_lines_are_neither_failures_nor_progress() -> None:
    """OpenAI counts a cancelled batch's unrun lines as failed; obatch's ``not_run`` tells them apart."""
    cancelled = batch(status="cancelled", in_progress_at=1000, cancelled_at=1030, obatch={"not_run": 234},
                      request_counts={"total": 300, "completed": 66, "failed": 234})
    p = views.batch_progress(cancelled)
    assert (p.completed, p.failed, p.not_run, p.done) == (66, 0, 234, 66)
    assert p.fraction == 66 / 300
    assert p.sentence("cancelled") == "66 of 300 requests run · 66 succeeded · 0 failed · 234 cancelled (not run)"
    assert views.batch_progress(batch(status="expired", obatch={"not_run": 2}, request_counts={
        "total": 5, "completed": 2, "failed": 3})).sentence("expired").endswith("1 failed · 2 expired (not run)")
    row = views.batches_frame([cancelled]).row(0, named=True)
    assert (row["completed"], row["failed"], row["not run"], row["progress"]) == (66, 0, 234, 66 / 300)


def test_elapsed_never_goes_backwards_when_the_batch_finishes() -> None:
    """The server's stamps are whole seconds: a running batch counts whole seconds too, so the end stamp written
    later (truncated) is never below what was shown."""
    shown = []
    for now in (1011.2, 1011.9, 1012.95):
        shown.append(views.batch_progress(batch(in_progress_at=1000), now=now).elapsed_s)
    finalizing = batch(status="finalizing", in_progress_at=1000, finalizing_at=1012)  # truncated 1012.97
    shown.append(views.batch_progress(finalizing, now=1013.5).elapsed_s)
    assert shown == sorted(shown) and shown[-1] == 12


def test_model_column_names_the_model() -> None:
    frame = views.batches_frame([batch(model="qwen2.5:0.5b"), batch(metadata={"models": "llama3.2:1b"}), batch()])
    assert frame["model"].to_list() == ["qwen2.5:0.5b", "llama3.2:1b", "per line"]


def test_a_clicked_row_picks_its_batch() -> None:
    ids = ["batch-b", "batch-a"]
    assert views.picked_row(ids, {"selection": {"rows": [1], "columns": []}}) == "batch-a"
    assert views.picked_row(ids, {"selection": {"rows": []}}) is None
    assert views.picked_row(ids, None) is None
    assert views.picked_row(ids, {"selection": {"rows": [5]}}) is None  # the list changed under the click


def test_latency_bounds_round_outward_to_whole_milliseconds() -> None:
    frame = pl.DataFrame({"latency_ms": [100.4567, 250.0, 300.0001, None]})
    assert views.latency_bounds(frame) == (100, 301)
    assert views.latency_bounds(pl.DataFrame({"latency_ms": [5.0, 5.0]}, schema={"latency_ms": pl.Float64})) is None
    assert views.latency_bounds(pl.DataFrame({"latency_ms": [None]}, schema={"latency_ms": pl.Float64})) is None


def test_results_frame_and_filters() -> None:
    ok = {"id": "r1", "custom_id": "a", "error": None, "obatch": {"line": 1, "latency_ms": 120.0}, "response": {
        "status_code": 200, "request_id": "q", "body": {
            "choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4}}}}
    failed = {"id": "r2", "custom_id": "b", "response": {"status_code": 400, "request_id": "q", "body": {
        "error": {"message": "too long", "code": "context_length_exceeded"}}},
              "error": {"code": "context_length_exceeded", "message": "too long"}}
    expired = {"id": "r3", "custom_id": "c", "response": None,
               "error": {"code": "batch_expired", "message": "late"}}
    frame = views.results_frame(jsonl(ok), jsonl(failed, expired))
    assert frame["custom_id"].to_list() == ["a", "b", "c"]
    assert frame["status"].to_list() == ["succeeded", "failed", "expired"]  # an unrun line is not a failure
    assert frame.schema == pl.Schema(result_schema())  # the notebook API's frame, column for column
    assert frame.row(0, named=True) == {
        "line": 1, "custom_id": "a", "model": None, "status": "succeeded", "status_code": 200, "content": "hi",
        "finish_reason": "length", "prompt_tokens": 3, "completion_tokens": 4, "latency_ms": 120.0,
        "ttft_ms": None, "num_ctx": None, "truncated": None, "attempts": None, "error_code": None,
        "error_message": None, "loaded_context": None, "seed": None, "refused_answers": None, "host": None,
        "engine": None, "engine_version": None, "model_digest": None, "cached_from": None}
    assert frame["error_code"].to_list()[1:] == ["context_length_exceeded", "batch_expired"]
    later = {**ok, "custom_id": "0-first-by-name", "obatch": {"line": 9}}
    assert views.results_frame(jsonl(later, ok))["line"].to_list() == [1, 9]  # input order, not the names'
    assert views.filter_results(frame, statuses=["failed"]).height == 1
    assert views.filter_results(frame, statuses=["failed", "expired"]).height == 2
    assert views.filter_results(frame, finish_reasons=["length"])["custom_id"].to_list() == ["a"]
    assert views.filter_results(frame, latency_ms=(0, 100)).height == 0
    assert views.options_of(frame, "status") == ["expired", "failed", "succeeded"]
    assert views.results_frame(None, None).is_empty()
    with pytest.raises(ValidationError):  # not an output line: said loudly, not shown as an empty row
        views.results_frame(jsonl({"custom_id": "a", "answer": "hi"}))


def test_results_frame_reads_the_lines_obatch_writes() -> None:
    """Lines written from store rows by ``batches.results._line`` read back into the same values the store holds."""
    body = {"model": "m", "choices": [{"message": {"role": "assistant", "content": "hello"},
                                       "finish_reason": "stop"}], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
    common = {"batch_id": "batch-1", "url": "/v1/chat/completions", "model": "m", "body": "{}", "latency_ms": 12.5,
              "ttft_ms": 3.0, "attempts": 2, "num_ctx": 2048, "truncated": False}
    rows = [RequestRow(line=1, custom_id="ok", state="succeeded", status_code=200, request_id="batch_req_1",
                       response=orjson.dumps(body).decode(), **common),
            RequestRow(line=2, custom_id="bad", state="failed", status_code=400, request_id="batch_req_2",
                       error_code="context_length_exceeded", error_message="too long", **common),
            RequestRow(line=3, custom_id="late", state="pending", **common)]
    stored = [(*(getattr(row, c) for c in results._OUTPUT_COLUMNS), row.line) for row in rows]  # as the driver reads
    written = [results._line(values, "batch_expired") for values in stored]
    assert [ok for ok, _ in written] == [True, False, False]
    for _, data in written:  # the fast writer says what model_dump says
        line = OutputLine.model_validate_json(data)
        assert line.to_jsonl() == data == orjson.dumps(line.model_dump()) + b"\n"
    extra = OutputLine(id="x", custom_id="y", error=LineError(code="c", message="m", hint="h"), note=1)
    assert orjson.loads(extra.to_jsonl()) == extra.model_dump()
    output = b"".join(data for ok, data in written if ok)
    error = b"".join(data for ok, data in written if not ok)
    bad = orjson.loads(error.splitlines()[0])
    assert bad["response"]["body"] == {"error": {"message": "too long", "type": "invalid_request_error",
                                                 "param": None, "code": "context_length_exceeded"}}
    frame = views.results_frame(output, error)
    by_id = {row["custom_id"]: row for row in frame.iter_rows(named=True)}
    assert by_id["ok"] == {
        "line": 1, "custom_id": "ok", "model": "m", "status": "succeeded", "status_code": 200, "content": "hello",
        "finish_reason": "stop", "prompt_tokens": 5, "completion_tokens": 2, "latency_ms": 12.5, "ttft_ms": 3.0,
        "num_ctx": 2048, "truncated": False, "attempts": 2, "error_code": None, "error_message": None,
        "loaded_context": None, "seed": None, "refused_answers": None, "host": None, "engine": None,
        "engine_version": None, "model_digest": None, "cached_from": None}
    assert (by_id["bad"]["status"], by_id["bad"]["status_code"], by_id["bad"]["error_code"]) == \
        ("failed", 400, "context_length_exceeded")
    assert (by_id["late"]["status"], by_id["late"]["error_code"], by_id["late"]["line"]) == \
        ("expired", "batch_expired", 3)  # never ran: not a failure


def test_estimates_are_rendered_from_the_servers_models() -> None:
    assert views.estimate_seconds(ESTIMATE) == (100, 80, 130)
    assert views.describe_estimate(ESTIMATE) == "about 1 min 40 s (1 min 20 s – 2 min 10 s)"
    assert views.describe_estimate(None) is None and views.estimate_seconds(None) == (None, None, None)
    assert views.estimate_config(ESTIMATE) == "num_ctx 4096 · concurrency 4"
    assert views.estimate_config(ESTIMATE.model_copy(update={"num_ctx": None})) is None
    # the batch object carries the estimate made at its start, parsed into the same model
    started = batch(in_progress_at=1000, request_counts={"total": 100, "completed": 0, "failed": 0},
                    obatch={"estimate": ESTIMATE.model_dump(mode="json")})
    assert started.obatch is not None and started.obatch.estimate == ESTIMATE
    assert views.batch_progress(started, now=1030).eta_s == 70
    record = views.estimate_record_frame([
        EstimateRecord(batch_id="b", models="m", requests=5, estimated_seconds=10, low=8, high=11, actual_seconds=12,
                       error_pct=-16.7, within_interval=False),
        EstimateRecord(batch_id="c", models="m,n", requests=5, estimated_seconds=10, low=8, high=14,
                       actual_seconds=12, error_pct=-16.7, within_interval=True)])
    assert record.columns == list(views.ESTIMATE_RECORD_SCHEMA)
    assert record["within_interval"].to_list() == [False, True]
    assert record["models"].to_list() == ["m", "m,n"]
    assert views.estimate_record_chart(record).to_dict()["layer"]


def test_models_frame() -> None:
    frame = views.models_frame([Model(id="a", context_length=4096, loaded=True), Model(id="b")])
    assert frame["id"].to_list() == ["a", "b"]
    assert frame["loaded"].to_list() == [True, False]
    assert frame["context_length"].to_list() == [4096, None]


def test_obatch_ui_runs_the_packaged_app_or_the_one_named(tmp_path: Path) -> None:
    packaged = Path(views.__file__).resolve().parents[1] / "app.py"  # obatch/ui/app.py, wherever obatch is
    assert find_app({}) == packaged and packaged.is_file()
    mine = tmp_path / "streamlit_app.py"
    mine.write_text("")
    assert find_app({"OBATCH_UI_APP": str(mine)}) == mine.resolve()
    with pytest.raises(ConfigError, match="OBATCH_UI_APP") as caught:
        find_app({"OBATCH_UI_APP": str(tmp_path / "elsewhere.py")})
    assert str(tmp_path / "elsewhere.py") in caught.value.message
    command = streamlit_command(mine, port=9999)
    assert command[1:4] == ["-m", "streamlit", "run"]
    assert command[command.index("--server.address") + 1] == "127.0.0.1"
    assert command[command.index("--server.port") + 1] == "9999"




def test_results_frame_says_where_a_reused_answer_came_from() -> None:
    origin = {"batch_id": "batch_a", "custom_id": "q1"}
    reused = {"id": "r1", "custom_id": "q1", "error": None, "obatch": {"line": 1, "cached_from": origin},
              "response": {"status_code": 200, "request_id": "q", "body": {"choices": []}}}
    answered = {**reused, "custom_id": "q2", "obatch": {"line": 2, "host": "http://h:11434"}}
    frame = views.results_frame(jsonl(reused, answered))
    assert frame["cached_from"].to_list() == [origin, None]
    assert views.for_display(frame)["cached_from"].to_list() == [origin, None]  # shown as it is
