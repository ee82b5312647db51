"""The notebook API in a real Jupyter kernel: ``await obatch.run(...)`` and ``run_sync`` inside a running loop."""

from __future__ import annotations

from pathlib import Path

import nbformat
import papermill

from obatch.testing.ollama_sim import SimConfig, run_in_thread
from tests.helpers import ROOT


def test_quickstart_notebook_runs_in_a_kernel(tmp_path: Path) -> None:
    url, stop = run_in_thread(SimConfig(num_parallel=2))
    out = tmp_path / "quickstart.ipynb"
    try:
        papermill.execute_notebook(
            str(ROOT / "notebooks" / "quickstart.ipynb"), str(out), kernel_name="python3",
            cwd=str(ROOT / "notebooks"), progress_bar=False,
            parameters={"backend": "ollama", "ollama_url": url, "model": "llama3.2:1b",
                        "data_dir": str(tmp_path / "data"), "concurrency": 2},
        )
    finally:
        stop()
    notebook = nbformat.read(out, as_version=4)
    outputs = {i: cell.get("outputs", []) for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"}
    texts = [o["data"]["text/plain"] for cell in outputs.values() for o in cell if o.output_type == "execute_result"]
    awaited, synced = texts[-2], texts[-1]
    assert "shape: (3, 6)" in awaited and awaited.count("succeeded") == 3
    assert "shape: (1, 2)" in synced and "│ succeeded ┆ 8 " in synced
