"""Helpers shared by tests: batch-line builders, file writers, executed-notebook outputs."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import nbformat
import orjson

ROOT = Path(__file__).resolve().parents[1]


def chat_line(custom_id: str, content: str = "hello", *, model: str = "llama3.2:1b", **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": content}], **body}}


def jsonl(lines: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def write_jsonl(path: Path, lines: Iterable[dict[str, Any]]) -> Path:
    path.write_bytes(jsonl(lines))
    return path


def notebook_outputs(path: Path) -> list[str]:
    """Every code cell's displayed text (plain and HTML) of an executed notebook, in order; a cell error raises."""
    notebook = nbformat.read(path, as_version=4)
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "error":
                raise AssertionError(f"{path.name}: {output.ename}: {output.evalue}")
            data = output.get("data", {})
            texts.append(str(data.get("text/html", "")) + str(data.get("text/plain", output.get("text", ""))))
    return texts
