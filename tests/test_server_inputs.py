"""A corpus of malformed uploads, batches and requests against a real ``obatch serve``: each one is answered with
a 4xx in OpenAI's error shape, or makes a batch that ends ``failed`` with line-numbered errors. Never a 5xx, never
a batch left hanging."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai import OpenAI

from tests.helpers import jsonl
from tests.serverkit import (
    FINAL,
    KEYS,
    MAX_FILE_BYTES,
    MAX_LINES,
    ServerProcess,
    assert_openai_error,
    chat_line,
    embed_line,
    parse_jsonl,
)

AUTH = {"Authorization": f"Bearer {KEYS['dave']}"}
CHAT_URL = "/v1/chat/completions"


@pytest.fixture(scope="module")
def http(obatch_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=obatch_server.url, headers=AUTH, timeout=30) as client:
        yield client


def upload(http: httpx.Client, content: bytes, purpose: str = "batch") -> str:
    response = http.post("/v1/files", data={"purpose": purpose}, files={"file": ("in.jsonl", content)})
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def run_batch(http: httpx.Client, content: bytes, endpoint: str = CHAT_URL) -> dict[str, Any]:
    created = http.post("/v1/batches", json={"input_file_id": upload(http, content), "endpoint": endpoint,
                                              "completion_window": "24h"})
    assert created.status_code == 200, created.text
    batch: dict[str, Any] = created.json()
    deadline = time.monotonic() + 15
    while batch["status"] not in FINAL:
        assert time.monotonic() < deadline, f"batch stuck in {batch['status']}"
        time.sleep(0.05)
        batch = http.get(f"/v1/batches/{batch['id']}").json()
    return batch


# --------------------------------------------------------------------------------------------- uploads

BIG = b"x" * (MAX_FILE_BYTES + 1)
UPLOADS: dict[str, tuple[dict[str, Any], int, str | None]] = {
    # name: (httpx request arguments, status, param)
    "empty file": ({"data": {"purpose": "batch"}, "files": {"file": ("a.jsonl", b"")}}, 400, "file"),
    "over the size limit": ({"data": {"purpose": "batch"}, "files": {"file": ("a.jsonl", BIG)}}, 413, None),
    "no purpose": ({"files": {"file": ("a.jsonl", b"{}\n")}}, 400, "purpose"),
    "unknown purpose": ({"data": {"purpose": "batch_output"}, "files": {"file": ("a.jsonl", b"{}\n")}}, 400,
                        "purpose"),
    "no file part": ({"data": {"purpose": "batch"}, "files": {"other": ("a.jsonl", b"{}\n")}}, 400, "file"),
    "two files": ({"data": {"purpose": "batch"},
                   "files": [("file", ("a.jsonl", b"{}\n")), ("file", ("b.jsonl", b"{}\n"))]}, 400, "file"),
    "not multipart": ({"json": {"purpose": "batch", "file": "{}"}}, 400, None),
    "garbage multipart": ({"content": b"garbage", "headers": {"content-type": "multipart/form-data; boundary=zz"}},
                          400, None),
    "truncated multipart": ({"content": b'--zz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n{',
                             "headers": {"content-type": "multipart/form-data; boundary=zz"}}, 400, None),
}


@pytest.mark.parametrize("name", list(UPLOADS))
def test_bad_uploads_are_refused(http: httpx.Client, name: str) -> None:
    arguments, status, param = UPLOADS[name]
    error = assert_openai_error(http.post("/v1/files", **arguments), status)
    assert error["param"] == param


def test_purpose_may_follow_the_file(http: httpx.Client) -> None:
    boundary = "obatch-test"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="dir/../late.jsonl"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + GOOD + (
        f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--{boundary}--\r\n'
    ).encode()
    stored = http.post("/v1/files", content=body,
                       headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert stored.status_code == 200, stored.text
    assert stored.json()["purpose"] == "batch" and stored.json()["filename"] == "late.jsonl"
    assert stored.json()["bytes"] == len(GOOD)


def test_oversize_upload_through_the_sdk(obatch_server: ServerProcess) -> None:
    with OpenAI(base_url=obatch_server.v1, api_key=KEYS["dave"], max_retries=0) as client, \
            pytest.raises(openai.APIStatusError) as refused:
        client.files.create(file=("big.jsonl", io.BytesIO(b"y" * (4 * MAX_FILE_BYTES))), purpose="batch")
    assert refused.value.status_code == 413


def test_refused_uploads_leave_no_files(obatch_server: ServerProcess, http: httpx.Client) -> None:
    before = {p.name for p in (obatch_server.data_dir / "files").iterdir()}
    http.post("/v1/files", data={"purpose": "batch"}, files={"file": ("a.jsonl", BIG)})
    http.post("/v1/files", data={"purpose": "nope"}, files={"file": ("a.jsonl", b"{}\n")})
    assert {p.name for p in (obatch_server.data_dir / "files").iterdir()} == before


# ----------------------------------------------------------------------- batches that fail validation

GOOD = orjson.dumps(chat_line("good"))
BATCH_FILES: dict[str, tuple[bytes, list[tuple[int | None, str]]]] = {
    "bad JSON": (GOOD + b'\n{"custom_id": "b", "method": \n', [(2, "invalid_json_line")]),
    "duplicate custom_id": (jsonl([chat_line("a"), chat_line("b"), chat_line("a")]), [(3, "duplicate_custom_id")]),
    "wrong url": (jsonl([{**chat_line("a"), "url": "/v1/images"}]), [(1, "invalid_url")]),
    "wrong method": (jsonl([{**chat_line("a"), "method": "GET"}]), [(1, "invalid_method")]),
    "url of another endpoint": (jsonl([chat_line("a"), embed_line("e")]), [(2, "mismatched_endpoint")]),
    "not UTF-8": (GOOD + b'\n{"custom_id": "\xff\xfe", "method": "POST"}\n', [(2, "invalid_encoding")]),
    "not an object": (b"[1, 2]\n", [(1, "invalid_json_line")]),
    "unknown field": (jsonl([{**chat_line("a"), "extra": 1}]), [(1, "invalid_request")]),
    "no messages": (jsonl([{**chat_line("a"), "body": {"model": "m"}}]), [(1, "missing_required_parameter")]),
    "no custom_id": (jsonl([{**chat_line("a"), "custom_id": ""}]), [(1, "missing_required_parameter")]),
    "blank lines only": (b"\n \r\n\n", [(None, "empty_file")]),
    "too many lines": (jsonl(chat_line(f"n{i}") for i in range(MAX_LINES + 1)), [(MAX_LINES + 1, "too_many_lines")]),
    "every problem listed": (b"{\n" + GOOD + b"\n" + GOOD + b"\n[]\n", [(1, "invalid_json_line"),
                                                                        (3, "duplicate_custom_id"),
                                                                        (4, "invalid_json_line")]),
}


@pytest.mark.parametrize("name", list(BATCH_FILES))
def test_bad_batch_files_fail_with_line_numbers(http: httpx.Client, name: str) -> None:
    content, expected = BATCH_FILES[name]
    batch = run_batch(http, content)
    assert batch["status"] == "failed" and batch["failed_at"], batch
    assert [(e["line"], e["code"]) for e in batch["errors"]["data"]] == expected
    assert all(e["message"] for e in batch["errors"]["data"])
    assert batch["output_file_id"] is None and batch["error_file_id"] is None


def test_bom_and_crlf_are_accepted(http: httpx.Client) -> None:
    content = b"\xef\xbb\xbf" + b"\r\n".join(orjson.dumps(chat_line(f"w{i}")) for i in range(3)) + b"\r\n"
    batch = run_batch(http, content)
    assert batch["status"] == "completed", batch
    output = parse_jsonl(http.get(f"/v1/files/{batch['output_file_id']}/content").text)
    assert sorted(line["custom_id"] for line in output) == ["w0", "w1", "w2"]


# ---------------------------------------------------------------------------------- refused requests

def _valid_create(http: httpx.Client, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"input_file_id": upload(http, GOOD + b"\n"), "endpoint": CHAT_URL,
                            "completion_window": "24h"}
    body.update(changes)
    return body


CREATES: dict[str, tuple[dict[str, Any], int, str | None]] = {
    "unknown input_file_id": ({"input_file_id": "file-0123456789abcdef01234567"}, 404, "file_id"),
    "input_file_id that is no id": ({"input_file_id": "../../obatch.db"}, 404, "file_id"),
    "completion_window 24x": ({"completion_window": "24x"}, 400, "completion_window"),
    "completion_window 0h": ({"completion_window": "0h"}, 400, "completion_window"),
    "completion_window 8d": ({"completion_window": "8d"}, 400, "completion_window"),
    "completion_window empty": ({"completion_window": ""}, 400, "completion_window"),
    "unknown endpoint": ({"endpoint": "/v1/audio/speech"}, 400, "endpoint"),
    "endpoint local models cannot serve": ({"endpoint": "/v1/moderations"}, 400, "endpoint"),
    "17 metadata pairs": ({"metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata"),
    "metadata key too long": ({"metadata": {"k" * 65: "v"}}, 400, "metadata"),
    "metadata value too long": ({"metadata": {"k": "v" * 513}}, 400, "metadata"),
    "metadata value not a string": ({"metadata": {"k": 1}}, 400, "metadata.k"),
    "input_file_id not a string": ({"input_file_id": 12}, 400, "input_file_id"),
}


@pytest.mark.parametrize("name", list(CREATES))
def test_bad_batch_creates_are_refused(http: httpx.Client, name: str) -> None:
    changes, status, param = CREATES[name]
    error = assert_openai_error(http.post("/v1/batches", json=_valid_create(http, **changes)), status)
    assert error["param"] == param


def test_batch_input_needs_purpose_batch(http: httpx.Client) -> None:
    other = upload(http, GOOD + b"\n", purpose="user_data")
    error = assert_openai_error(http.post("/v1/batches", json={"input_file_id": other, "endpoint": CHAT_URL,
                                                               "completion_window": "24h"}), 400)
    assert error["param"] == "input_file_id"


RAW: list[tuple[str, str, dict[str, Any], int]] = [
    ("POST", "/v1/batches", {"content": b"{not json"}, 400),
    ("POST", "/v1/batches", {"json": []}, 400),
    ("POST", "/v1/batches", {"json": {}}, 400),
    ("GET", "/v1/batches?limit=0", {}, 400),
    ("GET", "/v1/batches?limit=101", {}, 400),
    ("GET", "/v1/batches?limit=abc", {}, 400),
    ("GET", "/v1/batches?after=batch-0123456789abcdef01234567", {}, 404),
    ("GET", "/v1/files?order=sideways", {}, 400),
    ("GET", "/v1/batches/batch-nope", {}, 404),
    ("POST", "/v1/batches/batch-nope/cancel", {}, 404),
    ("GET", "/v1/nothing-here", {}, 404),
    ("PUT", "/v1/files", {}, 405),
    ("DELETE", "/v1/batches/batch-0123456789abcdef01234567", {}, 405),
    ("POST", CHAT_URL, {"content": b"{not json"}, 400),
    ("POST", CHAT_URL, {"json": {"model": "llama3.2:1b"}}, 400),
    ("POST", CHAT_URL, {"json": {"model": "llama3.2:1b", "messages": "hi"}}, 400),
    ("POST", CHAT_URL, {"json": {"messages": [{"role": "user", "content": "hi"}]}}, 400),
    ("POST", CHAT_URL, {"json": {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}}, 404),
    ("POST", "/v1/embeddings", {"json": {"model": "nomic-embed-text", "input": "x", "stream": True}}, 400),
    ("POST", "/v1/embeddings", {"json": {"model": "nomic-embed-text"}}, 400),
    ("GET", "/v1/models/no-such-model", {}, 404),
]


@pytest.mark.parametrize(("method", "path", "arguments", "status"), RAW, ids=[f"{m} {p} {s}" for m, p, _, s in RAW])
def test_bad_requests_get_openai_errors(http: httpx.Client, method: str, path: str, arguments: dict[str, Any],
                                        status: int) -> None:
    assert_openai_error(http.request(method, path, **arguments), status)


def test_cancelling_a_finished_batch_is_a_conflict(http: httpx.Client) -> None:
    batch = run_batch(http, GOOD + b"\n")
    refused = http.post(f"/v1/batches/{batch['id']}/cancel")
    assert_openai_error(refused, 409)
    assert refused.headers["x-should-retry"] == "false"


def test_no_server_error_was_ever_logged(obatch_server: ServerProcess, http: httpx.Client) -> None:
    """In whatever order the tests run, this one sends a bad upload, a batch that fails validation and a bad
    request itself, then reads the whole log so far: each was answered and logged, and no 5xx answered, no error
    logged (for these or for any server test before)."""
    arguments, status, _ = UPLOADS["garbage multipart"]
    assert http.post("/v1/files", **arguments).status_code == status
    assert run_batch(http, BATCH_FILES["every problem listed"][0])["status"] == "failed"
    missing = f"/v1/batches/batch-{'0' * 24}"
    assert http.get(missing).status_code == 404

    def records() -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in obatch_server.log().splitlines() if line.startswith("{")]

    deadline = time.monotonic() + 10  # the access line is written as the answer completes
    while not any(r.get("path") == missing and r.get("status") == 404 for r in records()):
        assert time.monotonic() < deadline, "the server did not log the request"
        time.sleep(0.05)
    logged = records()
    assert not [r for r in logged if r.get("level") in ("ERROR", "CRITICAL")]
    assert not [r for r in logged if isinstance(r.get("status"), int) and r["status"] >= 500]


# ------------------------------------------------------------------------------------- what comes back


def test_files_made_within_a_second_list_in_upload_order(http: httpx.Client) -> None:
    """They share ``created_at``; ``order=asc`` once ordered them by their random ids."""
    made = [upload(http, jsonl([chat_line(f"o{i}")])) for i in range(30)]
    mine = set(made)
    for order, expected in (("asc", made), ("desc", made[::-1])):
        listed = http.get("/v1/files", params={"order": order, "limit": 10_000}).json()["data"]
        assert [f["id"] for f in listed if f["id"] in mine] == expected, order
    page = http.get("/v1/files", params={"order": "asc", "after": made[9], "limit": 40}).json()["data"]
    # the server's other files (an earlier test's batch finalising now writes its output file) may list among them
    assert [f["id"] for f in page if f["id"] in mine][:5] == made[10:15]


def test_empty_metadata_comes_back_empty(http: httpx.Client) -> None:
    file_id = upload(http, jsonl([chat_line("m")]))
    for metadata, back in (({}, {}), (None, None), ({"k": "v"}, {"k": "v"})):
        created = http.post("/v1/batches", json={"input_file_id": file_id, "endpoint": CHAT_URL,
                                                 "completion_window": "24h", "metadata": metadata})
        assert created.status_code == 200, created.text
        assert created.json()["metadata"] == back
        assert http.get(f"/v1/batches/{created.json()['id']}").json()["metadata"] == back
