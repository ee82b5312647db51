"""``/v1/benchmarks``: best config per model, a model's history, models side by side, estimates for a workload,
and the estimate-vs-actual record of finished batches. Each handler is one call into ``obatch.bench.service``, on
the request's store session (the ``db_session`` dependency opens and closes it).

Sweeps (``/v1/benchmarks/sweeps``) are run by the server's worker on the server's backend (``obatch.bench.sweep_jobs``);
starting one takes an admin key, or a key within the sweep limits when tenants may (``obatch.server.policy``); a
sweep belongs to the key that started it (another key gets 404, as for batches) and admin keys see every sweep.
The points a sweep measures are shared benchmark data, like every other point.

Every number a caller passes is bounded (a workload of 10^18 requests or a 1e300-token prompt is refused with a
400, not computed), and the host details of benchmark runs (hostname, CPU, notebook path) and their names are for
admin keys (a key sees the names of its own sweeps' runs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from litestar import Controller, Response, get, post
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from obatch import errors
from obatch.bench import frames, service, sweep_jobs
from obatch.bench.schemas import Sweep, SweepParams
from obatch.bench.slo import MIN_SHARE
from obatch.protocol import DurationEstimate, ListPage
from obatch.server.deps import Admin, DbSession, Owner, Svc, Worker
from obatch.server.policy import start_sweep
from obatch.store import bench_repo

MAX_REQUESTS = 10_000_000  # requests in an estimated workload (the estimate's cost does not grow with it)
MAX_TOKENS = 10_000_000  # prompt / output tokens of one request, num_ctx
MAX_CONCURRENCY = 1024  # as Settings.concurrency

Positive = Annotated[int | None, QueryParameter(ge=1, le=MAX_TOKENS)]
Concurrency = Annotated[int | None, QueryParameter(ge=1, le=MAX_CONCURRENCY)]
Tokens = Annotated[float | None, QueryParameter(ge=0, le=MAX_TOKENS)]
Slo = Annotated[str | None, QueryParameter(max_length=200, description="e.g. ttft=500ms,tpot=50ms")]
Pilot = Annotated[str | None, QueryParameter(description="run this many random lines of the file first (1-256; the "
                                             "batch takes them as finished) and estimate from them; auto: 16, more "
                                             "while the estimate stays unsure by over ±15%, up to a quarter of the "
                                             "file")]


def _page(items: Sequence[Any]) -> ListPage:
    return ListPage(data=list(items))


def _scope(owner: str | None, admin: bool) -> str | None:
    """Whose sweeps a caller sees: everyone's for an admin key (or without keys), else its own."""
    return None if admin else owner


