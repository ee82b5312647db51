"""Writes ``openai-openapi-subset.json``: the schemas of OpenAI's API document that obatch's bodies are checked
against (tests/test_openai_schema.py), with every schema they refer to. See README.md beside it for the source.

    python tests/data/openai_schemas.py CURRENT.yaml EARLIER.yaml > tests/data/openai-openapi-subset.json

The first document is the current one (``components/schemas``). The batch output line's schema
(``BatchRequestOutput``) was dropped from the document later; it is taken from the second, an earlier 2.3.0
commit, and its OpenAPI 3.0 ``nullable`` is rewritten as JSON Schema's ``"type": [..., "null"]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOTS = [
    "OpenAIFile", "ListFilesResponse", "DeleteFileResponse",
    "Batch", "ListBatchesResponse",
    "CreateChatCompletionResponse", "CreateCompletionResponse", "CreateEmbeddingResponse", "Response",
    "ListModelsResponse", "Model", "ErrorResponse",
]
PREFIX = "#/components/schemas/"


def refs(node: Any) -> set[str]:
    """The schema names ``node`` refers to."""
    if isinstance(node, dict):
        found = {node["$ref"][len(PREFIX):]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(refs(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(refs(value) for value in node))
    return set()


def closure(schemas: dict[str, Any], roots: list[str]) -> dict[str, Any]:
    """``roots`` and every schema reachable from them."""
    todo, out = list(roots), {}
    while todo:
        name = todo.pop()
        if name not in out:
            out[name] = schemas[name]
            todo.extend(refs(schemas[name]) - out.keys())
    return dict(sorted(out.items()))


def without_nullable(node: Any) -> Any:
    """OpenAPI 3.0's ``nullable: true`` as JSON Schema's null type."""
    if isinstance(node, dict):
        out = {key: without_nullable(value) for key, value in node.items() if key != "nullable"}
        if node.get("nullable") is True and "type" in out:
            out["type"] = [out["type"], "null"]
        return out
    if isinstance(node, list):
        return [without_nullable(value) for value in node]
    return node


def main(current: Path, earlier: Path) -> None:
    doc = yaml.safe_load(current.read_text())
    schemas = closure(doc["components"]["schemas"], ROOTS)
    old = yaml.safe_load(earlier.read_text())
    line = without_nullable(old["components"]["schemas"]["BatchRequestOutput"])
    line.pop("x-oaiMeta", None)
    for schema in schemas.values():
        if isinstance(schema, dict):
            schema.pop("x-oaiMeta", None)
    schemas["BatchRequestOutput"] = line
    json.dump({"openapi": doc["openapi"], "info": {"title": doc["info"]["title"], "version": doc["info"]["version"],
                                                   "license": doc["info"]["license"]},
               "components": {"schemas": schemas}}, sys.stdout, indent=1, sort_keys=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
