"""``obatch ui``: find ``streamlit_app.py`` and run it with Streamlit, bound to loopback by default.

The app lives at the repository root next to ``pages/`` (the user's layout), not inside the package, so it is
looked for in: ``$OBATCH_UI_APP``, the working directory, then the directory above the installed package (a
checkout or an editable install). A wheel install without a checkout gets a clear error instead.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from obatch import errors

APP_NAME = "streamlit_app.py"


def find_app(env: Mapping[str, str] | None = None, cwd: Path | None = None, checkout: Path | None = None
             ) -> Path:
    """The Streamlit entry script, or ``ConfigError`` saying where it was looked for.

    ``checkout`` is the folder above the ``obatch`` package (found from this file unless given)."""
    env = os.environ if env is None else env
    candidates: list[Path] = []
    if env.get("OBATCH_UI_APP"):
        candidates.append(Path(env["OBATCH_UI_APP"]))
    candidates.append((cwd or Path.cwd()) / APP_NAME)
    candidates.append((checkout or Path(__file__).resolve().parents[2]) / APP_NAME)
    for path in candidates:
        if path.is_file():
            return path.resolve()
    looked = ", ".join(str(p) for p in candidates)
    raise errors.ConfigError(
        f"Cannot find the UI ({APP_NAME}); looked in: {looked}. Run `obatch ui` from an obatch checkout "
        "(the folder with streamlit_app.py and pages/) or set OBATCH_UI_APP to the script's path.")


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
