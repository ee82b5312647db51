"""The documentation stays true to the code: every setting is described, docs/settings.md is the page the
``Settings`` fields generate, the README stays a short guide, and every relative link points at a file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from obatch.config import Settings, settings_markdown

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250
LINE_MAX = 120  # prose lines; table rows may run longer

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_every_setting_has_a_description() -> None:
    missing = [name for name, field in Settings.model_fields.items() if not (field.description or "").strip()]
    assert not missing, f"Settings fields without a description: {missing}"


def test_settings_page_is_generated_from_the_fields() -> None:
    page = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    regenerate = "python -m obatch.config --markdown > docs/settings.md"
    assert page == settings_markdown(), f"docs/settings.md is stale: {regenerate}"
    for name in Settings.model_fields:
        assert f"`OBATCH_{name.upper()}`" in page


def test_the_generator_runs_as_a_module() -> None:
    out = subprocess.run([sys.executable, "-m", "obatch.config", "--markdown"], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert out == settings_markdown()


def test_readme_is_a_short_guide() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"
    opening = "\n".join(lines[:40])
    assert "make demo" in opening and "make test" in opening, "the two commands come first"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_prose_lines_stay_short(page: Path) -> None:
    lines = page.read_text(encoding="utf-8").splitlines()
    long = [n for n, line in enumerate(lines, 1) if len(line) > LINE_MAX and not line.startswith("|")]
    assert not long, f"{page.relative_to(ROOT)}: lines over {LINE_MAX} characters: {long}"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    headings = re.findall(r"^#+\s+(.+?)\s*$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # code blocks hold no links
    return [target for target in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(page: Path) -> None:
    assert page.exists(), f"{page.relative_to(ROOT)} is missing"
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists() or (anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved)):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to missing files or headings: {broken}"
