"""The UI in a real browser: Debian's Chromium driven by Playwright against `obatch ui` + `obatch serve` + the
Ollama simulator, all real processes on loopback. What a new user does: open the UI, upload the sample file,
submit, watch it complete, download the output, look at the benchmark charts and the models.

Screenshots go to tests/artifacts/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.browser import MODELS, Stack, browser_page, needs_chromium, settle, shot
from tests.helpers import ROOT

SAMPLE = ROOT / "data" / "samples" / "chat.jsonl"
SLOW_LINES = 300  # a batch run one line at a time, long enough to be cancelled while it runs

pytestmark = needs_chromium


@pytest.fixture(scope="module", autouse=True)
def seeded(stack: Stack) -> Iterator[None]:
    """A tiny sweep (two models × three windows × two concurrencies) into the server's store, through the CLI,
    so the benchmark page has points to draw."""
    args = [sys.executable, "-m", "obatch", "bench", *[a for m in MODELS for a in ("--model", m)],
            "--num-ctx", "2048,4096,8192", "--concurrency", "1,2", "--requests", "4", "--workload", "tiny",
            "--warmup", "0", "--name", "browser-seed", "--quiet"]
    done = subprocess.run(args, env=stack.server_env, cwd=stack.logs, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    yield


def line(custom_id: str, max_tokens: int) -> bytes:
    return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": MODELS[0], "max_tokens": max_tokens,
                                  "messages": [{"role": "user", "content": f"Tell me about {custom_id}."}]}}) + b"\n"


def sidebar_badge(page: Any) -> Any:
    return page.get_by_test_id("stSidebar").get_by_text("Server up · backend ollama")


def test_every_page_opened_by_its_url_first_is_the_same_app(stack: Stack, browser: Any) -> None:
    """Runs first in this module: a fresh UI (no session has shown the navigation yet), each page opened by its
    URL before `/`, as a bookmark or a refresh does. Each gets the server badge and the app's own sidebar."""
    from playwright.sync_api import expect

    with browser_page(browser, "ui-failure-deep", viewport={"width": 1400, "height": 1200}) as page:
        for path, heading in (("batches", "Batches"), ("benchmarks", "Benchmarks"), ("models", "Models / backend")):
            page.goto(f"{stack.ui_url}/{path}")
            expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible(timeout=30_000)
            expect(sidebar_badge(page)).to_be_visible(timeout=30_000)
            nav = page.get_by_test_id("stSidebarNav")
            for title in ("Overview", "Batches", "Benchmarks", "Models / backend"):
                expect(nav.get_by_role("link", name=title, exact=True)).to_be_visible()
            assert page.url == f"{stack.ui_url}/{path}"  # the address stays as it was typed
            expect(page.get_by_role("button", name="Deploy")).to_have_count(0)  # .streamlit/config.toml
            shot(page, f"ui-deep-{path}")
        expect(page.get_by_text(f"at `{stack.sim_url}`")).to_have_count(0)  # markdown renders the backticks away
        expect(page.get_by_text(f"Backend ollama at {stack.sim_url}")).to_be_visible()  # the backend's address


