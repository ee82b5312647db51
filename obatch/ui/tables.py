"""``st.dataframe`` with no grey "None": missing values shown as "—" (``views.blanks``), numbers written with
their format and kept right-aligned, the columns' units in their headers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import polars as pl
import streamlit as st

from obatch.ui import views


def column_config(frame: pl.DataFrame, shown: pl.DataFrame, formats: Mapping[str, str]) -> dict[str, Any]:
    """Right-aligned text for the number columns ``blanks`` wrote as text; the format of those left numbers."""
    text = views.written_as_text(frame, shown)
    config: dict[str, Any] = {name: st.column_config.TextColumn(name, alignment="right") for name in text}
    config |= {name: st.column_config.NumberColumn(name, format=fmt) for name, fmt in formats.items()
               if name in shown.columns and name not in text}
    return config


def table(frame: pl.DataFrame, *, key: str, formats: Mapping[str, str] | None = None, **options: Any) -> Any:
    """Show ``frame`` (no index, the page's width) with "—" for missing values; ``formats``: printf-style number
    formats per column (``{"req/s": "%.2f"}``); ``options`` go to ``st.dataframe``."""
    formats = formats or {}
    shown = views.blanks(frame, formats)
    config = column_config(frame, shown, formats) | options.pop("column_config", {})
    return st.dataframe(shown, hide_index=True, width="stretch", key=key, column_config=config, **options)
