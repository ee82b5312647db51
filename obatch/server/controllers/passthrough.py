"""Interactive use on the same base URL: responses, chat completions (plain and SSE), completions, embeddings,
models."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Response, get, post
from litestar.params import FromPath, JSONBody
from litestar.response import Stream

from obatch.protocol import Model, ModelList
from obatch.server import operations as ops
from obatch.server.deps import Probe, Svc


class PassthroughController(Controller):
    path = "/v1"
    tags = ("pass-through",)

    @post("/chat/completions", status_code=200, summary="Chat completion (stream: true answers SSE)")
    async def chat(self, data: JSONBody[dict[str, Any]], svc: Svc) -> Response[Any]:
        result = await ops.chat(svc, data)
        return Response(result) if isinstance(result, dict) else Stream(
            result, media_type="text/event-stream", headers={"cache-control": "no-cache"})

    @post("/responses", status_code=200, summary="A response (OpenAI's Responses API; no stream, no storage)")
    async def responses(self, data: JSONBody[dict[str, Any]], svc: Svc) -> dict[str, Any]:
        return await ops.complete(svc, "/v1/responses", data)

    @post("/completions", status_code=200, summary="Text completion")
    async def completions(self, data: JSONBody[dict[str, Any]], svc: Svc) -> dict[str, Any]:
        return await ops.complete(svc, "/v1/completions", data)

    @post("/embeddings", status_code=200, summary="Embeddings")
    async def embeddings(self, data: JSONBody[dict[str, Any]], svc: Svc) -> dict[str, Any]:
        return await ops.complete(svc, "/v1/embeddings", data)

    @get("/models", summary="The backend's models")
    async def models(self, svc: Svc, probe: Probe) -> ModelList:
        return await ops.models(svc, probe)

    @get("/models/{model_id:path}", summary="One of the backend's models")
    async def model(self, svc: Svc, model_id: FromPath[str]) -> Model:
        return await ops.model(svc, model_id.lstrip("/"))
