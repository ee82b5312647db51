"""obatch's own processes run on uvloop where it is installed; OBATCH_EVENT_LOOP=asyncio keeps asyncio's loop."""

from __future__ import annotations

import asyncio

import pytest

from obatch import _loop


async def loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def test_uvloop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("uvloop")
    monkeypatch.delenv("OBATCH_EVENT_LOOP", raising=False)
    assert _loop.run(loop_module()) == "uvloop"


def test_asyncio_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OBATCH_EVENT_LOOP", "asyncio")
    assert _loop.run(loop_module()) == "asyncio"
