"""Slow clients against a real ``obatch serve`` (uvicorn) with short limits: an idle socket, headers a line at a
time, a stalled body and a trickled upload are each cut off within seconds (they once stayed open for ever), and
connections beyond the cap are answered 503. Each test is bounded by socket timeouts of a few seconds."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from obatch.testing.ollama_sim import OllamaSim
from tests.helpers import chat_line, jsonl
from tests.serverkit import KEYS, ServerProcess, server_env

HEADER_TIMEOUT, BODY_IDLE, UPLOAD_TIMEOUT, MAX_CONNECTIONS = 2.0, 1.0, 3.0, 12
AUTH = f"Authorization: Bearer {KEYS['alice']}\r\n"


@pytest.fixture(scope="module")
def served(obatch_sim: OllamaSim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("timeouts") / "data"
    env = server_env(data, obatch_sim.url, api_keys=KEYS["alice"], header_timeout=HEADER_TIMEOUT,
                     body_idle_timeout=BODY_IDLE, upload_timeout=UPLOAD_TIMEOUT, max_connections=MAX_CONNECTIONS,
                     min_body_rate=0)  # each limit alone (the minimum rate: tests/test_server_security.py)
    server = ServerProcess.start(Path(env["OBATCH_DATA_DIR"]), env)
    try:
        yield server
    finally:
        server.stop()


def connect(server: ServerProcess, timeout: float = 10.0) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket timeout bounds the wait)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def send_slowly(sock: socket.socket, pieces: list[bytes], interval: float) -> bytes:
    """Send the pieces ``interval`` seconds apart until the server answers or closes; return all it sent."""
    answer = b""
    for piece in pieces:
        try:
            sock.sendall(piece)
        except OSError:
            break
        time.sleep(interval)
        sock.setblocking(False)
        try:
            answer += sock.recv(65536)
        except (BlockingIOError, ConnectionResetError):
            pass
        finally:
            sock.setblocking(True)
        if answer:
            break
    sock.settimeout(5)
    with contextlib.suppress(OSError):
        answer += read_all(sock)
    return answer


def test_an_idle_connection_is_closed(served: ServerProcess) -> None:
    with connect(served) as sock:
        started = time.monotonic()
        assert read_all(sock) == b""  # closed without a word: nothing was asked
        assert HEADER_TIMEOUT * 0.9 <= time.monotonic() - started < HEADER_TIMEOUT + 5


def test_headers_sent_a_line_at_a_time_are_cut_off(served: ServerProcess) -> None:
    with connect(served) as sock:
        started = time.monotonic()
        lines = [b"GET /v1/files HTTP/1.1\r\nHost: x\r\n"] + [f"X-Slow-{i}: {i}\r\n".encode() for i in range(40)]
        answer = send_slowly(sock, lines, 0.25)  # 10 s of headers: bytes arriving reset no timer
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert time.monotonic() - started < HEADER_TIMEOUT + 5


def test_a_stalled_body_is_answered_408(served: ServerProcess) -> None:
    with connect(served) as sock:
        sock.sendall(f"POST /v1/batches HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Type: application/json\r\n"
                     f"Content-Length: 100\r\n\r\n{{\"input_file_id\":".encode())
        started = time.monotonic()
        answer = read_all(sock)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b'"code":"request_timeout"' in answer and b"connection: close" in answer.lower()
        assert BODY_IDLE * 0.9 <= time.monotonic() - started < BODY_IDLE + 5


def test_a_trickled_upload_is_cut_off_at_the_upload_limit(served: ServerProcess) -> None:
    content = jsonl([chat_line(f"r{i}") for i in range(200)])
    boundary = "trickle"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}\r\n"
            f"Content-Disposition: form-data; name=\"file\"; filename=\"slow.jsonl\"\r\n\r\n").encode()
    body = head + content + f"\r\n--{boundary}--\r\n".encode()
    with connect(served) as sock:
        sock.sendall(f"POST /v1/files HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Type: multipart/form-data; "
                     f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        started = time.monotonic()
        chunks = [body[i:i + 16] for i in range(0, len(body), 16)]
        answer = send_slowly(sock, chunks, 0.2)  # 16 bytes every 0.2 s: never idle, never done
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert UPLOAD_TIMEOUT * 0.9 <= time.monotonic() - started < UPLOAD_TIMEOUT + 5
    with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {KEYS['alice']}"}) as http:
        assert http.get("/v1/files").json()["data"] == []  # nothing of the cut-off upload was kept


def test_connections_beyond_the_cap_get_503_and_health_recovers(served: ServerProcess) -> None:
    idle = [connect(served) for _ in range(MAX_CONNECTIONS)]
    try:
        with httpx.Client(base_url=served.url, timeout=5) as http:
            assert http.get("/health").status_code == 503
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 10
    with httpx.Client(base_url=served.url, timeout=5) as http:
        while (status := http.get("/health").status_code) != 200:
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
