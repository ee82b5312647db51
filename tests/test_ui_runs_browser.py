"""Retries, reuse and results while a batch runs on the Batches page, in a real browser (Chromium via Playwright
against `obatch ui` + `obatch serve` + the Ollama simulator): a batch with engine failures retried from its button,
the chain shown both ways; results filling in while a slowed batch runs; a reused line's row naming the line it
came from.

Screenshots go to tests/artifacts/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.browser import MODELS, Stack, browser_page, needs_chromium, running_stack, settle, shot

pytestmark = needs_chromium
FINAL = ("completed", "failed", "expired", "cancelled")


@pytest.fixture(scope="module")
def runs_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A slow engine that fails 30% of its requests, and a server that tries each line once (so they fail)."""
    engine = ("--decode-tps", "40", "--output-tokens", "200", "--error-rate", "0.3", "--seed", "3")
    with running_stack(tmp_path_factory.mktemp("runs"), engine, max_attempts=1, concurrency=2) as made:
        yield made


def lines(prefix: str, n: int, max_tokens: int) -> bytes:
    return b"".join(orjson.dumps({"custom_id": f"{prefix}{i:02d}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": {"model": MODELS[0], "max_tokens": max_tokens, "temperature": 0,
                                           "messages": [{"role": "user", "content": f"{prefix} question {i}"}]}})
                    + b"\n" for i in range(n))


def client(stack: Stack, request: pytest.FixtureRequest) -> httpx.Client:
    """A client of the stack's server, closed when the test ends."""
    api = httpx.Client(base_url=stack.server_url, timeout=30)
    request.addfinalizer(api.close)
    return api


def submit(api: httpx.Client, data: bytes, name: str) -> str:
    file_id = api.post("/v1/files", files={"file": (name, data)}, data={"purpose": "batch"}).json()["id"]
    batch = api.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                          "completion_window": "24h", "metadata": {"filename": name}})
    return str(batch.json()["id"])


