"""The Batches page under AppTest against the in-memory server (``tests.ui_fake``): tables without a grey "None",
the estimate against the completion window picked (a miss, by how much, what would meet it), the strict window's
refusal, and a blind estimate labelled a guess with the pilot offered first."""

from __future__ import annotations

from collections.abc import Callable

import polars as pl
from streamlit.testing.v1 import AppTest

from obatch.protocol import DeadlinePlan
from obatch.ui import views
from tests.test_ui_apptest import GOOD, no_exception, table, texts, upload
from tests.test_ui_apptest import fake as fake
from tests.test_ui_apptest import page as page
from tests.ui_fake import RUN_STORY, FakeServer, _extension, fake_estimate


def none_cells(at: AppTest) -> list[tuple[int, str]]:
    """(table, column) of every cell the page draws as "None": a missing value, or the text itself."""
    found = []
    for n, frame in enumerate(d.value for d in at.dataframe):
        for column in frame.columns:
            values = frame[column]
            if values.isna().any() or (values.astype(str) == "None").any():
                found.append((n, column))
    return found


def test_no_table_on_the_batches_page_shows_none(page: Callable[..., AppTest], fake: FakeServer) -> None:
    """A finished batch with a reused line (no host), a failed one (no tokens, no latency), its hosts and level
    history; a running batch (no output file yet); a refused one (its problems)."""
    api = fake.client()
    done = api.create_batch(api.upload_file(GOOD, "chat.jsonl").id, endpoint="/v1/chat/completions")
    fake.complete(done.id, latency=True, reused=1)
    fake.batches[done.id]["obatch"] = _extension(fake.batches[done.id], concurrency=RUN_STORY)
    running = api.create_batch(api.upload_file(GOOD, "again.jsonl").id, endpoint="/v1/chat/completions")
    fake.progress(running.id, 1)
    refused = api.create_batch(api.upload_file(GOOD, "bad.jsonl").id, endpoint="/v1/chat/completions")
    fake.batches[refused.id].update(status="failed", failed_at=1, errors={"object": "list", "data": [
        {"code": "invalid_json_line", "line": None, "message": "The file is empty.", "param": None}]})
    at = page("pages/batches.py")
    at.toggle[0].set_value(False).run()  # no refresh timer while the test looks
    for opened in (refused.id, done.id):
        at.selectbox(key="batch_pick").set_value(opened).run()
        no_exception(at)
        assert len(at.dataframe) >= 2 and none_cells(at) == []
    results = table(at, "custom_id", "finish_reason")
    failed = results[results["status"] == "failed"].iloc[0]
    assert (failed["latency_ms"], failed["completion_tokens"], failed["error_code"]) == ("—", "—", "server_error")
    assert list(results["latency_ms"]) == ["100.5", "—", "300.5"]  # the format kept where there is a value
    assert list(table(at, "id", "progress")["output_file_id"]).count("—") == 2  # the running and refused ones
    assert list(table(at, "host", "step")["concurrency"]) == [4, 6]


def test_the_estimate_says_a_short_window_is_missed_and_what_would_meet_it(
        page: Callable[..., AppTest], fake: FakeServer) -> None:
    fake.estimate_scale = 20.0  # 14 min [10 min, 20 min] at concurrency 4; concurrency 8 twice as fast
    at = upload(page("pages/batches.py"), "chat.jsonl", GOOD)
    no_exception(at)
    assert "Expected to finish well within the 24 h completion window." in texts(at.caption)
    at.selectbox[1].set_value("10m").run()
    no_exception(at)
    (asked,) = {r.url.params["completion_window"] for r in fake.sent("GET", "/v1/benchmarks/estimate")} - {"24h"}
    assert asked == "10m"
    (miss,) = [t for t in texts(at.warning) if "completion window" in t]
    assert miss.startswith("Expected to miss the 10 min completion window by 4 min 0 s: estimated 14 min 0 s "
                           "(10 min 0 s – 20 min 0 s).")
    assert "Would meet it:\n- num_ctx 2048 · concurrency 8: about 7 min 0 s" in miss
    assert "The estimate is a guess until a pilot measures the answers." in miss  # no pilot ran yet
    at.selectbox[1].set_value("30m").run()
    assert "Expected to finish well within the 30 min completion window." in texts(at.caption)
    assert not [t for t in texts(at.warning) if "completion window" in t]
    at.selectbox[1].set_value("10m").run()
    at.button(key="submit").click().run()
    (made,) = fake.batches.values()
    assert made["completion_window"] == "10m" and "obatch_strict_window" not in made["metadata"]
    (opened,) = [t for t in texts(at.warning) if t.startswith("At its creation this batch was")]
    assert opened.startswith("At its creation this batch was expected to miss the 10 min completion window by "
                             "4 min 0 s: estimated 14 min 0 s (10 min 0 s – 20 min 0 s).")
    assert "- num_ctx 2048 · concurrency 8: about 7 min 0 s" in opened


