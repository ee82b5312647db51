"""``/v1/batches``: create (validated asynchronously by the worker), retrieve, list (newest first), cancel; and
obatch's retry of what failed and results read while a batch runs."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Response, get, post
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from obatch.batches.reading import DEFAULT_LIMIT, MAX_LIMIT
from obatch.protocol import Batch, ListPage
from obatch.server import operations as ops
from obatch.server.deps import Owner, Svc, Worker

NEXT_AFTER, FINISHED = "x-obatch-next-after", "x-obatch-finished"  # the results page's cursor (docs/server.md)


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

    @post("/{batch_id:str}/retry", status_code=200, summary="Retry the lines that failed (a new batch; obatch's)")
    async def retry(self, svc: Svc, worker: Worker, owner: Owner, batch_id: FromPath[str],
                    data: JSONBody[ops.BatchRetry | None] = None) -> Batch:
        return await ops.retry_batch(svc, worker, owner, batch_id, data)

    @get("/{batch_id:str}/results", summary="The lines finished so far, in input order (JSONL; obatch's)")
    async def results(self, svc: Svc, owner: Owner, batch_id: FromPath[str],
                      after: Annotated[int, QueryParameter(ge=0)] = 0,
                      limit: Annotated[int, QueryParameter(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
                      merged: FromQuery[bool] = False) -> Response[bytes]:
        page = await ops.batch_results(svc, owner, batch_id, after=after, limit=limit, merged=merged)
        return Response(page.body, media_type="application/jsonl", headers={
            NEXT_AFTER: str(page.after), FINISHED: "true" if page.finished else "false"})
