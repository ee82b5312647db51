"""Batches (the page ships in the package: obatch/ui/pages/batches.py)."""

from obatch.ui.app import run_page

run_page("batches")
