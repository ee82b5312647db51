"""A batch's reuse, retries and results while it runs on the Batches page: the view logic (``obatch.ui.views.runs``)
as plain functions, and the page under AppTest against the in-memory server (``tests.ui_fake``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import polars as pl
import pytest
from streamlit.testing.v1 import AppTest

from obatch.api import result_schema
from obatch.client import Client
from obatch.protocol import Batch
from obatch.testing.ollama_sim import OllamaSim
from obatch.ui import views
from obatch.ui.session import CLIENT_KEY
from tests.helpers import chat_line
from tests.helpers import jsonl as server_jsonl
from tests.serverkit import FINAL, KEYS, ServerProcess
from tests.serverkit import chat_line as server_line
from tests.test_ui_apptest import GOOD, TIMEOUT, UI, jsonl, no_exception, table, texts
from tests.test_ui_apptest import fake as fake
from tests.test_ui_apptest import page as page
from tests.ui_fake import FakeServer


def batch(**fields: Any) -> Batch:
    return Batch.model_validate({"id": "batch-1", "object": "batch", "endpoint": "/v1/chat/completions",
                                 "input_file_id": "file-1", "completion_window": "24h", "status": "in_progress",
                                 "created_at": 1000} | fields)


def out_line(n: int, *, code: str | None = None, **stats: Any) -> dict[str, Any]:
    """An output (or, with ``code``, error) line of input line ``n``, as obatch writes it."""
    if code:
        return {"id": f"r{n}", "custom_id": f"c{n}", "response": None, "error": {"code": code, "message": "no"},
                "obatch": {"line": n}}
    body = {"choices": [{"message": {"content": f"answer {n}"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    return {"id": f"r{n}", "custom_id": f"c{n}", "response": {"status_code": 200, "request_id": f"q{n}", "body": body},
            "error": None,
            "obatch": {"line": n, **stats}}


class Server:
    """``/results`` over a list of lines of which the first ``done`` finished; records each ``after`` asked."""

    def __init__(self, lines: list[dict[str, Any]]) -> None:
        self.lines, self.done, self.final = lines, 0, False
        self.asked: list[int] = []

    def fetch(self, after: int, limit: int) -> tuple[bytes, int, bool]:
        self.asked.append(after)
        page = [x for x in self.lines[:self.done] if x["obatch"]["line"] > after][:limit]
        cursor = page[-1]["obatch"]["line"] if page else after
        rest = len([x for x in self.lines if x["obatch"]["line"] > cursor])
        return b"".join(orjson.dumps(x) + b"\n" for x in page), cursor, self.final and rest == 0


# ------------------------------------------------------------------------------------------------ views


def test_live_results_grow_from_the_cursor_and_never_read_a_line_twice() -> None:
    server = Server([out_line(n) for n in range(1, 26)])
    live = views.LiveResults()
    server.done = 3
    live = views.read_more(live, server.fetch, final=False, limit=2)
    assert live.frame["line"].to_list() == [1, 2, 3] and live.after == 3 and not live.finished
    assert server.asked == [0, 2]  # a full page, then a short one: caught up with the lines finished
    server.done = 20
    live = views.read_more(live, server.fetch, final=False, limit=2, pages=3)
    assert live.frame["line"].to_list() == list(range(1, 10))  # at most three pages a refresh while it runs
    assert server.asked == [0, 2, 3, 5, 7]
    server.done, server.final = 25, True
    live = views.read_more(live, server.fetch, final=True, limit=2, pages=1)  # final: every page to the end
    assert live.frame["line"].to_list() == list(range(1, 26)) and live.finished and live.after == 25
    assert len(server.asked) == len(set(server.asked))  # no cursor asked twice
    assert views.read_more(live, server.fetch, final=True) is live  # read whole: nothing is asked again
    assert len(server.asked) == 5 + 8


def test_retry_is_offered_only_for_retryable_failures_of_a_final_batch_not_retried_yet() -> None:
    server = Server([out_line(1), out_line(2, code="server_error"), out_line(3, code="model_not_found"),
                     out_line(4, code="batch_cancelled")])
    server.done, server.final = 4, True
    live = views.read_more(views.LiveResults(), server.fetch, final=True)
    assert views.retryable(live.frame) == 2  # the engine's error and the unrun line; not the unknown model
    assert views.offers_retry(batch(status="cancelled"), live) == 2
    assert views.offers_retry(batch(status="in_progress"), live) == 0
    assert views.offers_retry(batch(status="cancelled", obatch={"retries": ["batch-2"]}), live) == 0
    partial = views.LiveResults(live.frame, live.after, finished=False)
    assert views.offers_retry(batch(status="completed"), partial) == 0  # not every line read yet


def test_chain_and_reuse_of_a_batch() -> None:
    retry = batch(obatch={"parent": "batch-0", "cached": 3}, request_counts={"total": 8, "completed": 5, "failed": 0})
    assert (views.parent_of(retry), views.retries_of(retry)) == ("batch-0", [])
    assert views.retries_of(batch(obatch={"retries": ["batch-2", "batch-3"]})) == ["batch-2", "batch-3"]
    assert views.reuse_text(retry) == ("3 of 8 line(s) reused: answered from stored answers or an identical line "
                                       "of the file, without an engine call")
    assert views.reuse_text(batch()) is None and views.reuse_text(batch(obatch={"cached": 0})) is None
    row = views.batches_frame([retry, batch()]).select("cached", "retry of").rows()
    assert row == [(3, "batch-0"), (None, None)]


def test_provenance_of_an_answered_and_a_reused_line() -> None:
    fresh = out_line(1, host="http://h:11434", engine="ollama", engine_version="0.9.0", model_digest="sha256:ab",
                     num_ctx=2048, loaded_context=4096, seed=7, attempts=2)
    reused = out_line(2, num_ctx=2048, attempts=0, cached_from={"batch_id": "batch-0", "custom_id": "c9"})
    frame = views.results_frame(jsonl(fresh, reused), origin=True)
    first, second = (dict(views.provenance_frame(r).rows()) for r in frame.iter_rows(named=True))
    assert first == {"host": "http://h:11434", "engine": "ollama 0.9.0", "model digest": "sha256:ab",
                     "num_ctx": "2048 asked · 4096 loaded", "seed": "7", "attempts": "2", "cached_from": "—"}
    assert second == {"host": "— (reused: no engine ran it)", "engine": "—", "model digest": "—",
                      "num_ctx": "2048 asked · — loaded", "seed": "—", "attempts": "0 (reused)",
                      "cached_from": "c9 of batch-0"}
    assert frame["cached_from"].to_list() == [None, "c9 of batch-0"]
    assert views.results_frame(jsonl(fresh)).schema == pl.Schema(result_schema())


def test_a_chain_is_found_from_any_of_its_batches() -> None:
    known = {b.id: b for b in (
        batch(id="batch-0", created_at=1, obatch={"retries": ["batch-1", "batch-3"]}),
        batch(id="batch-1", created_at=2, obatch={"parent": "batch-0", "retries": ["batch-2"]}),
        batch(id="batch-2", created_at=3, obatch={"parent": "batch-1"}),
        batch(id="batch-3", created_at=4, obatch={"parent": "batch-0"}))}
    for member in known.values():  # root first, then the retries in creation order (not link order)
        assert [b.id for b in views.chain_of(member, known.__getitem__)] == ["batch-0", "batch-1", "batch-2",
                                                                           "batch-3"]
    alone = batch(id="batch-9")
    assert views.chain_of(alone, known.__getitem__) == [alone]


def test_merged_lines_name_the_batch_they_came_from_and_are_summed_up() -> None:
    again = out_line(1) | {"id": "s1", "custom_id": "c2"}  # c2 failed (r2) and succeeded in the retry, its line 1
    raw = jsonl(out_line(1), again, out_line(3, code="model_not_found"))
    frame = views.merged_frame(raw, {"r1": "batch-0", "r2": "batch-0", "r3": "batch-0", "s1": "batch-1"}, None)
    assert frame.columns[:3] == ["custom_id", views.FROM, "status"] and "line" not in frame.columns
    assert frame.select("custom_id", views.FROM, "status").rows() == [
        ("c1", "batch-0", "succeeded"), ("c2", "batch-1", "succeeded"), ("c3", "batch-0", "failed")]
    chain = [batch(id="batch-0", status="completed"),
             batch(id="batch-1", status="completed", obatch={"parent": "batch-0"})]
    assert views.merged_summary(frame, chain) == "3 lines: 2 succeeded — 1 of them in the retry batch-1; 1 still failed"
    # a retry still running: a line none of the final batches holds is the running batch's
    running = views.merged_frame(raw, {"r1": "batch-0", "r3": "batch-0"}, "batch-1")
    assert running[views.FROM].to_list() == ["batch-0", "batch-1", "batch-0"]
    chain[1] = batch(id="batch-1", status="in_progress", request_counts={"total": 2, "completed": 1, "failed": 0})
    assert views.merged_summary(frame, chain).endswith("; batch-1 is still running: 1 of its 2 lines to go")
    chain[0] = batch(id="batch-0", status="completed", request_counts={"total": 5, "completed": 3, "failed": 2})
    assert views.merged_summary(frame, chain).startswith(  # the server holds back what the retry has still to run
        "The first 3 of 5 lines (the rest wait for the retry): 2 succeeded — ")


# ------------------------------------------------------------------------------------------------- page


def test_results_fill_in_while_the_batch_runs(page: Callable[..., AppTest], fake: FakeServer) -> None:
    api = fake.client()
    lines = jsonl(*[chat_line(f"q{i}", f"question {i}") for i in range(6)])
    made = api.create_batch(api.upload_file(lines, "six.jsonl").id, endpoint="/v1/chat/completions")
    fake.progress(made.id, completed=2, lines=2)
    at = page("pages/batches.py")
    no_exception(at)
    assert list(table(at, "custom_id", "finish_reason")["custom_id"]) == ["q0", "q1"]
    assert any(t.startswith("Results so far: the first 2 of 6 lines") for t in texts(at.caption))
    fake.progress(made.id, completed=5, lines=5)
    at.run()
    assert list(table(at, "custom_id", "finish_reason")["custom_id"]) == ["q0", "q1", "q2", "q3", "q4"]
    fake.complete(made.id)
    at.run()
    assert list(table(at, "custom_id", "finish_reason")["custom_id"]) == [f"q{i}" for i in range(6)]
    assert not any(t.startswith("Results so far") for t in texts(at.caption))
    asked = [int(r.url.params.get("after", 0)) for r in fake.sent("GET", f"/v1/batches/{made.id}/results")]
    assert asked[:3] == [0, 2, 5] and len(asked) == len(set(asked))  # from the cursor: nothing read twice


def test_retry_failed_lines_makes_a_linked_batch(page: Callable[..., AppTest], fake: FakeServer) -> None:
    api = fake.client()
    made = api.create_batch(api.upload_file(GOOD, "chat.jsonl").id, endpoint="/v1/chat/completions")
    fake.complete(made.id)  # q2 fails with server_error: a retry can change that
    at = page("pages/batches.py")
    no_exception(at)
    button = at.button(key=f"retry-{made.id}")
    assert button.label == "Retry failed lines (1)"
    button.click().run()
    no_exception(at)
    (retry,) = [b for b in fake.batches.values() if b["id"] != made.id]
    assert retry["obatch"]["parent"] == made.id and fake.batches[made.id]["obatch"]["retries"] == [retry["id"]]
    assert at.selectbox(key="batch_pick").value == retry["id"]  # the new batch is opened
    assert any(f"Retrying the failed lines of **{made.id}** as **{retry['id']}** (1 line(s))" in m.value
               for m in at.success)
    assert at.button(key=f"parent-{retry['id']}").label == made.id  # one click back to the batch it retries
    listed = table(at, "id", "retry of")
    assert listed.set_index("id").loc[retry["id"], "retry of"] == made.id
    at.button(key=f"parent-{retry['id']}").click().run()
    assert at.selectbox(key="batch_pick").value == made.id
    assert at.button(key=f"child-{made.id}-{retry['id']}").label == retry["id"]
    assert not [b for b in at.button if b.key == f"retry-{made.id}"]  # retried: the button leaves


def test_no_retry_button_without_retryable_failures(page: Callable[..., AppTest], fake: FakeServer
                                                    ) -> None:
    api = fake.client()
    made = api.create_batch(api.upload_file(jsonl(chat_line("q1", "hello")), "ok.jsonl").id,
                            endpoint="/v1/chat/completions")
    fake.complete(made.id, reused=1)
    at = page("pages/batches.py")
    no_exception(at)
    assert not [b for b in at.button if (b.key or "").startswith("retry-")]
    assert (":material/recycling: 1 of 1 line(s) reused: answered from stored answers or an identical line of "
            "the file, without an engine call.") in texts(at.caption)
    results = table(at, "custom_id", "cached_from")
    assert list(results["cached_from"]) == ["q1 of batch-earlier"]


# ---------------------------------------------------------------------------------- a real retry chain


@pytest.fixture
def faulty_engine(obatch_sim: OllamaSim) -> Iterator[OllamaSim]:
    """The shared simulator answering 60% of its requests with an engine error, until the test ends."""
    obatch_sim.config.error_rate = 0.6
    try:
        yield obatch_sim
    finally:
        obatch_sim.config.error_rate = 0.0


def wait_final(api: Client, batch_id: str) -> Batch:
    deadline = time.monotonic() + 60
    while (batch := api.get_batch(batch_id)).status not in FINAL:
        assert time.monotonic() < deadline, batch.status
        time.sleep(0.1)
    return batch


def opened(api: Client, batch_id: str) -> AppTest:
    """The Batches page of ``api``'s key with ``batch_id`` opened."""
    at = AppTest.from_file(str(UI / "pages/batches.py"), default_timeout=TIMEOUT)
    at.session_state[CLIENT_KEY] = api
    at.run()
    at.selectbox(key="batch_pick").set_value(batch_id).run()
    no_exception(at)
    return at


