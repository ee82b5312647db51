"""Tables as a person reads them: an empty cell says "—", never a grey "None".

Streamlit draws every missing value as "None", whatever the column's format (a Styler's ``na_rep`` included), so a
value that is not there has to be text: a text column's nulls become "—", and a number column that has nulls
becomes text too, each number written with its format (the page right-aligns it, as numbers are), and a yes/no
column with a gap says "yes"/"no". Columns without a gap stay as they are (numbers sortable, formatted by the page
with the same format; yes/no as checkboxes).
"""

from __future__ import annotations

from collections.abc import Mapping

import polars as pl

BLANK = "—"


def number_format(dtype: pl.DataType, fmt: str | None = None) -> str:
    """The printf-style format a number column is written with: ``fmt``, else whole numbers as they are and
    others with at most 6 significant digits."""
    return fmt or ("%d" if dtype.is_integer() else "%g")


def blanks(frame: pl.DataFrame, formats: Mapping[str, str] | None = None) -> pl.DataFrame:
    """``frame`` with "—" where a value is missing: text columns filled, number columns with a gap written as text
    (``formats``: printf-style per column, e.g. ``{"goodput (req/s)": "%.2f"}``), yes/no columns with a gap as
    "yes"/"no"/"—"; other columns as they were."""
    formats = formats or {}
    columns = []
    for name, dtype in frame.schema.items():
        column = frame[name]
        if dtype == pl.Utf8:
            columns.append(column.fill_null(BLANK))
        elif dtype.is_numeric() and column.null_count():
            fmt = number_format(dtype, formats.get(name))
            columns.append(pl.Series(name, [BLANK if v is None else fmt % v for v in column.to_list()],
                                     dtype=pl.Utf8))
        elif dtype == pl.Boolean and column.null_count():
            columns.append(pl.Series(name, [BLANK if v is None else ("yes" if v else "no") for v in column.to_list()],
                                     dtype=pl.Utf8))
        else:
            columns.append(column)
    return pl.DataFrame(columns)


def written_as_text(frame: pl.DataFrame, shown: pl.DataFrame) -> list[str]:
    """The number columns of ``frame`` that ``blanks`` turned into text (the page right-aligns them)."""
    return [name for name, dtype in frame.schema.items() if dtype.is_numeric() and shown.schema[name] == pl.Utf8]
