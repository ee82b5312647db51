"""An in-memory, OpenAI-shaped obatch server behind ``httpx.MockTransport``, for the UI's AppTest tests.

It answers the routes the UI calls with the shapes of docs/openai-batch (files, batches, models, health,
benchmarks) and records every request, so a test can drive a page and then check what was sent.
"""

from __future__ import annotations

import email.parser
import itertools
import time
from typing import Any

import httpx
import orjson

from obatch import errors
from obatch.batches import window_seconds
from obatch.batches.retry import RETRYABLE_CODES
from obatch.bench import frames
from obatch.bench.estimate import deadline
from obatch.bench.schemas import BenchPoint, EstimateRecord, Sweep, SweepParams
from obatch.bench.service import config_models, point_models
from obatch.bench.slo import add_goodput, capacities, count_met, parse_slo
from obatch.client import Client
from obatch.protocol import (
    AnswerLengthsInfo,
    BackendHealth,
    BatchExtension,
    DeadlinePlan,
    DurationEstimate,
    EstimateCandidate,
    EstimatePoint,
    Health,
    HostStatus,
    ListPage,
    Model,
    ModelList,
    PilotInfo,
)
from obatch.store.bench_tables import BenchSampleRow

ENGINE = "http://127.0.0.1:11434"
MODELS = [
    Model(id="llama3.2:1b", context_length=131072, family="llama", parameter_size="1.2B", quantization="Q8_0",
          loaded=True),
    Model(id="qwen2.5:0.5b", context_length=32768, family="qwen2", parameter_size="494M", quantization="Q4_K_M"),
]


RUN_STORY = {"mode": "auto", "hosts": [  # a batch's obatch.concurrency (obatch.batches.concurrency_json)
    {"url": ENGINE, "backend": "ollama", "state": "up", "concurrency": 6, "best": 6, "auto": True,
     "reason": "raised to 6: 5 gave 98.0/s against 91.5/s", "in_flight": 6, "served": 40, "error": None,
     "models": ["llama3.2:1b"], "history": [{"at": 10.0, "level": 4, "reason": "starting at 4: the engine's slots"},
                                            {"at": 14.5, "level": 6, "reason": "raised to 6: 5 gave 98.0/s against "
                                                                               "91.5/s"}]}]}


def bench_points(models: tuple[tuple[str, float], ...] = (("llama3.2:1b", 100.0), ("qwen2.5:0.5b", 160.0)),
                 *, run_id: str = "bench-fake", created_at: float = 1_700_000_000,
                 rates: tuple[float, ...] = ()) -> list[BenchPoint]:
    """Two models × three windows × two concurrencies, slower with longer windows, as the server sends them; with
    ``rates``, request-rate points of each model at 2048 tokens too, whose latency grows with the rate."""
    points = []
    for model, speed in models:
        for num_ctx in (2048, 4096, 8192):
            for concurrency in (1, 4):
                tps = speed * concurrency ** 0.5 * 2048 / num_ctx
                latency = 1000 * 32 / tps * concurrency
                points.append(BenchPoint(
                    id=len(points) + 1, run_id=run_id, backend="ollama", model=model, num_ctx=num_ctx,
                    concurrency=concurrency, workload="chat", created_at=created_at + num_ctx, n_requests=16,
                    n_completed=16, n_failed=0, success_rate=1.0, wall_seconds=16 / (tps / 32),
                    req_per_s=tps / 32, output_tps=tps, gen_tps=tps / concurrency, latency_mean=latency,
                    latency_p50=latency, latency_p90=1.3 * latency, latency_p99=1.6 * latency, ttft_p50=40.0))
        for rate in rates:
            latency = 1000 * 32 / speed * (1 + rate / 2)
            points.append(BenchPoint(
                id=len(points) + 1, run_id=run_id, backend="ollama", model=model, num_ctx=2048, concurrency=0,
                rate=rate, arrival="poisson", achieved_rate=0.97 * rate, workload="chat",
                created_at=created_at + 9000 + rate, n_requests=16, n_completed=16, n_failed=0, success_rate=1.0,
                wall_seconds=16 / (0.95 * rate), req_per_s=0.95 * rate, output_tps=0.95 * rate * 32, gen_tps=speed,
                latency_mean=latency, latency_p50=latency, latency_p90=1.3 * latency, latency_p99=1.6 * latency,
                ttft_p50=40.0 * (1 + rate)))
    return points