def final(api: httpx.Client, batch_id: str, within: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while (batch := api.get(f"/v1/batches/{batch_id}").json())["status"] not in FINAL:
        assert time.monotonic() < deadline, batch["status"]
        time.sleep(0.2)
    return dict(batch)


def status_is(page: Any, status: str) -> Any:
    return page.locator("[data-testid='stMarkdownContainer'] code", has_text=re.compile(rf"^{status}$"))


def test_a_batch_with_failures_is_retried_and_the_page_shows_the_chain(runs_stack: Stack, browser: Any,
                                                                         request: pytest.FixtureRequest) -> None:
    from playwright.sync_api import expect

    stack = runs_stack
    api = client(stack, request)
    first = final(api, submit(api, lines("q", 20, 4), "flaky.jsonl"))
    failed = first["request_counts"]["failed"]
    assert failed > 0, first  # 30% of the engine's answers are errors
    with browser_page(browser, "ui-failure-runs-retry", viewport={"width": 1400, "height": 1400}) as page:
        page.goto(f"{stack.ui_url}/batches")
        expect(status_is(page, "completed")).to_be_visible(timeout=30_000)
        button = page.get_by_role("button", name=f"Retry failed lines ({failed})")
        expect(button).to_be_visible(timeout=30_000)
        shot(page, "ui-runs-1-failures")
        button.click()
        expect(page.get_by_text(re.compile(rf"^Retr(ying|ied) the failed lines of {first['id']} as batch"))
               ).to_be_visible(timeout=30_000)
        expect(page.get_by_text("Retry of the failed lines of")).to_be_visible()
        retry_id = api.get(f"/v1/batches/{first['id']}").json()["obatch"]["retries"][0]
        assert api.get(f"/v1/batches/{retry_id}").json()["obatch"]["parent"] == first["id"]
        assert api.get(f"/v1/batches/{retry_id}").json()["request_counts"]["total"] == failed
        expect(status_is(page, "completed")).to_be_visible(timeout=60_000)  # the retry ran, the page followed it
        expect(page.get_by_text(f"{failed} of {failed} requests run")).to_be_visible()
        shot(page, "ui-runs-2-retry-done")
        page.get_by_role("button", name=first["id"], exact=True).click()  # back to the batch it retries
        expect(page.get_by_text("Its failed lines were retried in 1 batch(es):")).to_be_visible(timeout=15_000)
        expect(page.get_by_role("button", name=retry_id, exact=True)).to_be_visible()
        expect(page.get_by_role("button", name=re.compile(r"^Retry failed lines"))).to_have_count(0)
        shot(page, "ui-runs-3-parent-links-its-retry")


def test_results_fill_in_while_a_batch_runs(runs_stack: Stack, browser: Any, request: pytest.FixtureRequest
                                            ) -> None:
    from playwright.sync_api import expect

    stack = runs_stack
    api = client(stack, request)
    so_far = re.compile(r"^Results so far: the first (\d+) of 60 lines")
    with browser_page(browser, "ui-failure-runs-live", viewport={"width": 1400, "height": 1400}) as page:
        page.goto(f"{stack.ui_url}/batches")  # the page drawn once (a cold UI takes seconds), then the batch
        expect(page.get_by_role("heading", name="Your batches")).to_be_visible(timeout=60_000)
        batch_id = submit(api, lines("slow", 60, 40), "slow.jsonl")  # a second a line, two at a time
        request.addfinalizer(lambda: (api.post(f"/v1/batches/{batch_id}/cancel"), final(api, batch_id)))
        page.reload()
        caption = page.get_by_text(so_far)
        expect(caption).to_be_visible(timeout=30_000)
        deadline = time.monotonic() + 30
        while (first := int(so_far.match(caption.inner_text()).group(1))) < 2:  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            page.wait_for_timeout(300)
        expect(page.get_by_text(re.compile(r"^\d+ of \d+ requests · click a row"))).to_be_visible()
        page.get_by_test_id("stDataFrame").last.scroll_into_view_if_needed()
        page.wait_for_timeout(800)  # the grid draws itself after the script
        shot(page, "ui-runs-4-partial-results")
        deadline = time.monotonic() + 30
        while (later := int(so_far.match(caption.inner_text()).group(1))) <= first + 2:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, later
            page.wait_for_timeout(300)
        assert api.get(f"/v1/batches/{batch_id}").json()["status"] == "in_progress"  # still running: live rows
        page.wait_for_timeout(800)
        shot(page, "ui-runs-5-more-results")
        assert first < later < 60


def test_a_reused_lines_row_names_the_line_it_came_from(runs_stack: Stack, browser: Any,
                                                        request: pytest.FixtureRequest) -> None:
    from playwright.sync_api import expect

    stack = runs_stack
    api = client(stack, request)
    first = final(api, submit(api, lines("r", 12, 4), "known.jsonl"))
    output = api.get(f"/v1/files/{first['output_file_id']}/content").content
    answered = {orjson.loads(x)["custom_id"] for x in output.splitlines()}
    again = b"".join(x + b"\n" for x in lines("r", 12, 4).splitlines() if orjson.loads(x)["custom_id"] in answered)
    second = final(api, submit(api, again, "known-again.jsonl"))
    assert second["obatch"]["cached"] == len(answered)  # every line answered before: reused
    tall = {"width": 1400, "height": 2400}  # the opened row fits in the shot
    with browser_page(browser, "ui-failure-runs-reused", viewport=tall) as page:
        page.goto(f"{stack.ui_url}/batches")
        expect(page.get_by_text(f"{len(answered)} of {len(answered)} line(s) reused")).to_be_visible(timeout=30_000)
        results = page.get_by_test_id("stDataFrame").last
        results.scroll_into_view_if_needed()
        settle(page)
        box = results.bounding_box()
        page.mouse.click(box["x"] + 18, box["y"] + 35 * 1.5)  # the row-selection box of the first result
        expect(page.get_by_text("Provenance", exact=True)).to_be_visible(timeout=15_000)
        origin = sorted(answered)[0]
        expect(page.get_by_text(f"cached_from: {origin} of {first['id']}")).to_be_visible()
        expect(page.get_by_text("attempts: 0 (reused)")).to_be_visible()
        page.wait_for_timeout(800)
        shot(page, "ui-runs-6-reused-row")
        lines_read = api.get(f"/v1/batches/{second['id']}/results").content.splitlines()
        assert orjson.loads(lines_read[0])["obatch"]["cached_from"] == {"batch_id": first["id"], "custom_id": origin}


def test_a_chains_merged_results_say_which_batch_each_line_came_from(runs_stack: Stack, browser: Any,
                                                                     request: pytest.FixtureRequest) -> None:
    from playwright.sync_api import expect

    stack = runs_stack
    api = client(stack, request)
    first = final(api, submit(api, lines("m", 20, 4), "chain.jsonl"))
    assert first["request_counts"]["failed"] > 0, first  # 30% of the engine's answers are errors
    retry = final(api, api.post(f"/v1/batches/{first['id']}/retry").json()["id"])
    merged = [orjson.loads(x) for x in api.get(f"/v1/batches/{retry['id']}/results",
                                               params={"merged": "true", "limit": 1000}).content.splitlines()]
    ok = sum(1 for x in merged if x["error"] is None)
    with browser_page(browser, "ui-failure-runs-merged", viewport={"width": 1400, "height": 2000}) as page:
        page.goto(f"{stack.ui_url}/batches")  # the newest batch, the retry, is open
        expect(page.get_by_text("Retry of the failed lines of")).to_be_visible(timeout=30_000)
        page.get_by_text("Merged results of the chain").click()
        summary = page.get_by_text(re.compile(rf"^20 lines: {ok} succeeded"))
        expect(summary).to_be_visible(timeout=30_000)
        if ok > first["request_counts"]["completed"]:  # some of the retried lines succeeded this time
            expect(summary).to_contain_text(f"of them in the retry {retry['id']}")
        grid = page.get_by_test_id("stDataFrame").filter(has_text="from batch")
        grid.scroll_into_view_if_needed()
        expect(grid.locator("[data-testid^='glide-cell']", has_text=retry["id"]).first).to_be_attached()
        expect(grid.locator("[data-testid^='glide-cell']", has_text=first["id"]).first).to_be_attached()
        page.wait_for_timeout(800)  # the grid draws itself after the script
        shot(page, "ui-runs-7-merged-chain")
