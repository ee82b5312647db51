"""Benchmarks (the page ships in the package: obatch/ui/pages/benchmarks.py)."""

from obatch.ui.app import run_page

run_page("benchmarks")
