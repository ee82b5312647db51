"""Batch file validation: every defect found, with its line number; accepted encodings and line endings."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from obatch.errors import InputFileError, LineProblem
from obatch.jsonl import Limits, Request, iter_file, validate_file
from obatch.protocol import ENDPOINTS
from tests.helpers import chat_line


def lines(*items: object) -> list[bytes]:
    return [item if isinstance(item, bytes) else orjson.dumps(item) + b"\n" for item in items]


def problems(data: list[bytes], **kwargs: object) -> list[tuple[int | None, str]]:
    return [(p.line, p.code) for p in iter_file(data, **kwargs) if isinstance(p, LineProblem)]  # type: ignore[arg-type]


def test_valid_lines_become_requests() -> None:
    items = list(iter_file(lines(chat_line("a"), chat_line("b"))))
    assert [type(i) for i in items] == [Request, Request]
    assert [(r.line, r.custom_id, r.model) for r in items] == [(1, "a", "llama3.2:1b"), (2, "b", "llama3.2:1b")]


def test_bom_crlf_and_blank_lines_are_accepted() -> None:
    data = [b"\xef\xbb\xbf" + orjson.dumps(chat_line("a")) + b"\r\n", b"\r\n", orjson.dumps(chat_line("b")) + b"\r\n",
            b"\n"]
    items = list(iter_file(data))
    assert [i.custom_id for i in items if isinstance(i, Request)] == ["a", "b"]
    assert [i.line for i in items if isinstance(i, Request)] == [1, 3]


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{not json\n", "invalid_json_line"),
        (b"[1, 2]\n", "invalid_json_line"),
        (b"\xff\xfe{}\n", "invalid_encoding"),
        ({**chat_line("x"), "method": "GET"}, "invalid_method"),
        ({**chat_line("x"), "url": "/v1/audio/speech"}, "invalid_url"),
        ({**chat_line("x"), "url": "/v1/responses"}, "missing_required_parameter"),  # responses take body.input
        ({**chat_line("x"), "body": "text"}, "invalid_body"),
        ({**chat_line("x"), "extra": 1}, "invalid_request"),
        ({"custom_id": "", "method": "POST", "url": "/v1/chat/completions", "body": {}}, "missing_required_parameter"),
        ({"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{}]}},
         "missing_required_parameter"),
        ({"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m"}},
         "missing_required_parameter"),
        ({"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": "hi"}},
         "invalid_body"),
    ],
)
def test_each_defect_is_reported_on_its_line(line: object, code: str) -> None:
    assert problems(lines(chat_line("ok"), line)) == [(2, code)]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_every_batch_endpoint_names_the_field_it_cannot_run_without(endpoint: str) -> None:
    line = {"custom_id": "x", "method": "POST", "url": endpoint, "body": {"model": "m"}}
    [problem] = [p for p in iter_file(lines(line)) if isinstance(p, LineProblem)]
    assert problem.code == "missing_required_parameter"
    assert problem.param in ("body.input", "body.messages", "body.prompt") and endpoint in problem.message


def test_duplicate_custom_id() -> None:
    assert problems(lines(chat_line("a"), chat_line("b"), chat_line("a"))) == [(3, "duplicate_custom_id")]


def test_model_override_fills_missing_model() -> None:
    line = {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "hi"}]}}
    assert problems(lines(line)) == [(1, "missing_required_parameter")]
    (request,) = list(iter_file(lines(line), model="smollm2:135m"))
    assert isinstance(request, Request) and request.model == "smollm2:135m"


def test_batch_endpoint_must_match() -> None:
    embed = {"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "x"}}
    assert problems(lines(chat_line("a"), embed), endpoint="/v1/chat/completions") == [(2, "mismatched_endpoint")]


def test_limits_and_empty_file() -> None:
    assert problems(lines(chat_line("a"), chat_line("b"), chat_line("c")), limits=Limits(max_lines=2)) == [
        (3, "too_many_lines")]
    assert problems(lines(chat_line("a"), chat_line("b")), limits=Limits(max_bytes=50)) == [(None, "file_too_large")]
    assert problems([b"\n", b"  \n"]) == [(None, "empty_file")]


def test_validate_file_lists_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join(lines(chat_line("a"), b"oops\n", chat_line("a"), {**chat_line("c"), "method": "PUT"})))
    with pytest.raises(InputFileError) as caught:
        validate_file(path)
    assert [(p.line, p.code) for p in caught.value.problems] == [
        (2, "invalid_json_line"), (3, "duplicate_custom_id"), (4, "invalid_method")]
    assert "line 2" in caught.value.message


def test_validate_file_counts_and_hashes(tmp_path: Path) -> None:
    path = tmp_path / "ok.jsonl"
    path.write_bytes(b"".join(lines(chat_line("a"), chat_line("b"))))
    count, digest = validate_file(path)
    assert count == 2 and len(digest) == 64


def test_custom_ids_past_the_in_memory_bound_still_meet_their_duplicates() -> None:
    """Beyond its in-memory bound the seen-set lives in a temporary SQLite file; a duplicate is found either way,
    with the line of its first occurrence, from any thread."""
    import threading

    from obatch.jsonl import _Seen

    seen = _Seen(in_memory=3, flush=2)
    firsts = [seen.first_line(f"id-{i}", i) for i in range(1, 11)]
    assert firsts == [None] * 10
    found: list[int | None] = []
    worker = threading.Thread(target=lambda: found.extend(seen.first_line(f"id-{i}", 100 + i) for i in (1, 5, 10, 11)))
    worker.start()
    worker.join()
    assert found == [1, 5, 10, None]
    seen.close()
