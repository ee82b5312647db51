"""The bodies a real ``obatch serve`` (Ollama simulator behind it) sends, checked against OpenAI's own published
schemas (the OpenAPI document, tests/data/openai-openapi-subset.json, see tests/data/README.md) with a JSON Schema
validator, and parsed by the official ``openai`` package: files, batches (create, retrieve, cancel, list), their
output and error lines, chat completions, completions, embeddings, responses, models and errors.

A field that drifts from OpenAI's shape (a required one missing, a wrong type, a null where the document allows
none) fails here. One allowance, in ``NULLABLE``: OpenAI's Batch object carries null for the file ids and
timestamps of the steps a batch has not reached (the document's own example sends ``"errors": null``,
``"failed_at": null``; the SDK types them all optional), though the document types them non-null.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import openai.types
import orjson
import pytest
from jsonschema import Draft202012Validator
from openai.types.chat import ChatCompletion
from openai.types.responses import Response
from pydantic import BaseModel
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.helpers import jsonl
from tests.serverkit import CHAT, EMBED, FINAL, KEYS, ServerProcess, chat_line, embed_line, parse_jsonl

SPEC = Path(__file__).parent / "data" / "openai-openapi-subset.json"
BASE = "urn:openai-openapi"
THINKER = "qwen3:0.6b"
NULLABLE = {"Batch": ("errors", "output_file_id", "error_file_id", "in_progress_at", "finalizing_at", "completed_at",
                      "failed_at", "expired_at", "cancelling_at", "cancelled_at")}
BODY_SCHEMA = {"/v1/chat/completions": "CreateChatCompletionResponse", "/v1/completions": "CreateCompletionResponse",
               "/v1/embeddings": "CreateEmbeddingResponse", "/v1/responses": "Response"}


@cache
def registry() -> Registry[Any]:
    document = orjson.loads(SPEC.read_bytes())
    properties = document["components"]["schemas"]
    for name, fields in NULLABLE.items():
        for field in fields:
            schema = properties[name]["properties"][field]
            properties[name]["properties"][field] = {"anyOf": [schema, {"type": "null"}]}
    return Registry().with_resource(BASE, Resource.from_contents(document, default_specification=DRAFT202012))


def problems(body: Any, schema: str) -> list[str]:
    """Where ``body`` breaks OpenAI's ``schema``: one line per violation (path: message), none when it conforms."""
    validator = Draft202012Validator({"$ref": f"{BASE}#/components/schemas/{schema}"}, registry=registry())
    return [f"{'/'.join(map(str, error.absolute_path)) or '(body)'}: {error.message[:300]}"
            for error in sorted(validator.iter_errors(body), key=lambda e: list(map(str, e.absolute_path)))]


def conforms(body: Any, schema: str, what: str) -> None:
    found = problems(body, schema)
    assert not found, f"{what} breaks OpenAI's {schema}:\n" + "\n".join(found)


# ------------------------------------------------------------------------------------ the bodies


@dataclass
class Exchange:
    """Every body of one pass over the API, by kind (``bodies``), and each batch's output and error lines with the
    endpoint their bodies answer (``lines``)."""

    bodies: dict[str, list[Any]]
    lines: list[tuple[str, dict[str, Any]]]


