"""Helpers the view modules share: loosely typed API answers read (nested objects flattened, numbers taken from
whatever JSON type they came in) and a column's choices for a filter."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import polars as pl


def flatten(point: Mapping[str, Any]) -> dict[str, Any]:
    """Nested ``{config: {...}, metrics: {...}}`` objects → one flat dict (inner keys win over nothing)."""
    flat: dict[str, Any] = {}
    for key, value in point.items():
        if isinstance(value, Mapping):
            for inner, inner_value in value.items():
                flat.setdefault(inner, inner_value)
        else:
            flat[key] = value
    return flat


def number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def integer(value: Any) -> int | None:
    as_float = number(value)
    return None if as_float is None else round(as_float)


def options_of(frame: pl.DataFrame, column: str) -> list[str]:
    """The distinct non-null values of a column, sorted (for a filter's choices)."""
    return sorted(str(v) for v in frame[column].drop_nulls().unique().to_list())
