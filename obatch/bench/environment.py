"""Where a benchmark ran: host, CPU, memory, GPU (where readable), engine and obatch versions.

A figure without its machine is not a figure. Everything here is best effort: what cannot be read is ``None``.
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from obatch.backends.base import Backend
from obatch.engine import running_engines


def obatch_version() -> str:
    try:
        return metadata.version("obatch")
    except metadata.PackageNotFoundError:
        from obatch import __version__

        return __version__


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _gpus() -> list[dict[str, str]]:
    """NVIDIA GPUs through ``nvidia-smi`` when it exists (name, memory)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, _, memory = line.partition(",")
        gpus.append({"name": name.strip(), "memory": memory.strip()})
    return gpus


def host_facts() -> dict[str, Any]:
    """The machine's facts (blocking: reads /proc and may run nvidia-smi)."""
    return {
        "hostname": socket.gethostname(), "platform": platform.platform(), "python": sys.version.split()[0],
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "memory_bytes": _memory_bytes(), "gpus": _gpus(),
        "obatch": obatch_version(), "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        # figures taken beside another embedded engine are suspect (see obatch.engine, "Sharing cores")
        "other_embedded_engines": len(running_engines(not_of=os.getpid())),
    }


async def environment(backend: Backend, models: list[str]) -> dict[str, Any]:
    """Host facts plus the backend's name and version and what it says about each model."""
    facts = await asyncio.to_thread(host_facts)
    try:
        version = await backend.version()
    except Exception as exc:  # a backend that cannot tell its version still benchmarks
        version = f"unknown ({type(exc).__name__})"
    described: dict[str, Any] = {}
    for model in models:
        try:
            info = await backend.show(model)
        except Exception as exc:
            described[model] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        described[model] = {"context_length": info.context_length, "family": info.family,
                            "parameter_size": info.parameter_size, "quantization": info.quantization}
    return facts | {"backend": backend.name, "engine_version": version, "models": described}
