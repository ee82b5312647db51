"""Public names that load on first use (PEP 562): a package's ``__getattr__`` made from a name → module table."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_names(package: str, home: dict[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """The ``__getattr__`` of ``package``: import each name of ``home`` from its module the first time it is asked
    for, and keep it in ``namespace`` (the package's globals) so the next lookup is a plain one."""

    def __getattr__(name: str) -> Any:
        if name in home:
            value = getattr(importlib.import_module(home[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
