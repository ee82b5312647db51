"""A small synchronous HTTP client for an obatch server (the Streamlit UI's only way to the engine).

The UI talks to the server over the same OpenAI-shaped API the ``openai`` SDK uses, so closing a browser tab never
loses work: batches live in the server. Every failure reaches the caller as one of two errors, so a page can show a
sentence instead of a stack trace:

    ClientError
    ├── ServerUnavailable   nothing answered at the server URL (down, wrong port, timeout)
    └── ApiError            the server answered with an error (``status``, OpenAI's ``message`` and ``code``)

The server is found at ``OBATCH_SERVER_URL`` (default ``http://127.0.0.1:8000``) and ``OBATCH_API_KEY`` is sent as
a bearer token when set. Tests inject an ``httpx`` transport (``httpx.MockTransport`` or a test server's).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, BinaryIO, Literal, Self
from urllib.parse import quote

import httpx

from obatch.bench.schemas import BenchConfig, BenchPoint, BenchRun, Capacity, EstimateRecord, Sweep, SweepParams
from obatch.protocol import Batch, DurationEstimate, FileObject, Health, Model, ModelList

DEFAULT_SERVER_URL = "http://127.0.0.1:8000"

__all__ = ["DEFAULT_SERVER_URL", "ApiError", "Client", "ClientError", "Page", "ResultsPage", "ServerUnavailable"]


class ClientError(Exception):
    """Base of the errors this client raises; ``message`` is a sentence fit to show a user."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ServerUnavailable(ClientError):
    """The server did not answer at all (connection refused, DNS, timeout)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"The obatch server at {url} cannot be reached ({reason}).")
        self.url = url
        self.reason = reason


class ApiError(ClientError):
    """The server answered with an HTTP error; ``message``/``code`` come from OpenAI's error body."""

    def __init__(self, status: int, message: str, code: str | None = None, *, type: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.type = type
        self.param = param

    def __str__(self) -> str:
        code = f" [{self.code}]" if self.code else ""
        return f"HTTP {self.status}{code}: {self.message}"


class Page:
    """One page of an OpenAI list answer (``data``, ``has_more``, ``last_id``)."""

    def __init__(self, data: list[Any], *, has_more: bool = False, first_id: str | None = None,
                 last_id: str | None = None) -> None:
        self.data = data
        self.has_more = has_more
        self.first_id = first_id
        self.last_id = last_id

    def __iter__(self) -> Any:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


class ResultsPage:
    """One page of ``GET /v1/batches/{id}/results``: the output lines (``raw``: their bytes as the output files hold
    them), the cursor for the next page (``after``) and whether no line will follow (``finished``)."""

    def __init__(self, raw: bytes, *, after: int, finished: bool) -> None:
        self.raw = raw
        self.after = after
        self.finished = finished
        self.lines: list[dict[str, Any]] = [json.loads(line) for line in raw.splitlines() if line.strip()]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.lines)

    def __len__(self) -> int:
        return len(self.lines)