def _settle(api: httpx.Client, batch_id: str, seen: list[Any]) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        batch: dict[str, Any] = api.get(f"/batches/{batch_id}").json()
        seen.append(batch)
        if batch["status"] in FINAL:
            return batch
        assert time.monotonic() < deadline, f"batch stuck in {batch['status']}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def exchange(obatch_server: ServerProcess) -> Iterator[Exchange]:
    bodies: dict[str, list[Any]] = {}
    lines: list[tuple[str, dict[str, Any]]] = []
    headers = {"authorization": f"Bearer {KEYS['carol']}"}
    with httpx.Client(base_url=obatch_server.v1, headers=headers, timeout=30) as api:

        def call(kind: str, method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
            answer = api.request(method, path, **kwargs)
            assert answer.status_code == status, (method, path, answer.status_code, answer.text)
            bodies.setdefault(kind, []).append(answer.json())
            return answer.json()

        def upload(batch_lines: list[dict[str, Any]], **data: Any) -> str:
            made = call("file", "POST", "/files", files={"file": ("in.jsonl", jsonl(batch_lines))},
                        data={"purpose": "batch", **data})
            return str(made["id"])

        def run(endpoint: str, batch_lines: list[dict[str, Any]], *, cancel: bool = False, **extra: Any) -> None:
            batch = call("batch", "POST", "/batches", json={"input_file_id": upload(batch_lines), "endpoint": endpoint,
                                                            "completion_window": "24h", **extra})
            if cancel:
                call("batch", "POST", f"/batches/{batch['id']}/cancel")
            batch = _settle(api, batch["id"], bodies["batch"])
            for key in ("output_file_id", "error_file_id"):
                if batch.get(key):
                    call("file", "GET", f"/files/{batch[key]}")
                    content = api.get(f"/files/{batch[key]}/content")
                    assert content.status_code == 200, content.text
                    lines.extend((endpoint, line) for line in parse_jsonl(content.text))

        unknown = {"custom_id": "unknown-model", "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}}
        run("/v1/chat/completions", [chat_line("plain"), chat_line("thinking", model=THINKER, max_tokens=40),
                                     {**chat_line("logprobs"), "body": {**chat_line("logprobs")["body"],
                                                                        "logprobs": True, "top_logprobs": 2}},
                                     unknown], metadata={"purpose": "schema"})
        run("/v1/embeddings", [embed_line("one"), embed_line("two")])
        run("/v1/completions", [{"custom_id": "c", "method": "POST", "url": "/v1/completions",
                                 "body": {"model": CHAT, "prompt": "Once", "max_tokens": 4}}])
        run("/v1/responses", [{"custom_id": "r", "method": "POST", "url": "/v1/responses",
                               "body": {"model": CHAT, "input": "Say r.", "max_output_tokens": 4}},
                              {"custom_id": "rt", "method": "POST", "url": "/v1/responses",
                               "body": {"model": THINKER, "input": "Why?", "reasoning": {"effort": "low"}}}])
        run("/v1/chat/completions", [chat_line(f"slow-{i}", max_tokens=240) for i in range(8)], cancel=True)
        run("/v1/chat/completions", [chat_line("expiring")], output_expires_after={"anchor": "created_at",
                                                                                   "seconds": 3600})
        upload([chat_line("expires")], **{"expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"})
        call("batch list", "GET", "/batches", params={"limit": 3})
        call("file list", "GET", "/files")
        call("file delete", "DELETE", f"/files/{upload([chat_line('deleted')])}")

        message = [{"role": "user", "content": "Tell me about rivers."}]
        call("chat", "POST", "/chat/completions", json={"model": CHAT, "messages": message, "max_tokens": 5})
        call("chat", "POST", "/chat/completions", json={"model": CHAT, "messages": message, "max_tokens": 5,
                                                        "logprobs": True, "top_logprobs": 2})
        call("chat", "POST", "/chat/completions", json={"model": THINKER, "messages": message, "max_tokens": 60})
        call("completion", "POST", "/completions", json={"model": CHAT, "prompt": "Once", "max_tokens": 5})
        call("completion", "POST", "/completions", json={"model": CHAT, "prompt": "Once", "max_tokens": 5,
                                                         "logprobs": 2})
        call("embeddings", "POST", "/embeddings", json={"model": EMBED, "input": "one"})
        call("embeddings", "POST", "/embeddings", json={"model": EMBED, "input": ["one", "two"]})
        call("responses", "POST", "/responses", json={"model": CHAT, "input": "Tell me about rivers.",
                                                      "max_output_tokens": 5})
        call("responses", "POST", "/responses", json={"model": CHAT, "input": "Tell me about rivers.",
                                                      "max_output_tokens": 5, "top_logprobs": 2})
        call("responses", "POST", "/responses", json={"model": THINKER, "instructions": "Be brief.",
                                                      "input": [{"role": "user", "content": "Why?"}],
                                                      "reasoning": {"effort": "medium"}})
        models = call("models", "GET", "/models")
        call("model", "GET", f"/models/{models['data'][0]['id']}")

        call("error", "GET", "/files/file-nowhere", status=404)
        call("error", "GET", "/batches/batch-nowhere", status=404)
        call("error", "POST", "/batches", status=400, json={"input_file_id": "file-nowhere",
                                                            "endpoint": "/v1/moderations", "completion_window": "24h"})
        call("error", "POST", "/chat/completions", status=404, json={"model": "no-such-model", "messages": message})
        call("error", "POST", "/chat/completions", status=400, json={"model": CHAT})
        unauthorised = httpx.get(f"{obatch_server.v1}/files")
        assert unauthorised.status_code == 401, unauthorised.text
        bodies["error"].append(unauthorised.json())
    yield Exchange(bodies, lines)


# ------------------------------------------------------------------------------------ the checks

CASES = [  # kind of body, OpenAI's schema, the openai package's type
    ("file", "OpenAIFile", openai.types.FileObject),
    ("file list", "ListFilesResponse", None),
    ("file delete", "DeleteFileResponse", openai.types.FileDeleted),
    ("batch", "Batch", openai.types.Batch),
    ("batch list", "ListBatchesResponse", None),
    ("chat", "CreateChatCompletionResponse", ChatCompletion),
    ("completion", "CreateCompletionResponse", openai.types.Completion),
    ("embeddings", "CreateEmbeddingResponse", openai.types.CreateEmbeddingResponse),
    ("responses", "Response", Response),
    ("models", "ListModelsResponse", None),
    ("model", "Model", openai.types.Model),
    ("error", "ErrorResponse", None),
]


@pytest.mark.parametrize(("kind", "schema", "sdk_type"), CASES, ids=[case[0] for case in CASES])
def test_bodies_match_openais_schema(exchange: Exchange, kind: str, schema: str, sdk_type: type[BaseModel] | None
                                     ) -> None:
    bodies = exchange.bodies[kind]
    assert bodies
    for body in bodies:
        conforms(body, schema, kind)
        if sdk_type is not None:
            assert sdk_type.model_validate(body).model_dump(exclude_unset=True)


def test_batches_of_every_kind_were_seen(exchange: Exchange) -> None:
    """The exchange reached what the checks claim to cover: every status a batch passes, both kinds of line."""
    statuses = {batch["status"] for batch in exchange.bodies["batch"]}
    assert {"validating", "completed", "cancelled"} <= statuses
    assert any("model" not in batch for batch in exchange.bodies["batch"])  # none given: left out, not null
    assert any(f.get("expires_at") for f in exchange.bodies["file"])
    assert {endpoint for endpoint, _ in exchange.lines} == set(BODY_SCHEMA)
    assert any(line["error"] for _, line in exchange.lines) and any(line["response"] for _, line in exchange.lines)


def test_output_and_error_lines_match_openais_schema(exchange: Exchange) -> None:
    """Each line is OpenAI's ``BatchRequestOutput``; a response's body is the endpoint's answer (or OpenAI's error
    body for an engine's error answer)."""
    for endpoint, line in exchange.lines:
        conforms(line, "BatchRequestOutput", f"line {line['custom_id']}")
        response = line["response"]
        if response is not None:
            schema = BODY_SCHEMA[endpoint] if response["status_code"] == 200 else "ErrorResponse"
            conforms(response["body"], schema, f"line {line['custom_id']}'s body")


@pytest.mark.parametrize(("kind", "schema", "drift"), [
    ("batch", "Batch", lambda b: b.update(model=None)),
    ("batch", "Batch", lambda b: b.update(request_counts={"total": 1})),
    ("file", "OpenAIFile", lambda f: f.update(expires_at=None)),
    ("file", "OpenAIFile", lambda f: f.update(status_details=None)),
    ("chat", "CreateChatCompletionResponse", lambda c: c["choices"][0]["message"].pop("refusal")),
    ("responses", "Response", lambda r: r["output"][-1]["content"][0].pop("logprobs")),
    ("completion", "CreateCompletionResponse", lambda c: c.update(created=str(c["created"]))),
    ("error", "ErrorResponse", lambda e: e["error"].pop("param")),
], ids=["batch model null", "batch counts", "file expires_at null", "file status_details null", "chat refusal",
        "output_text logprobs", "completion created", "error param"])
def test_a_drifted_field_fails(exchange: Exchange, kind: str, schema: str, drift: Any) -> None:
    """The check itself: each of these changes to a real body (the shapes obatch once sent among them) breaks it."""
    body = copy.deepcopy(exchange.bodies[kind][0])
    conforms(body, schema, kind)
    drift(body)
    assert problems(body, schema)
