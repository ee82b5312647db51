"""A deadline-aware plan on the Batches page in a real browser (Chromium via Playwright against `obatch ui` +
`obatch serve` + the Ollama simulator): after a small sweep, a file uploaded with a completion window typed in
that is too short says before it is sent that it is expected to miss it, by how much and what would meet it; the
batch opened after the submit says it too. A window the server refuses is said in its words, the duration still
estimated, the submit held back.

Screenshots go to tests/artifacts/ (git-ignored) for a person to look at: ui-deadline-*.png.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from obatch.ui import views
from tests.browser import MODELS, Stack, browser_page, needs_chromium, running_stack, settle, shot
from tests.test_ui_runs_browser import lines

pytestmark = needs_chromium
WINDOW = "2m"


@pytest.fixture(scope="module")
def slow_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """An engine that writes 40 tokens a second per request: a file of long answers takes minutes."""
    with running_stack(tmp_path_factory.mktemp("deadline"), ("--decode-tps", "40")) as made:
        yield made


def sweep(api: httpx.Client, model: str) -> None:
    """A small sweep of ``model`` (concurrency 1 and 2, a few short requests each), to its end."""
    made = api.post("/v1/benchmarks/sweeps", json={"models": [model], "concurrency": [1, 2], "requests": 4,
                                                   "workload": "tiny"}).json()
    deadline = time.monotonic() + 120
    while (state := api.get(f"/v1/benchmarks/sweeps/{made['id']}").json())["status"] != "completed":
        assert state["status"] in ("queued", "in_progress") and time.monotonic() < deadline, state
        time.sleep(0.5)


def test_a_short_window_is_said_to_be_missed_before_and_after_the_submit(
        slow_stack: Stack, browser: Any, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    from playwright.sync_api import expect

    stack = slow_stack
    api = httpx.Client(base_url=stack.server_url, timeout=30)
    request.addfinalizer(api.close)
    sweep(api, MODELS[0])
    path = tmp_path / "long-answers.jsonl"
    path.write_bytes(lines("d", 60, 400))  # answers of up to 400 tokens, their length unknown: a guess
    with browser_page(browser, "ui-deadline-failure", logs=stack.logs,
                      viewport={"width": 1400, "height": 1500}) as page:
        page.goto(f"{stack.ui_url}/batches")
        expect(page.get_by_text("Batch input file").first).to_be_visible(timeout=30_000)
        page.locator("input[type=file]").set_input_files(str(path))
        expect(page.get_by_text("Expected duration from the benchmarks").first).to_be_visible(timeout=60_000)
        expect(page.get_by_text("completion window").first).to_be_visible(timeout=30_000)
        window = page.locator("[data-testid='stSelectbox']").filter(has_text="Completion window")
        for typed in ("90d", WINDOW):  # one the server refuses (past 7 days), then a short one
            window.locator("input").click()
            page.keyboard.type(typed)
            page.keyboard.press("Enter")
            settle(page)
            if typed == "90d":
                expect(page.get_by_text("Completion window: completion_window must be between")).to_be_visible(
                    timeout=30_000)
                expect(page.get_by_text("Expected duration from the benchmarks").first).to_be_visible()
                expect(page.get_by_role("button", name="Submit batch")).to_be_disabled()
                shot(page, "ui-deadline-0-window-refused")
        miss = page.get_by_text("Expected to miss the 2 min completion window by")
        expect(miss).to_be_visible(timeout=60_000)
        (file_id,) = [f["id"] for f in api.get("/v1/files").json()["data"] if f["filename"] == path.name]
        plan = api.get("/v1/benchmarks/estimate", params={"input_file_id": file_id, "completion_window": WINDOW}
                       ).json()["deadline"]
        assert plan["expected_miss"], plan
        expect(page.get_by_text(f"by {views.format_seconds(plan['miss_seconds'])}: estimated")).to_be_visible()
        if plan["meets"]:
            expect(page.get_by_text("Would meet it:")).to_be_visible()
        miss.scroll_into_view_if_needed()
        shot(page, "ui-deadline-1-miss")

        page.get_by_role("button", name="Submit batch").click()
        opened = page.get_by_text("At its creation this batch was expected to miss the 2 min completion window")
        expect(opened).to_be_visible(timeout=60_000)
        (made,) = [b for b in api.get("/v1/batches").json()["data"] if b["input_file_id"] == file_id]
        assert made["completion_window"] == WINDOW and made["obatch"]["deadline"]["expected_miss"]
        opened.scroll_into_view_if_needed()
        shot(page, "ui-deadline-2-opened")
        api.post(f"/v1/batches/{made['id']}/cancel")  # minutes of work nobody needs