def _error_of(response: httpx.Response) -> ApiError:
    """OpenAI's ``{"error": {message, type, param, code}}``; Litestar's ``{detail}`` or plain text otherwise."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return ApiError(status, text[:500] or response.reason_phrase or f"HTTP {status}")
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return ApiError(status, str(error["message"]), _opt_str(error.get("code")),
                            type=_opt_str(error.get("type")), param=_opt_str(error.get("param")))
        if isinstance(error, str):
            return ApiError(status, error)
        if body.get("detail"):
            return ApiError(status, str(body["detail"]))
        if body.get("message"):
            return ApiError(status, str(body["message"]))
    return ApiError(status, response.reason_phrase or f"HTTP {status}")


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _clean(params: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in params.items() if value is not None}


class Client:
    """Files, batches, models, health and benchmarks of one obatch server.

    One ``httpx.Client`` (keep-alive) per instance; close it, or use the instance as a context manager.
    """

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        url = (base_url or DEFAULT_SERVER_URL).rstrip("/")
        if url.endswith("/v1"):
            url = url[: -len("/v1")]
        self.base_url = url
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout, transport=transport)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, transport: httpx.BaseTransport | None = None
                 ) -> Client:
        """The server at ``OBATCH_SERVER_URL`` with ``OBATCH_API_KEY`` (both optional)."""
        env = os.environ if env is None else env
        return cls(env.get("OBATCH_SERVER_URL") or DEFAULT_SERVER_URL, api_key=env.get("OBATCH_API_KEY") or None,
                   transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ transport

    def _request(self, method: str, path: str, *, ok: tuple[int, ...] = (), timeout: float | None = None,
                 **kwargs: Any) -> httpx.Response:
        """Send one request; translate transport faults and error answers into this module's errors."""
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise ServerUnavailable(self.base_url, "timed out") from None
        except httpx.TransportError as exc:
            raise ServerUnavailable(self.base_url, str(exc) or type(exc).__name__) from None
        if response.is_error and response.status_code not in ok:
            raise _error_of(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise ApiError(response.status_code, f"The server sent a non-JSON answer to {method} {path}.") from None

    def _page(self, path: str, params: Mapping[str, Any]) -> Page:
        body = self._json("GET", path, params=_clean(params))
        if isinstance(body, list):
            return Page(body)
        return Page(list(body.get("data") or []), has_more=bool(body.get("has_more")),
                    first_id=body.get("first_id"), last_id=body.get("last_id"))

    # ---------------------------------------------------------------------------------------------- files

    def upload_file(self, content: bytes | BinaryIO, filename: str, *, purpose: str = "batch") -> FileObject:
        """Multipart upload, like the SDK: part ``purpose`` then part ``file``."""
        files = {"file": (filename, content, "application/octet-stream")}
        body = self._json("POST", "/v1/files", data={"purpose": purpose}, files=files, timeout=300.0)
        return FileObject.model_validate(body)

    def list_files(self, *, purpose: str | None = None, limit: int | None = None, after: str | None = None
                   ) -> Page:
        page = self._page("/v1/files", {"purpose": purpose, "limit": limit, "after": after})
        page.data = [FileObject.model_validate(item) for item in page.data]
        return page

    def get_file(self, file_id: str) -> FileObject:
        return FileObject.model_validate(self._json("GET", f"/v1/files/{file_id}"))

    def file_content(self, file_id: str) -> bytes:
        return self._request("GET", f"/v1/files/{file_id}/content", timeout=300.0).content

    def delete_file(self, file_id: str) -> bool:
        return bool(self._json("DELETE", f"/v1/files/{file_id}").get("deleted", False))

    # -------------------------------------------------------------------------------------------- batches

    def create_batch(self, input_file_id: str, *, endpoint: str, completion_window: str = "24h",
                     metadata: Mapping[str, str] | None = None, model: str | None = None,
                     concurrency: int | None = None) -> Batch:
        """Create a batch. ``model`` and ``concurrency`` are obatch extensions (the SDK's ``extra_body``)."""
        payload = _clean({"input_file_id": input_file_id, "endpoint": endpoint,
                          "completion_window": completion_window, "metadata": dict(metadata) if metadata else None,
                          "model": model or None, "concurrency": concurrency})
        return Batch.model_validate(self._json("POST", "/v1/batches", json=payload))

    def list_batches(self, *, limit: int = 20, after: str | None = None) -> Page:
        """Newest first."""
        page = self._page("/v1/batches", {"limit": limit, "after": after})
        page.data = [Batch.model_validate(item) for item in page.data]
        return page

    def get_batch(self, batch_id: str) -> Batch:
        return Batch.model_validate(self._json("GET", f"/v1/batches/{batch_id}"))

    def cancel_batch(self, batch_id: str) -> Batch:
        return Batch.model_validate(self._json("POST", f"/v1/batches/{batch_id}/cancel"))

    def retry_batch(self, batch_id: str, *, codes: list[str] | None = None) -> Batch:
        """A new batch of the lines that failed for reasons a retry can change (or with these error ``codes``),
        linked both ways (``obatch.parent`` / ``obatch.retries``). 409 while a batch of its chain still runs."""
        payload = {"codes": list(codes)} if codes is not None else None
        return Batch.model_validate(self._json("POST", f"/v1/batches/{batch_id}/retry", json=payload))

    def batch_results(self, batch_id: str, *, after: int = 0, limit: int | None = None, merged: bool = False
                      ) -> ResultsPage:
        """The lines finished after line ``after`` (in input order, up to the first still running), the cursor
        for the next page, and whether the batch is final and its last line read. ``merged``: over its retry
        chain, each line's latest outcome."""
        params = _clean({"after": after, "limit": limit, "merged": "true" if merged else None})
        response = self._request("GET", f"/v1/batches/{batch_id}/results", params=params)
        return ResultsPage(response.content, after=int(response.headers.get("x-obatch-next-after", after)),
                           finished=response.headers.get("x-obatch-finished") == "true")

    def follow_results(self, batch_id: str, *, merged: bool = False, poll: float = 1.0,
                       timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Every line of a batch once, in input order, as it finishes, until the batch is final (``TimeoutError``
        after ``timeout`` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        after = 0
        while True:
            page = self.batch_results(batch_id, after=after, limit=1000, merged=merged)
            yield from page.lines
            after = page.after
            if page.finished:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"Batch {batch_id} is not final after {timeout} s.")
            if len(page.lines) < 1000:
                time.sleep(poll)

    # ------------------------------------------------------------------------------------ models, health

    def list_models(self) -> list[Model]:
        """``/v1/models`` entries; obatch adds the engine's facts (context_length, loaded, ...)."""
        return ModelList.model_validate(self._json("GET", "/v1/models")).data

    def health(self) -> Health:
        """The server's ``/health`` report. Its 503 (the store does not answer) is a report too, not an error."""
        return Health.model_validate(self._json("GET", "/health", ok=(503,), timeout=5.0))

    # ------------------------------------------------------------------------------------------ benchmarks

    def benchmark_models(self) -> list[BenchConfig]:
        """Each model's best configuration, as the server names it (``obatch.bench.best``)."""
        return [BenchConfig.model_validate(item) for item in self._page("/v1/benchmarks/models", {}).data]

    def benchmark_history(self, model: str, *, num_ctx: int | None = None, concurrency: int | None = None,
                          slo: str | None = None) -> list[BenchPoint]:
        """Every measured point of one model (optionally one context window or one concurrency); with an ``slo``
        (``"ttft=500ms,tpot=50ms"``) each point's goodput under it."""
        path = f"/v1/benchmarks/models/{quote(model, safe=':@')}"
        page = self._page(path, {"num_ctx": num_ctx, "concurrency": concurrency, "slo": slo})
        return [BenchPoint.model_validate(item) for item in page.data]

    def capacity(self, model: str, slo: str, *, num_ctx: int | None = None, min_share: float | None = None
                 ) -> list[Capacity]:
        """The highest concurrency meeting the SLO, per measured num_ctx."""
        page = self._page("/v1/benchmarks/capacity", {"model": model, "slo": slo, "num_ctx": num_ctx,
                                                       "min_share": min_share})
        return [Capacity.model_validate(item) for item in page.data]

    def benchmark_compare(self, models: list[str], *, num_ctx: int | None = None) -> list[BenchConfig]:
        """Configurations of several models side by side, each model's best marked."""
        page = self._page("/v1/benchmarks/compare", {"models": ",".join(models), "num_ctx": num_ctx})
        return [BenchConfig.model_validate(item) for item in page.data]

    def export_benchmarks(self, fmt: str = "csv", *, models: list[str] | None = None) -> bytes:
        """Every point with its run's environment, as CSV or JSON bytes."""
        params = _clean({"format": fmt, "models": ",".join(models) if models else None})
        return self._request("GET", "/v1/benchmarks/export", params=params, timeout=120.0).content

    def benchmark_runs(self) -> list[BenchRun]:
        return [BenchRun.model_validate(item) for item in self._page("/v1/benchmarks/runs", {}).data]

    def start_sweep(self, params: SweepParams | None = None, **fields: Any) -> Sweep:
        """Start a sweep on the server's backend: ``params``, or its fields as keywords (``models=[...]``,
        ``num_ctx=[...]``, ``concurrency=[...]``, ``requests``, ``workload``, ``repeats``)."""
        chosen = params or SweepParams.model_validate(fields)
        return Sweep.model_validate(self._json("POST", "/v1/benchmarks/sweeps", json=chosen.model_dump()))

    def get_sweep(self, sweep_id: str) -> Sweep:
        return Sweep.model_validate(self._json("GET", f"/v1/benchmarks/sweeps/{sweep_id}"))

    def list_sweeps(self) -> list[Sweep]:
        """Newest first."""
        return [Sweep.model_validate(item) for item in self._page("/v1/benchmarks/sweeps", {}).data]

    def cancel_sweep(self, sweep_id: str) -> Sweep:
        return Sweep.model_validate(self._json("POST", f"/v1/benchmarks/sweeps/{sweep_id}/cancel"))

    def wait_sweep(self, sweep_id: str, *, poll: float = 1.0, timeout: float | None = None,
                   on_progress: Callable[[Sweep], None] | None = None) -> Sweep:
        """Poll a sweep until it is no longer active (``on_progress`` sees each state); ``TimeoutError`` after
        ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            sweep = self.get_sweep(sweep_id)
            if on_progress is not None:
                on_progress(sweep)
            if not sweep.active:
                return sweep
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"Sweep {sweep_id} is still {sweep.status} after {timeout} s.")
            time.sleep(poll)

    def estimate(self, *, model: str | None = None, num_requests: int | None = None,
                 prompt_tokens: int | None = None, output_tokens: int | None = None,
                 input_file_id: str | None = None, concurrency: int | None = None,
                 pilot: int | Literal["auto"] | None = None, completion_window: str | None = None,
                 timeout: float | None = None) -> DurationEstimate:
        """Expected duration of a batch (with an interval, the best config and the points it rests on). ``pilot``
        runs that many random lines of the file first (the batch later takes them as finished; ``"auto"``: 16,
        more while the estimate stays unsure): that takes as long as those requests do, so the call waits up to
        ``timeout`` (10 minutes by default then). With ``completion_window`` (``"24h"``), the answer's ``deadline``
        says whether a batch of it would meet that window, and what would."""
        params = {"model": model, "num_requests": num_requests, "prompt_tokens": prompt_tokens,
                  "output_tokens": output_tokens, "input_file_id": input_file_id, "concurrency": concurrency,
                  "pilot": pilot, "completion_window": completion_window}
        wait = timeout if timeout is not None else (600.0 if pilot else None)
        return DurationEstimate.model_validate(
            self._json("GET", "/v1/benchmarks/estimate", params=_clean(params), timeout=wait))

    def estimate_history(self) -> list[EstimateRecord]:
        """Finished batches' estimated vs actual duration."""
        return [EstimateRecord.model_validate(item) for item in self._page("/v1/benchmarks/estimates", {}).data]

    def get(self, path: str, **params: Any) -> Any:
        """Any other JSON ``GET`` (for endpoints newer than this client)."""
        return self._json("GET", path, params=_clean(params))

    def post(self, path: str, payload: Mapping[str, Any] | None = None) -> Any:
        """Any other JSON ``POST``."""
        return self._json("POST", path, json=dict(payload or {}))