class BenchmarksController(Controller):
    path = "/v1/benchmarks"
    tags = ("benchmarks",)

    @get("/models", summary="The best known configuration (num_ctx, concurrency) of each benchmarked model")
    async def models(self, db_session: DbSession) -> ListPage:
        return _page(await service.best_per_model(db_session))

    @get("/models/{name:str}", summary="Every stored point of a model, filterable by num_ctx and concurrency")
    async def history(self, db_session: DbSession, name: FromPath[str], num_ctx: Positive = None,
                      concurrency: Concurrency = None, slo: Slo = None) -> ListPage:
        return _page(await service.model_history(db_session, name, num_ctx=num_ctx, concurrency=concurrency,
                                                 slo=slo))

    @get("/capacity", summary="The highest concurrency meeting an SLO (?slo=ttft=500ms,tpot=50ms), per num_ctx")
    async def capacity(self, db_session: DbSession, model: FromQuery[str], slo: FromQuery[str],
                       num_ctx: Positive = None,
                       min_share: Annotated[float, QueryParameter(gt=0, le=1)] = MIN_SHARE) -> ListPage:
        return _page(await service.capacity(db_session, model, slo, num_ctx=num_ctx, min_share=min_share))

    @get("/compare", summary="Models side by side (each one's newest run), optionally at one num_ctx")
    async def compare(self, db_session: DbSession, models: FromQuery[str], num_ctx: Positive = None) -> ListPage:
        names = [m.strip() for m in models.split(",") if m.strip()]
        return _page(await service.compare(db_session, names, num_ctx=num_ctx))

    @get("/estimate", summary="Expected duration of a workload, its interval, the best config, the points used")
    async def estimate(self, svc: Svc, db_session: DbSession, owner: Owner, model: FromQuery[str | None] = None,
                       num_requests: Annotated[int | None, QueryParameter(ge=1, le=MAX_REQUESTS)] = None,
                       prompt_tokens: Tokens = None, output_tokens: Tokens = None,
                       input_file_id: FromQuery[str | None] = None, num_ctx: Positive = None,
                       concurrency: Concurrency = None, pilot: Pilot = None,
                       completion_window: FromQuery[str | None] = None,
                       schedule: FromQuery[Literal["auto", "file"] | None] = None) -> DurationEstimate:
        return await service.estimate(
            db_session, svc.settings, owner, backend=svc.backend.name, input_file_id=input_file_id, model=model,
            num_requests=num_requests, prompt_tokens=prompt_tokens, output_tokens=output_tokens, num_ctx=num_ctx,
            concurrency=concurrency, pilot=pilot, engine=svc.pool, sessions=svc.sessions,
            completion_window=completion_window, schedule=schedule or svc.settings.schedule)

    @get("/estimates", summary="Estimate vs actual duration of finished batches")
    async def estimates(self, db_session: DbSession, owner: Owner) -> ListPage:
        return _page(await service.estimate_records(db_session, owner))

    @get("/runs", summary="Benchmark runs with their parameters and environment")
    async def runs(self, db_session: DbSession, owner: Owner, admin: Admin) -> ListPage:
        runs = await service.list_runs(db_session, host_details=admin)
        if admin:
            return _page(runs)
        mine = {s.run_id for s in await bench_repo.list_sweeps(db_session, owner or "", limit=10_000)}
        return _page([r if r.id in mine else r.model_copy(update={"name": ""}) for r in runs])

    @get("/export", summary="Every point with its run's environment, as CSV or JSON (?format=csv|json&models=a,b)")
    async def export(self, db_session: DbSession, admin: Admin, format: FromQuery[str] = "csv",
                     models: FromQuery[str | None] = None) -> Response[bytes]:
        names = [m.strip() for m in models.split(",") if m.strip()] if models else None
        body = await frames.export(db_session, format, models=names, host_details=admin)
        media = "text/csv" if format == "csv" else "application/json"
        return Response(body, media_type=media,
                        headers={"content-disposition": f'attachment; filename="obatch-benchmarks.{format}"'})

    @post("/sweeps", status_code=200, summary="Start a sweep on the server's backend (run by the server's worker)")
    async def start_sweep(self, data: JSONBody[SweepParams], svc: Svc, worker: Worker, owner: Owner,
                          admin: Admin) -> Sweep:
        problem = data.problem()
        if problem is not None:
            raise errors.ConfigError(problem[0], param=problem[1])
        made = await start_sweep(svc, data, owner, admin)
        worker.kick()
        return made

    @get("/sweeps", summary="Sweeps, newest first (an admin key sees every key's)")
    async def list_sweeps(self, db_session: DbSession, owner: Owner, admin: Admin) -> ListPage:
        return _page([sweep_jobs.to_wire(r) for r in await bench_repo.list_sweeps(db_session, _scope(owner, admin))])

    @get("/sweeps/{sweep_id:str}", summary="A sweep: status and points done of total")
    async def get_sweep(self, db_session: DbSession, sweep_id: FromPath[str], owner: Owner, admin: Admin) -> Sweep:
        return sweep_jobs.to_wire(await bench_repo.get_sweep(db_session, sweep_id, _scope(owner, admin)))

    @post("/sweeps/{sweep_id:str}/cancel", status_code=200, summary="Cancel a sweep (measured points are kept)")
    async def cancel_sweep(self, svc: Svc, sweep_id: FromPath[str], owner: Owner, admin: Admin) -> Sweep:
        return await sweep_jobs.cancel(svc.sessions, sweep_id, _scope(owner, admin))
