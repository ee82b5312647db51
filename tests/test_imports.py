"""The core imports no web or UI framework and creates nothing at import time."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CHECK = """
import sys, obatch, obatch.batches, obatch.runner, obatch.worker, obatch.backends.ollama, obatch.backends.openai
import obatch.backends.local, obatch.store.repo, obatch.jsonl, obatch.context, obatch.api, obatch.cli
loaded = sorted(m for m in ("litestar", "streamlit", "uvicorn") if m in sys.modules)
print(",".join(loaded) or "clean")
"""


def test_core_imports_no_web_or_ui_framework(tmp_path: object) -> None:
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True,
                            cwd=str(tmp_path))
    assert result.stdout.strip() == "clean"


def test_public_api() -> None:
    import obatch

    assert set(obatch.__all__) >= {"run", "run_sync", "run_batch_file", "Settings", "results_frame"}
    assert all(hasattr(obatch, name) for name in obatch.__all__)


def test_a_command_line_starts_without_the_heavy_libraries(tmp_path: object) -> None:
    """`obatch run` pays only for what it uses: frames (polars), migrations (alembic, when the schema is current),
    httpx and the web/UI frameworks load on demand."""
    check = ("import sys, obatch.cli, obatch.api, obatch.batches; obatch.cli._parser()\n"
             "print(','.join(sorted(m for m in ('polars', 'alembic', 'httpx', 'altair', 'litestar') "
             "if m in sys.modules)) or 'lean')")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True,
                            cwd=str(tmp_path))
    assert result.stdout.strip() == "lean"


def test_the_batch_lifecycle_imports_nothing_from_the_benchmarks(tmp_path: object) -> None:
    """The core does not depend on the analytics: the estimator reaches ``obatch.batches`` as an injected hook
    (``Services.estimator``), never as an import, so ``obatch.bench`` may import the core and not the reverse."""
    import obatch.batches

    for module in Path(obatch.batches.__file__).parent.glob("*.py"):
        tree = ast.parse(module.read_text())
        imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in imported if m.startswith("obatch.bench")], module.name
    check = ("import sys, obatch.batches\n"
             "print(','.join(sorted(m for m in sys.modules if m.startswith('obatch.bench'))) or 'clean')")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True,
                            cwd=str(tmp_path))
    assert result.stdout.strip() == "clean"


def test_the_servers_batch_process_loads_no_web_framework(tmp_path: object) -> None:
    """The batch process drives engines and the store only: every library it loads without need is memory
    the server's pair of processes holds for nothing (Litestar alone is about 40 MB)."""
    check = ("import sys, obatch.server.batchproc\n"
             "print(','.join(sorted(m for m in ('litestar', 'uvicorn', 'streamlit') if m in sys.modules)) or 'clean')")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True,
                            cwd=str(tmp_path))
    assert result.stdout.strip() == "clean"


# What a session does that reads or writes the database (commit and rollback close a transaction the caller owns).
SESSION_QUERIES = frozenset({"execute", "exec", "scalar", "scalars", "stream", "get", "add", "add_all", "delete",
                             "merge", "refresh", "connection"})


def sql_outside_the_store(source: str) -> list[str]:
    """The SQL a module's source builds or runs itself: any import from SQLAlchemy or SQLModel but the session's type
    (for annotations), and, in a module that uses the store, any query run on a session."""
    tree = ast.parse(source)
    found: list[str] = []
    uses_store = False
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            uses_store |= node.module.startswith("obatch.store")
            if node.module.split(".")[0] in ("sqlalchemy", "sqlmodel"):
                found += [f"from {node.module} import {a.name}" for a in node.names
                          if (node.module, a.name) != ("sqlalchemy.ext.asyncio", "AsyncSession")]
        elif isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in ("sqlalchemy", "sqlmodel")]
            uses_store |= any(a.name.startswith("obatch.store") for a in node.names)
    if uses_store:
        calls = [n.func for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
        calls.sort(key=lambda f: f.lineno)
        found += [f"line {f.lineno}: session.{f.attr}()" for f in calls
                  if isinstance(f.value, ast.Name) and f.value.id == "session" and f.attr in SESSION_QUERIES]
    return found


def test_sql_is_found_where_it_is_written() -> None:
    """The check below sees a query built by hand, one run on a session, and lets a type annotation pass."""
    assert sql_outside_the_store("from sqlalchemy import select, func\n") == [
        "from sqlalchemy import select", "from sqlalchemy import func"]
    assert sql_outside_the_store("import sqlmodel\n") == ["import sqlmodel"]
    run = ("from obatch.store import repo\nasync def f(session):\n    await session.execute(q)\n"
           "    session.add(row)\n    await session.commit()\n")
    assert sql_outside_the_store(run) == ["line 3: session.execute()", "line 4: session.add()"]
    assert sql_outside_the_store("from sqlalchemy.ext.asyncio import AsyncSession\n") == []
    assert sql_outside_the_store("async def f(session):\n    await session.get(url)\n") == []  # an HTTP session


def test_every_query_is_in_the_store() -> None:
    """``obatch.store`` holds every query: the rest of obatch calls its repository functions and builds no SQL, so a
    query's cost and its guarantees (a row takes a result only while pending, leases) are read in one place."""
    import obatch

    root = Path(obatch.__file__).parent
    found = {}
    for module in sorted(root.rglob("*.py")):
        name = module.relative_to(root).as_posix()
        if name.startswith("store/"):
            continue
        if uses := sql_outside_the_store(module.read_text()):
            found[name] = uses
    assert found == {}
