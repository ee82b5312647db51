"""Helpers the view modules share: a column's choices for a filter."""

from __future__ import annotations

import polars as pl


def options_of(frame: pl.DataFrame, column: str) -> list[str]:
    """The distinct non-null values of a column, sorted (for a filter's choices)."""
    return sorted(str(v) for v in frame[column].drop_nulls().unique().to_list())