def bench_samples(point: BenchPoint) -> list[BenchSampleRow]:
    """The point's requests as the server stores them: 32 output tokens each, TTFT and latency spread around the
    point's p50 (from 0.6 to 1.4 times it), so an SLO between those meets a share of them."""
    n = point.n_requests
    return [BenchSampleRow(point_id=point.id or 0, idx=i, ok=True, completion_tokens=32,
                           latency_ms=(point.latency_p50 or 0.0) * (0.6 + 0.8 * (i + 0.5) / n),
                           ttft_ms=(point.ttft_p50 or 0.0) * (0.6 + 0.8 * (i + 0.5) / n)) for i in range(n)]


def _list(items: list[Any]) -> httpx.Response:
    return _json(200, ListPage(data=items).model_dump(mode="json"))


def _multipart(request: httpx.Request) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    message = email.parser.BytesParser().parsebytes(head + request.content)
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    for part in message.get_payload():  # type: ignore[union-attr]
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        filename = part.get_filename()
        if filename:
            files[name] = (filename, payload)
        else:
            fields[name] = payload.decode()
    return fields, files


def fake_estimate(params: Any, scale: float = 1.0, *, piloted: bool = False) -> DurationEstimate:
    """The estimate the fake answers, in the server's own model (its durations times ``scale``); ``pilot=N``
    reports a pilot of N lines (``auto``: an automatic one of 16), and a file estimated without one (now or earlier:
    ``piloted``) says its answer lengths are unknown, its duration a guess (so the page offers a pilot). The sweep
    measured concurrency 4 and 8 (twice as fast)."""
    asked = params.get("pilot")
    pilot = (16 if asked == "auto" else int(asked)) if asked else None
    best = EstimateCandidate(num_ctx=2048, concurrency=4, seconds=42.0 * scale, req_per_s=2.4 / scale,
                             measured_req_per_s=3.9)
    faster = EstimateCandidate(num_ctx=2048, concurrency=8, seconds=21.0 * scale, req_per_s=4.8 / scale,
                               measured_req_per_s=7.0)
    known = pilot is not None or piloted or not params.get("input_file_id")
    return DurationEstimate(
        model=params.get("model") or "llama3.2:1b", backend="ollama", num_requests=100, seconds=42.0 * scale,
        low=30.0 * scale, high=60.0 * scale, num_ctx=2048, concurrency=4, req_per_s=2.4 / scale,
        measured_req_per_s=3.9, best=best, candidates=[best, faster], guess=not known,
        points=[EstimatePoint(id=i, run_id="run-1", num_ctx=2048, concurrency=4) for i in (1, 2, 3)],
        answers=AnswerLengthsInfo(source="pilot" if pilot or piloted else "none", known=known, samples=pilot or 0),
        pilot=PilotInfo(requests=pilot, ran=pilot, auto=asked == "auto") if pilot else None, done_requests=pilot or 0)


def fake_plan(made: DurationEstimate | None, window: str) -> DeadlinePlan:
    """The estimate against ``window``, by the server's own rule (``obatch.bench.estimate.deadline``)."""
    return deadline.plan(made, window_seconds(window), why="no benchmark points")


