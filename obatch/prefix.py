"""Prefix groups: which lines of a batch share a long prompt prefix, found at import without a tokenizer.

Engines keep each slot's last prompt (llama.cpp's per-slot prompt cache, Ollama's runner's ``InputCacheSlot``) or
cache prefixes across requests (vLLM, SGLang), so a line whose prompt starts like the last one its slot ran skips
that part of its prompt. A line's *prefix key* is a 64-bit checksum of the first ``PREFIX_CHARS`` characters of its
prompt as the engine's chat template lays it out: the tools, then each message's role and text in order (the system
message, a shared document, a few-shot block), or a completion's prompt, or a response's instructions and input.
Lines with the same key share at least those characters; a batch's *groups* are the keys held by two lines or more
(``obatch.schedule`` keeps each group on one slot at a time). A prompt shorter than ``PREFIX_CHARS`` gets no key:
what it could share is too short to be worth a slot's affinity. Embeddings get none (no prompt cache to reuse).

The cost is two checksums of at most ``PREFIX_CHARS`` characters a line (perf/prefix_import.py measures it).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

PREFIX_CHARS = 1024  # ~256 tokens: a prefix shorter than this saves too little to keep a slot for


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: their text, an image by its URL
        return "\x1e".join(str(part.get("text") or part.get("image_url") or "") for part in content
                           if isinstance(part, dict))
    return "" if content is None else str(content)


def _pieces(url: str, body: dict[str, Any]) -> Iterator[str]:
    """The start of the prompt as the engine sees it, in pieces."""
    if url == "/v1/completions":
        prompt = body.get("prompt")
        yield _text(prompt[0] if isinstance(prompt, list) and prompt else prompt)
        return
    if body.get("tools"):
        yield f"tools\x1f{body['tools']!r}\x1d"
    if url == "/v1/responses":
        if body.get("instructions"):
            yield f"system\x1f{_text(body['instructions'])}\x1d"
        items = body.get("input")
        messages = [{"role": "user", "content": items}] if isinstance(items, str) else items or []
    elif url == "/v1/chat/completions":
        messages = body.get("messages") or []
    else:
        return
    for message in messages:
        if isinstance(message, dict):
            yield f"{message.get('role')}\x1f"
            yield _text(message.get("content"))
            yield "\x1d"


def prefix_key(url: str, body: dict[str, Any]) -> int | None:
    """A line's prefix key (a signed 64-bit integer, as the store keeps it), None when its prompt is too short.

    CRC-32 and Adler-32 of the first ``PREFIX_CHARS`` characters, side by side: fast, and a rare collision only
    puts two groups' lines on one lane (no line is lost or changed by it)."""
    crc, adler, size = 0, 1, 0
    for piece in _pieces(url, body):
        data = piece[:PREFIX_CHARS - size].encode("utf-8", "surrogatepass")
        crc, adler = zlib.crc32(data, crc), zlib.adler32(data, adler)
        size += min(len(piece), PREFIX_CHARS - size)
        if size >= PREFIX_CHARS:
            key = (crc << 32) | adler
            return key - (1 << 64) if key >= 1 << 63 else key
    return None