def outcomes(api: Client, batch_id: str) -> dict[str, dict[str, Any]]:
    """A batch's own results (not merged) by custom_id."""
    return {x["custom_id"]: x for x in api.follow_results(batch_id, timeout=30)}


def test_a_retry_chains_merged_results_on_a_real_server(obatch_server: ServerProcess, faulty_engine: OllamaSim
                                                        ) -> None:
    lines = [server_line(f"m{i:02d}") for i in range(20)] + [server_line("m-ghost", model="no-such-model")]
    with Client(obatch_server.url, api_key=KEYS["carol"]) as api:
        uploaded = api.upload_file(server_jsonl(lines), "chain.jsonl")
        first = wait_final(api, api.create_batch(uploaded.id, endpoint="/v1/chat/completions", concurrency=4).id)
        faulty_engine.config.error_rate = 0.0  # the retry meets a healthy engine
        at = opened(api, first.id)
        assert not [t for t in at.toggle if t.key == f"merged-{first.id}"]  # not part of a chain yet
        at.button(key=f"retry-{first.id}").click().run()
        retry_id = at.selectbox(key="batch_pick").value
        assert retry_id != first.id
        retry = wait_final(api, retry_id)
        at.run()
        at.toggle(key=f"merged-{retry_id}").set_value(True).run()
        no_exception(at)

        mine, again = outcomes(api, first.id), outcomes(api, retry_id)
        assert 0 < len(again) < 20 and retry.request_counts and retry.request_counts.total == len(again)
        expected = [(x["custom_id"], retry_id if x["custom_id"] in again else first.id,
                     again.get(x["custom_id"], mine[x["custom_id"]])) for x in lines]
        merged = table(at, "custom_id", views.FROM)
        assert list(merged["custom_id"]) == [c for c, _, _ in expected]  # every line once, in the first's order
        assert list(merged[views.FROM]) == [b for _, b, _ in expected]
        assert list(merged["error_code"]) == [(x["error"] or {}).get("code") or views.BLANK for _, _, x in expected]
        ok = [c for c, _, x in expected if x["error"] is None]
        from_retry = [c for c, b, x in expected if b == retry_id and x["error"] is None]
        assert from_retry and "m-ghost" not in ok  # the refused line stays failed; the engine's errors did not
        assert (f"{len(lines)} lines: {len(ok)} succeeded — {len(from_retry)} of them in the retry {retry_id}; "
                f"{len(lines) - len(ok)} still failed.") in texts(at.caption)
        at.selectbox(key="batch_pick").set_value(first.id).run()  # the same chain from its first batch
        at.toggle(key=f"merged-{first.id}").set_value(True).run()
        assert list(table(at, "custom_id", views.FROM)[views.FROM]) == [b for _, b, _ in expected]

        for file_id in (first.output_file_id, first.error_file_id):  # the first batch's files are deleted
            assert file_id and api.delete_file(file_id)
        at = opened(api, retry_id)
        at.toggle(key=f"merged-{retry_id}").set_value(True).run()
        no_exception(at)
        (said,) = [w.value for w in at.warning if "merged results" in w.value]
        assert said.startswith("The chain's merged results cannot be read: The output or error file of batch "
                               f"{first.id} is gone")
        assert not [d for d in at.dataframe if views.FROM in d.value.columns]
        at = opened(api, first.id)  # the batch whose files are gone: said where they were, the page goes on
        gone = [c for c in texts(at.caption) if "is gone (deleted, or past its expiry)" in c]
        assert gone == [f"The output file `{first.output_file_id}` is gone (deleted, or past its expiry).",
                        f"The error file `{first.error_file_id}` is gone (deleted, or past its expiry)."]
        assert at.toggle(key=f"merged-{first.id}") is not None  # drawn: the page was not stopped


