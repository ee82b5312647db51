"""Interactive use on the same base URL: responses, chat completions and completions (plain and SSE),
embeddings, models."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from litestar import Controller, Response, get, post
from litestar.params import FromPath, JSONBody
from litestar.response import Stream

from obatch.protocol import Model, ModelList
from obatch.server import operations as ops
from obatch.server.deps import Probe, Svc


def _reply(result: dict[str, Any] | AsyncIterator[bytes]) -> Response[Any]:
    """A JSON answer, or a server-sent event stream."""
    return Response(result) if isinstance(result, dict) else Stream(
        result, media_type="text/event-stream", headers={"cache-control": "no-cache"})


class PassthroughController(Controller):
    path = "/v1"
    tags = ("pass-through",)

    @post("/chat/completions", status_code=200, summary="Chat completion (stream: true answers SSE)")
    async def chat(self, data: JSONBody[dict[str, Any]], svc: Svc) -> Response[Any]:
        return _reply(await ops.complete(svc, "/v1/chat/completions", data))

    @post("/responses", status_code=200,
          summary="A response (OpenAI's Responses API; stream: true answers its events; no storage)")
    async def responses(self, data: JSONBody[dict[str, Any]], svc: Svc) -> Response[Any]:
        return _reply(await ops.complete(svc, "/v1/responses", data))

    @post("/completions", status_code=200, summary="Text completion (a prompt or a list; stream: true answers SSE)")
    async def completions(self, data: JSONBody[dict[str, Any]], svc: Svc) -> Response[Any]:
        return _reply(await ops.complete(svc, "/v1/completions", data))

    @post("/embeddings", status_code=200, summary="Embeddings (of text, or of token ids where the engine reads them)")
    async def embeddings(self, data: JSONBody[dict[str, Any]], svc: Svc) -> dict[str, Any]:
        return await ops.embeddings(svc, data)

    @get("/models", summary="The backend's models")
    async def models(self, svc: Svc, probe: Probe) -> ModelList:
        return await ops.models(svc, probe)

    @get("/models/{model_id:path}", summary="One of the backend's models")
    async def model(self, svc: Svc, model_id: FromPath[str]) -> Model:
        return await ops.model(svc, model_id.lstrip("/"))
