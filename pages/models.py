"""Models / backend (the page ships in the package: obatch/ui/pages/models.py)."""

from obatch.ui.app import run_page

run_page("models")
