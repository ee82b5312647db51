"""A real ``obatch serve`` in a child process on a free loopback port, for tests and the measurement scripts.

``serve_env`` builds the child's environment from settings (``OBATCH_<NAME>``, nothing inherited from the caller's
own ``OBATCH_*``); ``ServerProcess.start`` runs ``python -m obatch serve``, its output in a log file, and returns once
``/health`` answers 200; ``serving`` does the same as a context manager that stops the server after::

    with serving(tmp / "data", serve_env(tmp / "data", backend="ollama", ollama_url=sim.url)) as server:
        httpx.get(f"{server.v1}/models")
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    """A loopback TCP port nobody listens on now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_env(data_dir: Path, base: Mapping[str, str] | None = None, **settings: Any) -> dict[str, str]:
    """The environment of an ``obatch serve`` child: ``base`` (the caller's environment by default) less its
    ``OBATCH_*`` variables, then ``data_dir`` and each setting as ``OBATCH_<NAME>`` (a setting of None is left out),
    and progress bars off."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("OBATCH_")}
    values = {"data_dir": data_dir, **settings}
    env.update({f"OBATCH_{k.upper()}": str(v) for k, v in values.items() if v is not None})
    env["TQDM_DISABLE"] = "1"
    return env


@dataclass
class ServerProcess:
    """One ``python -m obatch serve`` child on a loopback port, its output in ``log_path``."""

    proc: subprocess.Popen[bytes]
    url: str
    data_dir: Path
    log_path: Path

    @classmethod
    def start(cls, data_dir: Path, env: Mapping[str, str], *, port: int | None = None, args: Iterable[str] = (),
              log_path: Path | None = None, wrapper: Iterable[str] = (), ready_within: float = 90.0
              ) -> ServerProcess:
        """Start the server in ``data_dir`` (made if missing) and wait until it is healthy. ``wrapper`` goes before
        the command (a profiler, say); the log goes next to the data folder unless ``log_path`` says where."""
        port = port or free_port()
        data_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_path or data_dir.parent / f"{data_dir.name}-server-{port}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [*wrapper, sys.executable, "-m", "obatch", "serve", "--port", str(port), *args],
                env=dict(env), cwd=data_dir, stdout=log, stderr=subprocess.STDOUT)
        server = cls(proc, f"http://127.0.0.1:{port}", data_dir, log_path)
        server.wait_ready(ready_within)
        return server

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until ``/health`` answers 200; a child that exits or never gets there raises with its log."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=10) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"obatch serve exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"obatch serve did not become healthy in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (the crash the store must survive)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL if it has not shut down within ``timeout`` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def serving(data_dir: Path, env: Mapping[str, str], **start: Any) -> Iterator[ServerProcess]:
    """``ServerProcess.start`` (same keywords), stopped when the block ends."""
    server = ServerProcess.start(data_dir, env, **start)
    try:
        yield server
    finally:
        server.stop()
