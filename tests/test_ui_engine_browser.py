"""The engine stopped and restarted while a batch page is open, in a real browser (Chromium via Playwright against
`obatch ui` + `obatch serve` + the Ollama simulator): the running batch says it waits and pauses its ETA, the
sidebar and the Models page agree that the engine is down, and all of it recovers without a reload — the batch's
concurrency and hosts beside its progress, and each model's trained context, as the engine reports it. A page
opened while the server itself is down draws itself once the server is back.

Screenshots go to tests/artifacts/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.browser import MODELS, Stack, browser_page, needs_chromium, running_stack, settle, shot

pytestmark = needs_chromium
LINES = 400  # long enough (about 40 answers a second) to be running through the outage


@pytest.fixture(scope="module")
def engine_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A slow engine, and a server that retries long enough to wait out a restart (as its defaults do)."""
    with running_stack(tmp_path_factory.mktemp("engine"), ("--decode-tps", "20"), max_attempts=30,
                       retry_initial_wait=0.5, retry_max_wait=3, concurrency="auto") as made:
        yield made


def test_engine_stopped_and_restarted_while_a_batch_page_is_open(engine_stack: Stack, browser: Any,
                                                                 request: pytest.FixtureRequest) -> None:
    from playwright.sync_api import expect

    stack = engine_stack
    api = httpx.Client(base_url=stack.server_url, timeout=30)
    request.addfinalizer(api.close)
    data = b"".join(orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": MODELS[0], "max_tokens": 200, "messages": [{"role": "user", "content": f"Question {i}"}]}}) + b"\n"
        for i in range(LINES))
    file_id = api.post("/v1/files", files={"file": ("slow.jsonl", data)}, data={"purpose": "batch"}).json()["id"]
    batch = api.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                          "completion_window": "24h"}).json()
    request.addfinalizer(lambda: api.post(f"/v1/batches/{batch['id']}/cancel"))
    with browser_page(browser, "ui-failure-engine", viewport={"width": 1400, "height": 1200}) as page:
        models = page.context.new_page()  # a failure shoots it too (ui-failure-engine-2.png)
        sidebar = page.get_by_test_id("stSidebar")
        page.goto(f"{stack.ui_url}/batches")
        expect(page.get_by_text(re.compile(r"in flight \(auto:"))).to_be_visible(timeout=30_000)
        page.get_by_text("Hosts and concurrency of this batch").click()
        expect(page.get_by_text("How each host's level moved during the run")).to_be_visible()
        shot(page, "ui-engine-batch-concurrency")

        stack.stop_engine()
        expect(page.get_by_text("The engine does not answer (connection refused at")).to_be_visible(timeout=20_000)
        expect(sidebar.get_by_text("Server up · backend ollama unreachable")).to_be_visible(timeout=10_000)
        expect(page.get_by_test_id("stMetricValue").filter(has_text="waiting")).to_be_visible()
        shot(page, "ui-engine-down-batch")
        models.goto(f"{stack.ui_url}/models")
        expect(models.get_by_text("The backend does not answer: connection refused")).to_be_visible(timeout=30_000)
        expect(models.get_by_text(f"{stack.sim_url} (down): connection refused at {stack.sim_url}")).to_be_visible()
        shot(models, "ui-engine-down-models")

        stack.start_engine()  # no reload: the pages follow the server on their own
        expect(sidebar.get_by_text("Server up · backend ollama", exact=True)).to_be_visible(timeout=20_000)
        expect(page.get_by_text("The engine does not answer")).to_have_count(0, timeout=20_000)
        expect(page.get_by_test_id("stMetricValue").filter(has_text="waiting")).to_have_count(0)
        shot(page, "ui-engine-back-batch")
        listed = api.get("/v1/models").json()["data"]
        assert listed and all(m["context_length"] for m in listed), listed  # the trained context, not null
        expect(models.get_by_text("Backend reachable")).to_be_visible()
        expect(models.get_by_test_id("stMetricValue").filter(has_text="yes")).to_be_visible(timeout=20_000)
        settle(models)
        shot(models, "ui-model-trained-context")
        grid = models.get_by_test_id("stDataFrame").last
        expect(grid).to_be_visible()


def test_a_page_opened_while_the_server_is_down_comes_back_by_itself(engine_stack: Stack, browser: Any,
                                                                     request: pytest.FixtureRequest) -> None:
    from playwright.sync_api import expect

    stack = engine_stack

    def server_up() -> None:
        if stack.server is None or stack.server.proc.poll() is not None:
            stack.start_server()

    request.addfinalizer(server_up)
    with browser_page(browser, "ui-failure-server-back", viewport={"width": 1400, "height": 900}) as page:
        stack.stop_server()
        page.goto(f"{stack.ui_url}/batches")
        expect(page.get_by_text("Start it with")).to_be_visible(timeout=30_000)
        expect(page.get_by_test_id("stSidebar").get_by_text("Server unreachable")).to_be_visible()
        shot(page, "ui-server-down-batches")
        stack.start_server()  # no reload
        expect(page.get_by_role("heading", name="Your batches")).to_be_visible(timeout=20_000)
        expect(page.get_by_text("Start it with")).to_have_count(0)
        expect(page.get_by_test_id("stSidebar").get_by_text("Server up · backend ollama")).to_be_visible()
        shot(page, "ui-server-back-batches")
