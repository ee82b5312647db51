"""``obatch ui``: run the packaged Streamlit app (``obatch/ui/app.py``) with Streamlit, bound to loopback by default.

The app and its pages ship in the package, so a wheel install runs the same UI as a checkout. Streamlit runs in
the app's folder, where it reads ``.streamlit/config.toml`` (the developer menu hidden). ``$OBATCH_UI_APP`` runs
another script instead (a user's own layout).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from obatch import errors

APP = Path(__file__).resolve().parent / "app.py"


def find_app(env: Mapping[str, str] | None = None) -> Path:
    """The Streamlit entry script: ``$OBATCH_UI_APP`` when set (``ConfigError`` if it is not a file), else the
    packaged app."""
    env = os.environ if env is None else env
    if not env.get("OBATCH_UI_APP"):
        return APP
    path = Path(env["OBATCH_UI_APP"])
    if not path.is_file():
        raise errors.ConfigError(f"OBATCH_UI_APP names {path}, which is not a file; unset it to run obatch's UI.")
    return path.resolve()


def streamlit_command(app: Path, *, host: str = "127.0.0.1", port: int = 8501, headless: bool = True
                      ) -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", host, "--server.port", str(port),
            "--server.headless", "true" if headless else "false", "--browser.gatherUsageStats", "false"]


async def run_ui(*, host: str = "127.0.0.1", port: int = 8501, server_url: str | None = None,
                 headless: bool = True) -> int:
    """Run Streamlit until it exits (Ctrl-C reaches it too); its exit status is ours."""
    app = find_app()
    env = dict(os.environ)
    if server_url:
        env["OBATCH_SERVER_URL"] = server_url
    print(f"obatch UI on http://{host}:{port} (server: {env.get('OBATCH_SERVER_URL', 'http://127.0.0.1:8000')})",
          flush=True)
    process = await asyncio.create_subprocess_exec(*streamlit_command(app, host=host, port=port, headless=headless),
                                                   cwd=str(app.parent), env=env)
    try:
        return await process.wait()
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()