def _extension(batch: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The batch object's ``obatch`` field with ``fields`` set, in the server's own model."""
    made = BatchExtension.model_validate(batch.get("obatch") or {}).model_copy(update=fields)
    return made.model_dump(mode="json")


def _json(status: int, body: Any) -> httpx.Response:
    return httpx.Response(status, content=orjson.dumps(body), headers={"content-type": "application/json"})


def _error(status: int, message: str, code: str, *, param: str | None = None) -> httpx.Response:
    return _json(status, {"error": {"message": message, "type": "invalid_request_error", "param": param,
                                    "code": code}})


class FakeServer:
    def __init__(self, *, backend_ok: bool = True, with_benchmarks: bool = True) -> None:
        self.files: dict[str, tuple[dict[str, Any], bytes]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.requests: list[httpx.Request] = []
        self.backend_ok = backend_ok
        self.points = bench_points(rates=(1.0, 2.0, 4.0)) if with_benchmarks else []
        self.sweeps: dict[str, Sweep] = {}
        self.piloted: set[str] = set()  # files a pilot ran lines of
        self.estimate_scale = 1.0  # the estimates' durations (42 s at 1.0) times this
        self.finished: dict[str, list[dict[str, Any]]] = {}  # each batch's finished lines, in input order
        self._ids = itertools.count(1)
        self.transport = httpx.MockTransport(self.handle)

    def client(self) -> Client:
        return Client("http://fake.obatch", api_key="sk-test", transport=self.transport)

    def _id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids):024x}"

    # ----------------------------------------------------------------------------------------- routing
    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path, method = request.url.path, request.method
        parts = path.strip("/").split("/")
        if path == "/health":
            # obatch.server.operations.health: 200 while the store answers; the backend is only reported
            health = Health(status="ok" if self.backend_ok else "degraded", db="ok", backend=BackendHealth(
                name="ollama", reachable=self.backend_ok, version="0.9.0" if self.backend_ok else None,
                error=None if self.backend_ok else f"connection refused at {ENGINE}", urls=[ENGINE],
                hosts=[HostStatus(url=ENGINE, backend="ollama", state="up" if self.backend_ok else "down",
                                  concurrency=4, best=4, auto=True, reason="kept 4: 5 gave 101.0/s against 100.2/s",
                                  served=12, models=["llama3.2:1b"],
                                  error=None if self.backend_ok else f"connection refused at {ENGINE}")]))
            return _json(200, health.model_dump(mode="json"))
        if path == "/v1/models":
            if not self.backend_ok:
                return _error(502, "Connection to the engine failed: ClientConnectorError: Cannot connect to host",
                              "server_error")
            return _json(200, ModelList(data=MODELS).model_dump(mode="json"))
        if path == "/v1/files" and method == "POST":
            fields, files = _multipart(request)
            filename, content = files["file"]
            obj = {"id": self._id("file"), "object": "file", "bytes": len(content), "created_at": int(time.time()),
                   "filename": filename, "purpose": fields["purpose"], "status": "processed"}
            self.files[obj["id"]] = (obj, content)
            return _json(200, obj)
        if parts[:2] == ["v1", "files"] and len(parts) >= 3:
            if parts[2] not in self.files:
                return _error(404, f"No such file: {parts[2]}", "not_found")
            obj, content = self.files[parts[2]]
            if len(parts) == 4 and parts[3] == "content":
                return httpx.Response(200, content=content)
            return _json(200, obj)
        if path == "/v1/batches" and method == "POST":
            body = orjson.loads(request.content)
            if body["input_file_id"] not in self.files:
                return _error(404, f"No such file: {body['input_file_id']}", "not_found")
            now = int(time.time())
            try:  # the server's plan against the window, and its strict refusal (obatch.server.operations._plan)
                made = fake_plan(fake_estimate({"input_file_id": body["input_file_id"]}, self.estimate_scale)
                                 if self.points else None, body["completion_window"])
                if deadline.strict(body.get("metadata")):
                    deadline.refuse_if_certain(made)
            except errors.ConfigError as exc:
                return _error(400, exc.message, exc.code, param=exc.param)
            batch = {"id": self._id("batch"), "object": "batch", "endpoint": body["endpoint"],
                     "input_file_id": body["input_file_id"], "completion_window": body["completion_window"],
                     "created_at": now, "status": "in_progress", "in_progress_at": now, "model": body.get("model"),
                     "metadata": body.get("metadata"), "request_counts": {"total": 0, "completed": 0, "failed": 0},
                     "extra_sent": {k: body.get(k) for k in ("model", "concurrency")}}
            batch["obatch"] = _extension(batch, deadline=made)
            if self.points:  # the server estimates a batch at its start when the model has benchmark points
                batch["obatch"] = _extension(batch, estimate=fake_estimate({"input_file_id": body["input_file_id"]})
                                             .model_copy(update={"made_at": float(now)}))
            batch["request_counts"]["total"] = sum(
                1 for line in self.files[body["input_file_id"]][1].splitlines() if line.strip())
            self.batches[batch["id"]] = batch
            return _json(200, batch)
        if path == "/v1/batches":
            data = sorted(self.batches.values(), key=lambda b: b["id"], reverse=True)
            return _json(200, {"object": "list", "data": data, "has_more": False,
                               "first_id": data[0]["id"] if data else None,
                               "last_id": data[-1]["id"] if data else None})
        if parts[:2] == ["v1", "batches"] and len(parts) >= 3:
            batch = self.batches.get(parts[2])
            if batch is None:
                return _error(404, f"No such batch: {parts[2]}", "not_found")
            if len(parts) == 4 and parts[3] == "results":
                return self._results(batch, request.url.params)
            if len(parts) == 4 and parts[3] == "retry" and method == "POST":
                return self._retry(batch)
            if len(parts) == 4 and parts[3] == "cancel":
                if batch["status"] in ("completed", "failed", "expired", "cancelled"):
                    return _error(409, f"Batch {batch['id']} is {batch['status']} and cannot be cancelled.",
                                  "conflict")
                batch.update(status="cancelling", cancelling_at=int(time.time()))
                counts = batch["request_counts"]  # obatch.batches.batch_object: the lines that have not run
                batch["obatch"] = _extension(batch, not_run=counts["total"] - counts["completed"] - counts["failed"])
            return _json(200, batch)
        if parts[:2] == ["v1", "benchmarks"]:
            answer = self._benchmarks(request, parts[2:])
            if answer is not None:
                return answer
        if path == "/v1/benchmarks/estimate":
            piloted = request.url.params.get("pilot") or request.url.params.get("input_file_id") in self.piloted
            if not self.points and not piloted:  # without points a pilot of the file is the measurement
                return _error(404, "No benchmark points for this model.", "not_found")
            if request.url.params.get("pilot"):
                self.piloted.add(request.url.params["input_file_id"])
            made = fake_estimate(request.url.params, self.estimate_scale,
                                 piloted=request.url.params.get("input_file_id") in self.piloted)
            if window := request.url.params.get("completion_window"):
                try:
                    made = made.model_copy(update={"deadline": fake_plan(made, window)})
                except errors.ConfigError as exc:
                    return _error(400, exc.message, exc.code, param=exc.param)
            return _json(200, made.model_dump(mode="json"))
        return _error(404, f"Invalid URL ({method} {path}).", "unknown_url")

    def _results(self, batch: dict[str, Any], params: Any) -> httpx.Response:
        """``GET /v1/batches/{id}/results``: the finished lines after ``after`` (a prefix of the input here), up to
        ``limit``, with the server's cursor headers."""
        after, limit = int(params.get("after", 0)), int(params.get("limit", 100))
        chain = self.chain(batch) if params.get("merged") == "true" else [batch]
        newest: dict[str, dict[str, Any]] = {}  # merged: each line at the newest retry that finished it
        for later in chain[1:]:
            newest |= {x["custom_id"]: x for x in self.finished.get(later["id"], [])}
        lines = [(x, newest.get(x["custom_id"], x)) for x in self.finished.get(chain[0]["id"], [])
                 if x["obatch"]["line"] > after]
        page = lines[:limit]
        final = all(b["status"] in ("completed", "failed", "expired", "cancelled") for b in chain)
        cursor = page[-1][0]["obatch"]["line"] if page else after  # the cursor is the first batch's line
        return httpx.Response(200, content=b"".join(orjson.dumps(x) + b"\n" for _, x in page), headers={
            "content-type": "application/jsonl", "x-obatch-next-after": str(cursor),
            "x-obatch-finished": "true" if final and len(lines) <= limit else "false"})

    def chain(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """The retry chain of ``batch``: its first batch, then the retries in creation order (the ids grow)."""
        while parent := (batch.get("obatch") or {}).get("parent"):
            batch = self.batches[parent]
        found, level = [batch], [batch]
        while level:
            level = [self.batches[c] for b in level for c in (b.get("obatch") or {}).get("retries") or []]
            found += level
        return sorted(found, key=lambda b: b["id"])

    def _retry(self, batch: dict[str, Any]) -> httpx.Response:
        """``POST /v1/batches/{id}/retry``: a batch of the lines that failed with a retryable code, linked both
        ways (``obatch.parent`` / ``obatch.retries``), as obatch's server makes it."""
        if batch["status"] not in ("completed", "failed", "expired", "cancelled"):
            return _error(409, f"Batch {batch['id']} is {batch['status']}.", "conflict")
        failed = {x["custom_id"] for x in self.finished.get(batch["id"], [])
                  if x["error"] and x["error"]["code"] in RETRYABLE_CODES}
        if not failed:
            return _error(409, f"Batch {batch['id']} has nothing to retry.", "conflict")
        _obj, content = self.files[batch["input_file_id"]]
        data = b"".join(raw + b"\n" for raw in content.splitlines() if raw.strip()
                        and orjson.loads(raw)["custom_id"] in failed)
        file_id = self._id("file")
        self.files[file_id] = ({"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                                "filename": f"{batch['id']}_retry.jsonl", "purpose": "batch",
                                "status": "processed"}, data)
        made = {**{k: batch[k] for k in ("endpoint", "completion_window", "model", "metadata")},
                "id": self._id("batch"), "object": "batch", "input_file_id": file_id, "status": "in_progress",
                "created_at": int(time.time()), "in_progress_at": int(time.time()),
                "request_counts": {"total": len(failed), "completed": 0, "failed": 0}}
        made["obatch"] = _extension(made, parent=batch["id"])
        batch["obatch"] = _extension(batch, retries=[*(batch.get("obatch") or {}).get("retries", []), made["id"]])
        self.batches[made["id"]] = made
        return _json(200, made)

    # ------------------------------------------------------------------------------------------ benchmarks
    def summary(self, models: list[str] | None = None, num_ctx: int | None = None) -> Any:
        """The server's own summary of the points (``obatch.bench.frames``): best and compare come from it."""
        points = [p for p in self.points if (models is None or p.model in models)
                  and (num_ctx is None or p.num_ctx == num_ctx)]
        return frames.summary(frames.frame_of_points(points))

    def with_goodput(self, points: list[BenchPoint], slo: str) -> Any:
        """``points`` as the server's frame with goodput under ``slo`` (``obatch.bench.slo``, on their requests)."""
        bounds = parse_slo(slo)
        counts = count_met([p.id or 0 for p in points], [s for p in points for s in bench_samples(p)], bounds)
        return add_goodput(frames.frame_of_points(points), counts), bounds

    def _benchmarks(self, request: httpx.Request, parts: list[str]) -> httpx.Response | None:
        """The benchmark routes, answered with ``obatch.bench.schemas`` models built by the server's code."""
        params = request.url.params
        if parts == ["models"]:
            return _list(config_models(frames.best_configs(self.summary())))
        if (parts[:1] == ["models"] and len(parts) == 2) or parts == ["capacity"]:
            name = parts[1] if len(parts) == 2 else params.get("model", "")
            mine = [p for p in self.points if p.model == name]
            if not mine:
                return _error(404, f"No benchmark points for model {name!r}.", "not_found")
            if "slo" not in params and parts != ["capacity"]:
                return _list(mine)
            try:
                frame, bounds = self.with_goodput(mine, params.get("slo", ""))
            except errors.ConfigError as exc:
                return _json(400, {"error": {"message": exc.message, "type": "invalid_request_error",
                                             "param": "slo", "code": None}})
            return _list(capacities(frame, bounds) if parts == ["capacity"] else point_models(frame))
        if parts == ["compare"]:
            num_ctx = params.get("num_ctx")
            summary = self.summary(params.get("models", "").split(","), int(num_ctx) if num_ctx else None)
            return _list(config_models(frames.mark_best(frames.latest_configs(summary))) if not summary.is_empty()
                         else [])
        if parts == ["estimates"]:
            return _list([EstimateRecord(
                batch_id="batch-old", models="llama3.2:1b", requests=100, concurrency=4, estimated_seconds=50.0,
                low=40.0, high=60.0, actual_seconds=55.0, error_pct=-9.1, within_interval=True)]
                if self.points else [])
        if parts == ["sweeps"] and request.method == "POST":
            sweep_params = SweepParams.model_validate_json(request.content)
            made = Sweep(id=self._id("sweep"), status="in_progress", params=sweep_params, created_at=time.time(),
                         points_total=sweep_params.points, current="preparing the engine")
            self.sweeps[made.id] = made
            return _json(200, made.model_dump(mode="json"))
        if parts == ["sweeps"]:
            return _list(sorted(self.sweeps.values(), key=lambda x: x.created_at, reverse=True))
        if parts[:1] == ["sweeps"] and len(parts) >= 2:
            found = self.sweeps.get(parts[1])
            if found is None:
                return _error(404, f"No such sweep: {parts[1]}", "not_found")
            if parts[2:] == ["cancel"]:
                if not found.active:
                    return _error(409, f"Sweep {found.id} is {found.status} and cannot be cancelled.",
                                  "sweep_not_active")
                found = self.sweeps[found.id] = found.model_copy(update={"status": "cancelling"})
            return _json(200, found.model_dump(mode="json"))
        return None

    def finish_sweep(self, sweep_id: str) -> None:
        """Complete a sweep: its models get points (measured now) and it reports every point done."""
        found = self.sweeps[sweep_id]
        fresh = bench_points(tuple((m, 120.0) for m in found.params.models), run_id=f"bench-{sweep_id}",
                             created_at=time.time())
        self.points += [p for p in fresh if p.num_ctx in found.params.num_ctx
                        and p.concurrency in found.params.concurrency] or fresh
        self.sweeps[sweep_id] = found.model_copy(update={"status": "completed", "points_done": found.points_total,
                                                         "current": None, "backend": "ollama",
                                                         "finished_at": time.time()})

    # ------------------------------------------------------------------------------------------ driving
    def progress(self, batch_id: str, completed: int, failed: int = 0, *, output_tokens: int = 0,
                 lines: int = 0) -> None:
        """Counts of a running batch; with ``lines``, its first ``lines`` lines finished (``/results`` has them)."""
        batch = self.batches[batch_id]
        if lines:
            out, err = self._outcomes(batch, None, "")
            self.finished[batch_id] = sorted(out + err, key=lambda x: x["obatch"]["line"])[:lines]
        batch["request_counts"].update(completed=completed, failed=failed)
        batch["in_progress_at"] = int(time.time()) - 10
        batch["usage"] = {"input_tokens": 0, "output_tokens": output_tokens, "total_tokens": output_tokens}
        batch["obatch"] = _extension(batch, concurrency=RUN_STORY)  # as the batch process writes it while it runs

    def complete(self, batch_id: str, *, latency: bool = False, ran: int | None = None,
                 status: str = "completed", reused: int = 0) -> None:
        """Finish a batch: lines whose prompt says 'fail' fail (not in a retry), the others succeed (every 3rd cut
        by length).

        With ``ran``, only the first ``ran`` lines ran and the batch ends ``status`` (cancelled or expired): the
        others go to the error file as ``batch_cancelled`` / ``batch_expired`` and count as failed, with the
        ``obatch.not_run`` count beside them, as obatch's server writes them. With ``reused``, the first
        ``reused`` answers are another batch's (``obatch.cached_from``) and the batch counts them."""
        batch = self.batches[batch_id]
        code = {"cancelled": "batch_cancelled", "expired": "batch_expired"}.get(status, "")
        out, err = self._outcomes(batch, ran, code, latency=latency, reused=reused)
        now = int(time.time())
        batch.update(status=status, finalizing_at=now, **{f"{status}_at": now},
                     request_counts={"total": len(out) + len(err), "completed": len(out), "failed": len(err)})
        if ran is not None:
            batch["obatch"] = _extension(batch, not_run=sum(1 for e in err if e["error"]["code"] == code))
        if reused:
            batch["obatch"] = _extension(batch, cached=reused)
        self.finished[batch_id] = sorted(out + err, key=lambda x: x["obatch"]["line"])
        for kind, lines in (("output", out), ("error", err)):
            if lines:
                data = b"".join(orjson.dumps(x) + b"\n" for x in lines)
                obj = {"id": self._id("file"), "object": "file", "bytes": len(data), "created_at": now,
                       "filename": f"{batch_id}_{kind}.jsonl", "purpose": "batch_output", "status": "processed"}
                self.files[obj["id"]] = (obj, data)
                batch[f"{kind}_file_id"] = obj["id"]

    def _outcomes(self, batch: dict[str, Any], ran: int | None, code: str, *, latency: bool = False,
                  reused: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        _obj, content = self.files[batch["input_file_id"]]
        out: list[dict[str, Any]] = []
        err: list[dict[str, Any]] = []
        for n, raw in enumerate(line for line in content.splitlines() if line.strip()):
            line = orjson.loads(raw)
            text = line["body"]["messages"][-1]["content"]
            rid = f"batch_req_{batch['id'][-8:]}_{n}"  # unique across batches, as the server's
            if ran is not None and n >= ran:
                err.append({"id": rid, "custom_id": line["custom_id"], "response": None,
                            "error": {"code": code, "message": "This request was not executed."},
                            "obatch": {"line": n + 1}})
                continue
            if "fail" in text and not (batch.get("obatch") or {}).get("parent"):  # a retry meets a sound engine
                err.append({"id": rid, "custom_id": line["custom_id"], "response": None,
                            "error": {"code": "server_error", "message": "The engine failed."},
                            "obatch": {"line": n + 1}})
                continue
            result: dict[str, Any] = {
                "id": rid, "custom_id": line["custom_id"], "error": None,
                "response": {"status_code": 200, "request_id": f"req_{n}", "body": {
                    "object": "chat.completion", "model": line["body"]["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": f"answer {n}"},
                                 "finish_reason": "length" if n % 3 == 2 else "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}}}
            result["obatch"] = {"line": n + 1, "attempts": 1, "host": ENGINE, "engine": "ollama",
                                "engine_version": "0.9.0", "model_digest": "sha256:a80c4f17", "num_ctx": 2048,
                                "loaded_context": 4096}  # as obatch writes every line
            if len(out) < reused:
                result["obatch"] = {"line": n + 1, "attempts": 0, "num_ctx": 2048,
                                    "cached_from": {"batch_id": "batch-earlier", "custom_id": line["custom_id"]}}
            if latency:
                result["obatch"]["latency_ms"] = 100.0 * (n + 1) + 0.4567
            out.append(result)
        return out, err

    def sent(self, method: str, path: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and r.url.path == path]
