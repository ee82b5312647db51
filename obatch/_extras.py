"""Optional features and the extra that installs each: the one place an absent dependency becomes a sentence.

``pip install obatch`` is the notebook API and CLI against Ollama or an OpenAI-compatible engine. The embedded
engine, the server, the UI and the notebooks each come with an extra (``obatch[local]`` ...). Each entry point of
such a feature calls ``require`` before importing its dependencies, so a missing one is reported as
``MissingExtraError`` (the CLI prints it as one line) instead of an ``ImportError`` from deep inside.
"""

from __future__ import annotations

import importlib.util

from obatch.errors import MissingExtraError

EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "local": ("The embedded llama.cpp engine", ("xllamacpp", "gguf")),
    "server": ("obatch serve", ("litestar", "uvicorn", "multipart", "prometheus_client")),
    "ui": ("The UI", ("streamlit", "altair")),
    "notebooks": ("Notebooks and charts", ("papermill", "ipykernel", "altair")),
}
"""extra → (the feature, as a sentence's subject; the top-level modules it installs)."""


def require(extra: str, *modules: str) -> None:
    """Raise ``MissingExtraError`` unless ``modules`` (default: all of the extra's) can be imported.

    Looks modules up without importing them, so a check costs a path search, not an import."""
    feature, known = EXTRAS[extra]
    missing = [m for m in modules or known if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(extra, missing, feature)
