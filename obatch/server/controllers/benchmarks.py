"""``/v1/benchmarks``: best config per model, a model's history, models side by side, estimates for a workload,
and the estimate-vs-actual record of finished batches. Each handler is one call into ``obatch.bench.service``, on
the request's store session (the ``db_session`` dependency opens and closes it).

Every number a caller passes is bounded (a workload of 10^18 requests or a 1e300-token prompt is refused with a
400, not computed), and the host details of benchmark runs (hostname, CPU, notebook path) are for admin keys."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, get
from litestar.params import FromPath, FromQuery, QueryParameter

from obatch.bench import service
from obatch.protocol import DurationEstimate, ListPage
from obatch.server.deps import Admin, DbSession, Owner, Svc

MAX_REQUESTS = 10_000_000  # requests in an estimated workload (the estimate's cost does not grow with it)
MAX_TOKENS = 10_000_000  # prompt / output tokens of one request, num_ctx
MAX_CONCURRENCY = 1024  # as Settings.concurrency
HOST_FIELDS = ("hostname", "cpu", "notebook_path")  # what a benchmark run tells about the machine and its files

Positive = Annotated[int | None, QueryParameter(ge=1, le=MAX_TOKENS)]
Concurrency = Annotated[int | None, QueryParameter(ge=1, le=MAX_CONCURRENCY)]
Tokens = Annotated[float | None, QueryParameter(ge=0, le=MAX_TOKENS)]
Pilot = Annotated[int | None, QueryParameter(ge=1, le=256, description="run this many random lines of the file "
                                             "first (the batch takes them as finished) and estimate from them")]


def _page(items: list[dict[str, Any]]) -> ListPage:
    return ListPage(data=items)


class BenchmarksController(Controller):
    path = "/v1/benchmarks"
    tags = ("benchmarks",)

    @get("/models", summary="The best known configuration (num_ctx, concurrency) of each benchmarked model")
    async def models(self, db_session: DbSession) -> ListPage:
        return _page(await service.best_per_model(db_session))

    @get("/models/{name:str}", summary="Every stored point of a model, filterable by num_ctx and concurrency")
    async def history(self, db_session: DbSession, name: FromPath[str], num_ctx: Positive = None,
                      concurrency: Concurrency = None) -> ListPage:
        return _page(await service.model_history(db_session, name, num_ctx=num_ctx, concurrency=concurrency))

    @get("/compare", summary="Models side by side (each one's newest run), optionally at one num_ctx")
    async def compare(self, db_session: DbSession, models: FromQuery[str], num_ctx: Positive = None) -> ListPage:
        names = [m.strip() for m in models.split(",") if m.strip()]
        return _page(await service.compare(db_session, names, num_ctx=num_ctx))

    @get("/estimate", summary="Expected duration of a workload, its interval, the best config, the points used")
    async def estimate(self, svc: Svc, db_session: DbSession, owner: Owner, model: FromQuery[str | None] = None,
                       num_requests: Annotated[int | None, QueryParameter(ge=1, le=MAX_REQUESTS)] = None,
                       prompt_tokens: Tokens = None, output_tokens: Tokens = None,
                       input_file_id: FromQuery[str | None] = None, num_ctx: Positive = None,
                       concurrency: Concurrency = None, pilot: Pilot = None) -> DurationEstimate:
        return await service.estimate(
            db_session, svc.settings, owner, backend=svc.backend.name, input_file_id=input_file_id, model=model,
            num_requests=num_requests, prompt_tokens=prompt_tokens, output_tokens=output_tokens, num_ctx=num_ctx,
            concurrency=concurrency, pilot=pilot, engine=svc.pool, sessions=svc.sessions)

    @get("/estimates", summary="Estimate vs actual duration of finished batches")
    async def estimates(self, db_session: DbSession, owner: Owner) -> ListPage:
        return _page(await service.estimate_records(db_session, owner))

    @get("/runs", summary="Benchmark runs with their parameters and environment")
    async def runs(self, db_session: DbSession, admin: Admin) -> ListPage:
        runs = await service.list_runs(db_session)
        return _page(runs if admin else [{k: v for k, v in r.items() if k not in HOST_FIELDS} for r in runs])