def test_the_strict_window_refusal_is_the_servers_message(page: Callable[..., AppTest], fake: FakeServer) -> None:
    fake.estimate_scale = 30.0  # even the lower bound (15 min) is past a 10 min window
    at = upload(page("pages/batches.py"), "chat.jsonl", GOOD)
    at.selectbox[1].set_value("10m").run()
    assert any("even the lower bound is past it" in t for t in texts(at.warning))
    at.checkbox(key="strict_window").check().run()
    at.button(key="submit").click().run()
    no_exception(at)
    assert fake.batches == {}
    (sent,) = fake.sent("POST", "/v1/batches")
    assert b'"obatch_strict_window":"true"' in sent.content
    (refusal,) = [t for t in texts(at.error) if "completion_window" in t]
    assert "[completion_window_too_short]" in refusal and "cannot finish within its completion_window" in refusal
    assert at.button(key="submit").disabled is False  # the form stays: a longer window can be picked
    at.selectbox[1].set_value("1h").run()
    at.button(key="submit").click().run()
    assert len(fake.batches) == 1


def test_a_blind_estimate_is_a_guess_and_the_pilot_comes_first(page: Callable[..., AppTest],
                                                               fake: FakeServer) -> None:
    at = upload(page("pages/batches.py"), "chat.jsonl", GOOD)
    no_exception(at)
    (guess,) = [t for t in texts(at.info) if t.startswith("Answer lengths unknown")]
    assert "the duration below is a **guess**" in guess and "Run a pilot first" in guess
    buttons = [b.key for b in at.button]
    assert buttons.index("pilot") < buttons.index("submit")
    at.button(key="pilot").click().run()
    no_exception(at)
    assert not [t for t in texts(at.info) if t.startswith("Answer lengths unknown")]  # measured now
    assert "pilot" not in [b.key for b in at.button]


def test_deadline_view_words() -> None:
    assert [views.format_window(s) for s in (86400, 7 * 86400, 21600, 600, 90, 45)] == [
        "24 h", "7 d", "6 h", "10 min", "1 min 30 s", "45 s"]
    assert views.deadline_view(None) is None
    assert views.deadline_view(DeadlinePlan(window_seconds=600, message="no estimate")) is None
    risk = views.deadline_view(DeadlinePlan(window_seconds=1000, seconds=840, low=600, high=1200, message="m"))
    assert risk == views.DeadlineView("risk", "Expected to finish within the 16 min 40 s completion window, though "
                                              "the estimate's upper bound is past it by 3 min 20 s.", [])
    frame = pl.DataFrame({"x": [1.0, None], "ok": [True, None]})
    assert views.blanks(frame, {"x": "%.1f"}).rows() == [("1.0", "yes"), ("—", "—")]


def test_a_guess_is_the_servers_word_and_a_pilot_ends_it() -> None:
    blind = fake_estimate({"input_file_id": "file-1"})
    assert views.is_guess(blind) and views.offers_pilot(blind)
    assert not views.is_guess(fake_estimate({"input_file_id": "file-1", "pilot": "auto"}))
    assert not views.is_guess(fake_estimate({"input_file_id": "file-1"}, piloted=True))
    unknown = blind.model_copy(update={"guess": False})  # answers unknown, but the server does not call it a guess
    assert not views.is_guess(unknown) and views.offers_pilot(unknown)
    assert not views.is_guess(None)
