"""``/v1/files``: upload (multipart, streamed to disk), list, retrieve, content (streamed), delete."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from litestar import Controller, Request, delete, get, post
from litestar.params import FromPath, FromQuery, QueryParameter
from litestar.response import Stream

from obatch.batches import file_object
from obatch.protocol import FileObject, ListPage
from obatch.server import operations as ops
from obatch.server.deps import Owner, Svc
from obatch.server.uploads import receive_upload


class FilesController(Controller):
    path = "/v1/files"
    tags = ("files",)

    @post("/", status_code=200, request_max_body_size=None, summary="Upload a file (multipart: purpose, file)")
    async def upload(self, request: Request[Any, Any, Any], svc: Svc, owner: Owner) -> FileObject:
        return file_object(await receive_upload(svc, request, owner or ""))

    @get("/", summary="List files, newest first")
    async def list(self, svc: Svc, owner: Owner, after: FromQuery[str | None] = None,
                   limit: Annotated[int, QueryParameter(ge=1, le=10_000)] = 100,
                   purpose: FromQuery[str | None] = None,
                   order: FromQuery[Literal["asc", "desc"]] = "desc") -> ListPage:
        return await ops.list_files(svc, owner, after=after, limit=limit, purpose=purpose, order=order)

    @get("/{file_id:str}", summary="Retrieve a file's metadata")
    async def retrieve(self, svc: Svc, owner: Owner, file_id: FromPath[str]) -> FileObject:
        return await ops.get_file(svc, owner, file_id)

    @get("/{file_id:str}/content", summary="Download a file's content (streamed)")
    async def content(self, svc: Svc, owner: Owner, file_id: FromPath[str]) -> Stream:
        chunks, size = await ops.file_content(svc, owner, file_id)
        return Stream(chunks, media_type="application/octet-stream", headers={"content-length": str(size)})

    @delete("/{file_id:str}", status_code=200, summary="Delete a file")
    async def remove(self, svc: Svc, owner: Owner, file_id: FromPath[str]) -> dict[str, Any]:
        return await ops.delete_file(svc, owner, file_id)
