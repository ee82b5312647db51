"""``POST /v1/files``: a multipart upload parsed as it arrives and streamed straight into the store.

The ``file`` part's bytes go from the socket to ``batches.store_file`` (which writes them to disk and enforces
``max_file_bytes``) without being held in memory or spooled to a temporary file; the small ``purpose`` part may
come before or after it. An over-limit upload is answered 413; the rest of its body is read and dropped (up to a
bound) first, so that a client still sending sees the answer instead of a reset connection. An upload that would
take its key past ``max_storage_bytes_per_key`` (all of the key's stored files, batch outputs included) is refused
the same way: early while it streams (against what was stored when it began), and for good when its row is
written, in one step with the check (``obatch.store.quota``), so concurrent uploads cannot pass the quota together.
"""

from __future__ import annotations

import contextlib
import unicodedata
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from multipart import MultipartSegment, ParserError, ParserLimitReached, PushMultipartParser, parse_options_header

from obatch import batches, errors
from obatch.batches import Services
from obatch.store import repo
from obatch.store.tables import FileRow

PURPOSES = frozenset({"batch", "assistants", "fine-tune", "vision", "user_data", "evals"})
MAX_FIELD_BYTES = 64 * 1024  # a form field other than the file
FORM_OVERHEAD = 1 << 20  # bytes a body may have beyond the file's limit (boundaries, headers, fields)
DRAIN_LIMIT = 64 << 20  # read at most this much of a refused body before answering


def _too_large(limit: int) -> errors.InputFileError:
    return errors.InputFileError(f"The file exceeds the limit of {limit} bytes.",
                                 [errors.LineProblem(None, "file_too_large", "The file is too large.")])


class _Body:
    """The request body as chunks from ASGI ``receive``, capped at ``cap`` bytes; knows whether it has ended."""

    def __init__(self, receive: Any, cap: int, limit: int) -> None:
        self.receive, self.cap, self.limit = receive, cap, limit
        self.size = 0
        self.done = False

    async def chunks(self) -> AsyncIterator[bytes]:
        while not self.done:
            message = await self.receive()
            if message["type"] != "http.request":
                self.done = True
                raise errors.ConfigError("The client went away during the upload.")
            self.done = not message.get("more_body", False)
            body = message.get("body", b"")
            self.size += len(body)
            if self.size > self.cap:
                raise _too_large(self.limit)
            if body:
                yield body

    async def drain(self) -> None:
        with contextlib.suppress(errors.ObatchError):
            while not self.done and self.size < DRAIN_LIMIT:
                message = await self.receive()
                if message["type"] != "http.request":
                    return
                self.done = not message.get("more_body", False)
                self.size += len(message.get("body", b""))


async def _events(body: _Body, parser: PushMultipartParser) -> AsyncGenerator[MultipartSegment | bytes | None]:
    with parser:
        async for chunk in body.chunks():
            for event in parser.parse(chunk):
                yield event
            if parser.closed:
                return
        for event in parser.parse(b""):  # end of input: raises when the form is incomplete
            yield event


async def _segment(events: AsyncIterator[MultipartSegment | bytes | None]) -> AsyncGenerator[bytes]:
    async for event in events:
        if event is None:
            return
        if isinstance(event, MultipartSegment):
            raise errors.ConfigError("Malformed multipart body.")
        yield bytes(event)


async def _field(events: AsyncIterator[MultipartSegment | bytes | None], name: str) -> str:
    data = bytearray()
    async for chunk in _segment(events):
        data += chunk
        if len(data) > MAX_FIELD_BYTES:
            raise errors.ConfigError(f"The form field {name!r} is too long.", param=name)
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise errors.ConfigError(f"The form field {name!r} is not UTF-8.", param=name) from exc


def _filename(raw: str) -> str:
    """Shown back to the caller only (ids name the stored bytes): the last path component without control or
    format characters (NUL, CR, LF, bidi overrides: they would forge log lines and listings), at most 255 chars."""
    shown = "".join(c for c in raw if unicodedata.category(c) not in {"Cc", "Cf", "Cs", "Zl", "Zp"})
    name = shown.replace("\\", "/").rsplit("/", 1)[-1].strip()
    return (name or "upload.jsonl")[:255]


async def _room(svc: Services, owner: str) -> int | None:
    """Bytes the owner may still store (None: no quota)."""
    quota = svc.settings.max_storage_bytes_per_key
    if not quota:
        return None
    async with svc.sessions() as session:
        return quota - await repo.stored_bytes(session, owner)


