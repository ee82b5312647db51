"""``/v1/batches``: create (validated asynchronously by the worker), retrieve, list (newest first), cancel."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get, post
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from obatch.protocol import Batch, ListPage
from obatch.server import operations as ops
from obatch.server.deps import Owner, Svc, Worker


class BatchesController(Controller):
    path = "/v1/batches"
    tags = ("batches",)

    @post("/", status_code=200, summary="Create a batch from an uploaded input file")
    async def create(self, data: JSONBody[ops.BatchCreate], svc: Svc, worker: Worker, owner: Owner) -> Batch:
        return await ops.create_batch(svc, worker, owner, data)

    @get("/", summary="List batches, newest first")
    async def list(self, svc: Svc, owner: Owner, after: FromQuery[str | None] = None,
                   limit: Annotated[int, QueryParameter(ge=1, le=100)] = 20) -> ListPage:
        return await ops.list_batches(svc, owner, after=after, limit=limit)

    @get("/{batch_id:str}", summary="Retrieve a batch")
    async def retrieve(self, svc: Svc, owner: Owner, batch_id: FromPath[str]) -> Batch:
        return await ops.get_batch(svc, owner, batch_id)

    @post("/{batch_id:str}/cancel", status_code=200, summary="Cancel a batch (cancelling, then cancelled)")
    async def cancel(self, svc: Svc, owner: Owner, batch_id: FromPath[str]) -> Batch:
        return await ops.cancel_batch(svc, owner, batch_id)
