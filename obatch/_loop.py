"""The event loop of obatch's own processes (the CLI, the server and its batch process).

uvloop where it is installed (Linux and macOS): against an instant engine obatch's runner costs about a quarter
less CPU per request on it than on asyncio's own loop (``perf/overhead.py``), and on a small machine the client's
CPU is what a fast engine waits for. ``OBATCH_EVENT_LOOP=asyncio`` keeps asyncio's loop. Notebooks run on Jupyter's
loop and never get here.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the best loop available."""
    if os.environ.get("OBATCH_EVENT_LOOP", "auto") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)