def test_upload_run_download_and_charts_in_a_real_browser(stack: Stack, browser: object, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    with browser_page(browser, "ui-failure", viewport={"width": 1400, "height": 2000}, accept_downloads=True) as page:
        page.goto(stack.ui_url)
        expect(page.get_by_text("Server up · backend ollama")).to_be_visible(timeout=30_000)
        expect(page.get_by_text("Batches running")).to_be_visible(timeout=30_000)
        shot(page, "ui-0-home")

        page.get_by_role("link", name="Batches").first.click()
        expect(page.get_by_role("heading", name="Batches", exact=True)).to_be_visible(timeout=30_000)
        bad = tmp_path / "broken.jsonl"
        lines = SAMPLE.read_bytes().splitlines(keepends=True)
        bad.write_bytes(lines[0] + b'{"custom_id": "oops", "method": "GET"}\n' + lines[1] + lines[0] + b"{not json\n")
        page.locator("input[type=file]").set_input_files(str(bad))
        expect(page.get_by_text("3 problem(s) in 5 line(s)")).to_be_visible(timeout=30_000)
        expect(page.get_by_role("button", name="Submit batch")).to_be_disabled()
        expect(page.get_by_text("Every line (bad ones in red)")).to_be_visible()  # opened: the file is bad
        shot(page, "ui-1-invalid")
        page.locator("input[type=file]").set_input_files(str(SAMPLE))
        expect(page.get_by_text("8 requests, all valid")).to_be_visible(timeout=30_000)
        shot(page, "ui-2-validated")
        page.get_by_role("button", name="Submit batch").click()
        expect(page.get_by_text("Submitted")).to_be_visible(timeout=30_000)
        status = page.locator("[data-testid='stMarkdownContainer'] code", has_text=re.compile(r"^completed$"))
        expect(status).to_be_visible(timeout=60_000)  # the batch's status line, refreshed live
        download_button = page.get_by_role("button", name="Download output")
        expect(download_button).to_be_visible(timeout=30_000)
        shot(page, "ui-3-completed")
        with page.expect_download() as info:
            download_button.click()
        saved = tmp_path / "output.jsonl"
        info.value.save_as(saved)
        output = [orjson.loads(line) for line in saved.read_bytes().splitlines() if line.strip()]
        expected = sorted(orjson.loads(line)["custom_id"] for line in SAMPLE.read_bytes().splitlines() if line.strip())
        assert sorted(line["custom_id"] for line in output) == expected
        assert all(line["response"]["status_code"] == 200 for line in output)

        page.get_by_role("link", name="Benchmarks").first.click()
        expect(page.get_by_role("heading", name="Benchmarks", exact=True)).to_be_visible(timeout=30_000)
        chart = page.locator("[data-testid='stVegaLiteChart']").first
        expect(chart).to_be_visible(timeout=30_000)
        expect(chart.locator("canvas, svg").first).to_be_visible(timeout=30_000)
        shot(page, "ui-4-benchmarks")
        page.get_by_role("tab", name="Compare").click()
        shot(page, "ui-4b-compare")
        page.get_by_role("tab", name="Estimate vs actual").click()
        shot(page, "ui-4c-estimates")
        page.get_by_role("tab", name="Run a sweep").click()
        expect(page.get_by_role("button", name="Start sweep")).to_be_visible()
        shot(page, "ui-4d-sweep")

        page.get_by_role("link", name="Models / backend").first.click()
        expect(page.get_by_text("Backend reachable")).to_be_visible(timeout=30_000)
        expect(page.locator("[data-testid='stDataFrame']").last).to_be_visible()  # the engine hosts, then the models
        cell = page.locator("[data-testid^='glide-cell']", has_text="smollm2:135m")  # the grid's a11y layer
        expect(cell.first).to_be_attached()
        shot(page, "ui-5-models")


def expect_rows(grid: Any, n: int) -> None:
    """The rows a Streamlit dataframe shows (its grid's aria-rowcount counts the header too)."""
    from playwright.sync_api import expect

    expect(grid.locator("[role=grid]").first).to_have_attribute("aria-rowcount", str(n + 1), timeout=10_000)


def click_once(button: Any) -> None:
    """Click a button of the live-refreshed panel once its redraw has settled (while a fragment redraws, the old
    copy of an element can linger beside the new one for a moment)."""
    from playwright.sync_api import expect

    expect(button).to_have_count(1, timeout=10_000)
    button.click()


def caption_count(page: Any) -> int:
    text = page.get_by_text(re.compile(r"^\d+ of \d+ requests · click a row")).inner_text()
    return int(text.split()[0])


def test_filter_cancel_and_double_submit_in_a_real_browser(stack: Stack, browser: Any, tmp_path: Path) -> None:
    """Move the latency slider and count the rows it keeps; cancel a running batch through its confirmation and
    see its unrun lines counted as cancelled; load the same file again and meet the guard."""
    from playwright.sync_api import expect

    with browser_page(browser, "ui-failure-2", viewport={"width": 1400, "height": 2200}) as page:
        # ---- a finished batch with spread-out latencies, and its latency filter
        spread = tmp_path / "spread.jsonl"
        spread.write_bytes(b"".join(line(f"spread-{i:02d}", 8 + 16 * i) for i in range(24)))
        page.goto(f"{stack.ui_url}/batches")
        expect(page.get_by_role("heading", name="Batches", exact=True)).to_be_visible(timeout=30_000)
        page.locator("input[type=file]").set_input_files(str(spread))
        expect(page.get_by_text("24 requests, all valid")).to_be_visible(timeout=30_000)
        page.get_by_role("button", name="Submit batch").click()
        status = page.locator("[data-testid='stMarkdownContainer'] code", has_text=re.compile(r"^completed$"))
        expect(status).to_be_visible(timeout=90_000)
        expect(page.get_by_text(re.compile(r"^Submitted batch.* \(completed\)\.$"))).to_be_visible(timeout=30_000)
        expect(page.locator("input[type=file]")).to_have_count(1)
        expect(page.get_by_text("spread.jsonl")).to_have_count(0)  # the form was emptied
        with page.expect_download() as info:
            page.get_by_role("button", name="Download output").click()
        saved = tmp_path / "spread-output.jsonl"
        info.value.save_as(saved)
        latencies = [orjson.loads(x)["obatch"]["latency_ms"] for x in saved.read_bytes().splitlines() if x.strip()]
        assert len(latencies) == 24
        results = page.get_by_test_id("stDataFrame").last
        expect(page.get_by_text("24 of 24 requests · click a row")).to_be_visible()
        expect_rows(results, 24)
        shot(page, "ui-6-latency-full")
        slider = page.get_by_test_id("stSlider")
        low, high = slider.locator("input[type=range]").nth(0), slider.locator("input[type=range]").nth(1)
        track = slider.get_by_role("group").bounding_box()
        box = high.locator("xpath=../..").bounding_box()  # the end thumb (the range input inside is hidden)
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.down()
        page.mouse.move(track["x"] + track["width"] * 0.5, box["y"] + box["height"] / 2, steps=8)
        page.mouse.up()
        settle(page)
        bounds = int(low.input_value()), int(high.input_value())
        expected = sum(1 for ms in latencies if bounds[0] <= ms <= bounds[1])
        assert 0 < expected < 24, (bounds, sorted(latencies))  # the drag really narrowed the range
        expect(page.get_by_text(f"{expected} of 24 requests · click a row")).to_be_visible(timeout=10_000)
        assert caption_count(page) == expected
        expect_rows(results, expected)
        shot(page, "ui-7-latency-filtered")
        page.keyboard.press("Escape")

        # ---- the same file again: the guard
        page.locator("input[type=file]").set_input_files(str(spread))
        expect(page.get_by_text("This file was submitted as")).to_be_visible(timeout=30_000)
        expect(page.get_by_role("button", name="Submit batch")).to_be_disabled()
        shot(page, "ui-8-double-submit-guard")

        # ---- a long batch, cancelled through its confirmation
        slow = tmp_path / "slow.jsonl"  # one at a time (the form's concurrency), ~50 ms each: ~15 s of work
        slow.write_bytes(b"".join(line(f"slow-{i:03d}", 400) for i in range(SLOW_LINES)))
        page.locator("input[type=file]").set_input_files(str(slow))
        expect(page.get_by_text(f"{SLOW_LINES} requests, all valid")).to_be_visible(timeout=30_000)
        page.get_by_label("Concurrency", exact=True).fill("1")
        page.get_by_label("Concurrency", exact=True).press("Enter")
        settle(page)
        page.get_by_role("button", name="Submit batch").click()
        running = page.locator("[data-testid='stMarkdownContainer'] code", has_text=re.compile(r"^in_progress$"))
        expect(running).to_be_visible(timeout=30_000)
        expect(page.get_by_text(re.compile(rf"^[1-9]\d* of {SLOW_LINES} requests run"))).to_be_visible(timeout=30_000)
        click_once(page.get_by_role("button", name="Cancel batch"))
        expect(page.get_by_text(re.compile(r"^Cancel batch.*\?"))).to_be_visible(timeout=10_000)
        shot(page, "ui-9-cancel-confirm")
        click_once(page.get_by_role("button", name="Yes, cancel the batch"))
        cancelled = page.locator("[data-testid='stMarkdownContainer'] code", has_text=re.compile(r"^cancelled$"))
        expect(cancelled).to_be_visible(timeout=30_000)
        sentence = page.get_by_text(re.compile(rf"of {SLOW_LINES} requests run · .* cancelled \(not run\)$"))
        expect(sentence).to_be_visible(timeout=10_000)
        ran = int(sentence.inner_text().split()[0])
        assert 0 < ran < SLOW_LINES
        batch_id = page.get_by_text(re.compile(r"^Submitted batch")).inner_text().split()[1]
        body = httpx.get(f"{stack.server_url}/v1/batches/{batch_id}", timeout=10).json()
        assert body["status"] == "cancelled" and body["obatch"]["not_run"] == SLOW_LINES - ran
        expect(page.get_by_text(f"· {SLOW_LINES - ran} cancelled (not run)")).to_be_visible()
        page.get_by_test_id("stMultiSelect").first.click()
        expect(page.get_by_role("option", name=f"cancelled ({SLOW_LINES - ran})")).to_be_visible()
        page.keyboard.press("Escape")
        shot(page, "ui-10-cancelled")

        # ---- a click on a row of the batch list opens that batch (the older, spread one)
        table = page.get_by_test_id("stDataFrame").first
        box = table.bounding_box()
        page.mouse.click(box["x"] + 18, box["y"] + 35 * 2.5)  # the row-selection box of the second row
        expect(page.get_by_text("24 of 24 requests run · 24 succeeded · 0 failed")).to_be_visible(timeout=15_000)
        shot(page, "ui-11-row-opened")

        # ---- a result row opened: the request beside the answer, and the line's facts
        results = page.get_by_test_id("stDataFrame").last
        results.scroll_into_view_if_needed()
        box = results.bounding_box()
        page.mouse.click(box["x"] + 18, box["y"] + 35 * 1.5)  # the row-selection box of the first result
        expect(page.get_by_text("Request", exact=True)).to_be_visible(timeout=15_000)
        expect(page.get_by_text("Answer", exact=True)).to_be_visible()
        expect(page.get_by_text(re.compile(r"finish reason .* prompt \+ \d+ completion tokens · latency"))
               ).to_be_visible()
        expect(page.get_by_text(re.compile(r"^user: Tell me about "))).to_be_visible()
        shot(page, "ui-12-result-row")