async def _within(chunks: AsyncGenerator[bytes], room: int | None, quota: int) -> AsyncGenerator[bytes]:
    size = 0
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            size += len(chunk)
            if room is not None and size > room:
                raise batches.quota_exceeded(quota)
            yield chunk


async def _parse(svc: Services, body: _Body, boundary: str, owner: str) -> tuple[FileRow | None, dict[str, str]]:
    fields: dict[str, str] = {}
    stored: FileRow | None = None
    parser = PushMultipartParser(boundary, max_segment_count=16)
    events = _events(body, parser)
    async with contextlib.aclosing(events):
        async for event in events:
            if not isinstance(event, MultipartSegment):
                raise errors.ConfigError("Malformed multipart body.")
            if event.name == "file" and event.filename is not None:
                if stored is not None:
                    raise errors.ConfigError("Send exactly one 'file' part.", param="file")
                room = await _room(svc, owner)
                if room is not None and room <= 0:
                    raise batches.quota_exceeded(svc.settings.max_storage_bytes_per_key)
                chunks = _within(_segment(events), room, svc.settings.max_storage_bytes_per_key)
                async with contextlib.aclosing(chunks):
                    stored = await batches.store_file(svc, chunks, filename=_filename(event.filename),
                                                      purpose=fields.get("purpose", "batch"), owner=owner,
                                                      quota=svc.settings.max_storage_bytes_per_key)
            else:
                fields[event.name or ""] = await _field(events, event.name or "")
    return stored, fields


async def receive_upload(svc: Services, request: Any, owner: str) -> FileRow:
    """Store the uploaded ``file`` part under the caller and return its row (4xx errors for every bad form)."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != "multipart/form-data" or not options.get("boundary"):
        raise errors.ConfigError("Upload the file as multipart/form-data with the parts 'purpose' and 'file'.")
    limit = svc.settings.max_file_bytes
    body = _Body(request.receive, limit + FORM_OVERHEAD, limit)
    announced = request.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > max(limit + FORM_OVERHEAD, DRAIN_LIMIT):
        raise _too_large(limit)  # too big to even drain: answer now
    stored: FileRow | None = None
    try:
        stored, fields = await _parse(svc, body, options["boundary"], owner)
    except errors.InputFileError:
        await body.drain()
        raise
    except (ParserError, ParserLimitReached) as exc:
        await body.drain()
        raise errors.ConfigError(f"Malformed multipart body: {exc}.") from exc
    except errors.ConfigError:
        await body.drain()
        raise
    return await _check(svc, stored, fields)


async def _check(svc: Services, stored: FileRow | None, fields: dict[str, str]) -> FileRow:
    purpose = fields.get("purpose", "").strip()
    problem: errors.ObatchError | None = None
    if stored is None:
        problem = errors.ConfigError("The form has no 'file' part.", param="file")
    elif not purpose:
        problem = errors.ConfigError("The form has no 'purpose' part.", param="purpose")
    elif purpose not in PURPOSES:
        problem = errors.ConfigError(f"purpose must be one of {', '.join(sorted(PURPOSES))}; got {purpose!r}.",
                                     param="purpose")
    elif stored.bytes == 0:
        problem = errors.ConfigError("The file is empty.", code="empty_file", param="file")
    expires: int | None = None
    if problem is None and any(k.startswith("expires_after") for k in fields):
        try:  # the SDK sends expires_after={anchor, seconds} as the fields expires_after[anchor], [seconds]
            expires = batches.expiry_seconds(
                {"anchor": fields.get("expires_after[anchor]"), "seconds": fields.get("expires_after[seconds]")},
                param="expires_after", minimum=svc.settings.min_file_expiry)
        except errors.ConfigError as exc:
            problem = exc
    if problem is not None:
        if stored is not None:
            await batches.delete_file(svc, stored.id)
        raise problem
    assert stored is not None
    if stored.purpose != purpose:
        async with svc.sessions() as session:
            await repo.set_file_purpose(session, stored.id, purpose)
            await session.commit()
        stored.purpose = purpose
    if expires is not None:
        async with svc.sessions() as session:
            await repo.set_file_expiry(session, stored.id, stored.created_at + expires)
            await session.commit()
        stored.expires_at = stored.created_at + expires
    return stored