def test_a_chains_merged_results_fill_in_while_its_retry_runs(page: Callable[..., AppTest], fake: FakeServer
                                                             ) -> None:
    api = fake.client()
    lines = jsonl(*[chat_line(f"q{i}", "please fail" if i in (1, 3) else f"question {i}") for i in range(5)])
    made = api.create_batch(api.upload_file(lines, "five.jsonl").id, endpoint="/v1/chat/completions")
    fake.complete(made.id)  # q1 and q3 fail with server_error
    at = page("pages/batches.py")
    at.button(key=f"retry-{made.id}").click().run()
    retry = at.selectbox(key="batch_pick").value
    at.toggle(key=f"merged-{retry}").set_value(True).run()
    no_exception(at)

    def shown() -> list[tuple[str, str, str]]:
        return [tuple(r) for r in table(at, "custom_id", views.FROM)[["custom_id", views.FROM, "status"]].values]

    assert shown() == [("q0", made.id, "succeeded"), ("q1", made.id, "failed"), ("q2", made.id, "succeeded"),
                       ("q3", made.id, "failed"), ("q4", made.id, "succeeded")]
    assert (f"5 lines: 3 succeeded; 2 still failed; {retry} is still running: 2 of its 2 lines to go."
            in texts(at.caption))
    fake.progress(retry, completed=1, lines=1)  # the retry's first line (q1) finished
    at.run()
    assert shown()[1] == ("q1", retry, "succeeded") and shown()[3] == ("q3", made.id, "failed")
    assert (f"5 lines: 4 succeeded — 1 of them in the retry {retry}; 1 still failed; {retry} is still running: "
            "1 of its 2 lines to go.") in texts(at.caption)
    fake.complete(retry)
    at.run()
    assert [b for _, b, _ in shown()] == [made.id, retry, made.id, retry, made.id]
    assert f"5 lines: 5 succeeded — 2 of them in the retry {retry}." in texts(at.caption)
    merged = len([r for r in fake.requests if r.url.params.get("merged") == "true"])
    at.run()  # the chain is final: what was read is kept
    assert len([r for r in fake.requests if r.url.params.get("merged") == "true"]) == merged
