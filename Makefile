# Backdooring Diffusion Models: the two commands of the README.
#
#   make book   create .venv if missing, install everything, execute every chapter in quick mode
#               and write the HTML book to _build/html (Sphinx warnings are errors)
#   make test   unit tests, the book built as `make book` builds it (every chapter executed; a cell
#               that raises fails the build) and checked in headless Chromium (installs Debian's
#               chromium with apt when it is missing), every chapter's full mode at a smoke scale,
#               then the small benchmarks (benchmarks/run.py: speed ratios, memory, the chapters'
#               times in this build, the models trained), written to _build/benchmarks/small.json
#
#               `make test` starts with `make lint` (ruff and committed notebooks without outputs).
#
# Other targets: make test-fast (the tests not marked slow: about a minute, while editing),
# make lint (ruff check, ruff format --check, nbstripout --verify), make format (fix what lint
# reports), make nbval (every chapter executed once more under nbval, e.g. `make nbval
# NOTEBOOKS=book/04_measuring_the_backdoor.ipynb`), make lock (record the resolved versions),
# make clean. `pre-commit install` runs ruff and nbstripout on every commit
# (.pre-commit-config.yaml).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Versions resolved on the reference machine (Python 3.11, Linux x86_64). `make book CONSTRAINTS=`
# resolves afresh, e.g. on another Python or operating system.
CONSTRAINTS ?= requirements/lock.txt
PIP_CONSTRAINTS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

# Without an NVIDIA GPU, take PyTorch's CPU build (about 200 MB) instead of the default CUDA build
# (several GB). Override with `make book TORCH_INDEX=` (default index) or another wheel index.
HAS_NVIDIA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
ifeq ($(HAS_NVIDIA),yes)
TORCH_INDEX ?=
else
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
endif

# Quick mode never downloads: keep the Hugging Face hub offline so that any attempt fails loudly.
export HF_HUB_OFFLINE ?= 1
export PYDEVD_DISABLE_FILE_VALIDATION ?= 1

STAMP := $(VENV)/.installed

# Executed chapters are cached in _build/.jupyter_cache (`execute_notebooks: cache`), so the book that
# `make test` builds and checks is reused by `make book` without running the chapters again. The
# cache keys on the notebooks' code only: empty it whenever the library or the pinned versions change.
JUPYTER_CACHE := _build/.jupyter_cache
CORE_STAMP := _build/.core-stamp
CORE_FILES := $(shell find baddiff_core -type f -not -path '*/__pycache__/*' -not -name '*.pyc') pyproject.toml $(CONSTRAINTS)

# The browser test (tests/test_book_in_browser.py) opens the built book in this headless Chromium.
export CHROMIUM ?= chromium

.PHONY: book test test-fast lint format nbval venv lock strip clean browser

venv: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python >= 3.10 is needed, found " + sys.version.split()[0])'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --retries 2 $(PIP_CONSTRAINTS) torch $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install $(PIP_CONSTRAINTS) -e ".[book,test]"
	touch $@

book: $(STAMP) $(CORE_STAMP)
	$(BIN)/jupyter-book build . --all --warningiserror --keep-going
	@echo "The book is in _build/html/index.html"

# The chapters run once, in the browser test's build of the book: nbval would execute the same code
# again with the same check (no cell raises; the notebooks mark no output to compare), 8 to 15 minutes.
# Full mode's smoke runs (tests/test_full_mode.py) are a dozen small kernels: two at once, one
# thread each, take half the time of one after the other. --durations prints the slowest tests,
# the first thing to read when CI's time grows.
test: $(STAMP) $(CORE_STAMP) lint browser
	$(BIN)/python -m pytest tests --ignore=tests/test_full_mode.py --durations=15
	$(BIN)/python -m pytest -n 2 tests/test_full_mode.py --durations=15
	$(BIN)/python benchmarks/run.py --size small --book $(JUPYTER_CACHE) --models --output _build/benchmarks/small.json

$(CORE_STAMP): $(CORE_FILES)
	rm -rf $(JUPYTER_CACHE)
	@mkdir -p $(@D) && touch $@

# Debian's chromium, installed with apt (as root, or through sudo) when it is not on PATH.
browser:
	@command -v $(CHROMIUM) >/dev/null 2>&1 || { \
	  echo "Installing Debian's chromium for tests/test_book_in_browser.py"; \
	  if [ "$$(id -u)" = 0 ]; then sudo=; elif command -v sudo >/dev/null 2>&1; then sudo=sudo; else sudo=none; fi; \
	  { [ "$$sudo" != none ] && command -v apt-get >/dev/null 2>&1 \
	    && $$sudo apt-get update \
	    && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium \
	    && command -v $(CHROMIUM) >/dev/null 2>&1; } \
	  || { echo "make test needs a headless Chromium for tests/test_book_in_browser.py and could not install it." >&2; \
	       echo "Install Debian's package as root (apt-get install chromium), or set CHROMIUM=/path/to/chromium." >&2; \
	       exit 1; }; }

# The loop while editing: every test not marked slow (no book build, no chapter, no real training run;
# about a minute on 2 cores). `make test` stays the complete check.
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow" -q

NOTEBOOKS ?= book
nbval: $(STAMP)
	$(BIN)/python -m pytest $(NOTEBOOKS) --nbval-lax --nbval-current-env

lock: $(STAMP)
	@{ echo "# Versions resolved by 'make venv' on Python 3.11, Linux x86_64 (make lock writes this file)."; \
	   echo "# Used as pip constraints by the Makefile; torch's local '+cpu' label is dropped so GPU builds match."; \
	   $(BIN)/python -m pip freeze --exclude-editable | sed -E 's/\+cpu$$//' | grep -v -i '^baddiff[-_]core'; } > $(CONSTRAINTS)
	@echo "wrote $(CONSTRAINTS)"

# ruff (settings in pyproject.toml) and nbstripout, as .pre-commit-config.yaml runs them. The chapters
# are committed without outputs, execution counts or papermill's records; their cell ids stay.
NOTEBOOK_FILES := book/*.ipynb
NBSTRIPOUT := $(BIN)/nbstripout --keep-id --extra-keys "metadata.papermill cell.metadata.papermill cell.metadata.execution"
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(NBSTRIPOUT) --verify $(NOTEBOOK_FILES)

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	$(NBSTRIPOUT) $(NOTEBOOK_FILES)

strip: $(STAMP)
	$(NBSTRIPOUT) $(NOTEBOOK_FILES)

clean:
	rm -rf _build
