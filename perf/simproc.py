"""The Ollama simulator as a child process for the benchmark scripts (so its CPU is not the measured client's)."""

from __future__ import annotations

import re
import subprocess
import sys


def start_sim(*options: str) -> tuple[subprocess.Popen[str], str]:
    """Start `python -m obatch.testing.ollama_sim --port 0 OPTIONS...`; returns (process, base URL).

    Without options it is an instant engine that never pushes back: 64 slots, a queue of 4,096."""
    args = list(options) or ["--num-parallel", "64", "--max-queue", "4096"]
    sim = subprocess.Popen([sys.executable, "-m", "obatch.testing.ollama_sim", "--port", "0", *args],
                           stdout=subprocess.PIPE, text=True)
    assert sim.stdout is not None
    line = sim.stdout.readline()
    match = re.search(r"(http://\S+)", line)
    if not match:
        raise SystemExit(f"the simulator did not start: {line!r}")
    return sim, match.group(1)
