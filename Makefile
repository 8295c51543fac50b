# ubw-book: `make book` builds the book on the profile chosen for this machine (`ubw profile`), `make test` runs every test.
# Both create .venv when missing, install the pinned dependencies and ubwlib (editable) and make sure
# Fashion-MNIST is there; a second run skips what is done.

PYTHON ?= python3
VENV ?= .venv
# auto: the profile chosen for this machine by its measured speed (ubw profile; UBW_PROFILE=default make book forces one)
PROFILE ?= $(if $(UBW_PROFILE),$(UBW_PROFILE),auto)
BIN := $(VENV)/bin
STAMP := $(VENV)/.ubw-installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: book test runs results bench study install data clean-book clean-cache help

help:
	@echo "make book      build the book (HTML in book/_build/html) on the profile chosen for this machine (ubw profile)"
	@echo "               [JOBS=auto|N] chapters executed at a time (auto: the CPU cores)"
	@echo "make test      run every test, including the chapters with smoke parameters (nbval)"
	@echo "make runs PROFILE=smoke|default|lite|paper  execute every chapter with papermill into book/_build/runs/<profile>/"
	@echo "make results PROFILE=full [CHAPTERS=\"ubw_p ubw_c\"] [VIA=recipes]   store every table of the chapters in results/<profile>/"
	@echo "make bench     print the trainer's images/s against a plain PyTorch loop"
	@echo "make study     recompute the UBW-C recipe study (cached, resumable) and store it in results/study/"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# PyPI's torch wheel brings about 4 GB of CUDA libraries even on a CPU machine: the whole .venv is about 6 GB.
NEED_GB ?= 7

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	@avail=$$(df -Pk "$(dir $(abspath $(VENV)))" | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ "$$avail" -lt "$(NEED_GB)" ] && ! ls -d $(VENV)/lib/python*/site-packages/torch >/dev/null 2>&1; then \
		echo "Not enough disk space to install: $(VENV) needs about $(NEED_GB) GB free (torch with its CUDA libraries), $$avail GB are free on $(dir $(abspath $(VENV)))."; \
		echo "Free some space (old clones or virtual environments, 'pip cache purge') or put the environment elsewhere: make VENV=/bigger/disk/venv ..."; \
		exit 1; \
	fi
	$(BIN)/python -m pip install --no-cache-dir --upgrade -c constraints.txt pip
	$(BIN)/python -m pip install --no-cache-dir -c constraints.txt -e ".[book,test,owner]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (ubw-book)" >/dev/null
	touch $@

install: $(STAMP)

# Fashion-MNIST: found via $UBW_DATA or Debian's dataset-fashion-mnist; installed with apt when possible.
data: install
	@if $(BIN)/ubw data fashion-mnist --check >/dev/null 2>&1; then \
		echo "Fashion-MNIST: found"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = "0" ]; then \
		echo "Fashion-MNIST: installing Debian's dataset-fashion-mnist"; \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) && \
		$(BIN)/ubw data fashion-mnist --check; \
	elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		echo "Fashion-MNIST: installing Debian's dataset-fashion-mnist with sudo"; \
		(sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist)) && \
		$(BIN)/ubw data fashion-mnist --check; \
	else \
		$(BIN)/ubw data fashion-mnist --check; \
		echo "Fashion-MNIST is missing and apt-get cannot be used here. Provide it in one of three ways:"; \
		echo "  1. sudo apt-get install dataset-fashion-mnist   (Debian/Ubuntu; files go to $(FMNIST_DIR))"; \
		echo "  2. export UBW_DATA=/path/to/folder-with-the-four-idx-files"; \
		echo "  3. $(BIN)/ubw data fashion-mnist --download     (needs internet)"; \
		exit 1; \
	fi

# jupyter-book build -W --keep-going book/, with JOBS chapters executed at a time (auto: the CPU cores); their
# computations still run one at a time (the cache's lock), so only kernels' start-up and imports overlap
JOBS ?= auto
book: data
	UBW_PROFILE=$(PROFILE) TQDM_DISABLE=1 $(BIN)/python -m ubwlib.book --html --jobs $(JOBS)
	@echo "HTML: book/_build/html/index.html"

test: data
	$(BIN)/python -m pytest --nbval --nbval-current-env

runs: data
	$(BIN)/python -m ubwlib.book --profile $(PROFILE)

# Stored results (issue 12): every table the chapters compute, with provenance, under results/<profile>/; the book
# shows them beside the paper's numbers and the live ones. VIA=recipes needs no Jupyter (e.g. on a GPU machine).
CHAPTERS ?=
VIA ?= papermill
results: data
	TQDM_DISABLE=1 $(BIN)/python -m ubwlib.book --store --via $(VIA) --profile $(PROFILE) $(CHAPTERS)

bench: data
	$(BIN)/python -m ubwlib.bench

# The UBW-C recipe study (issue 9): about two hours on 2 CPU cores (its trigger-learnability check alone 21 minutes);
# every release and victim is cached, so an interrupted run resumes. The stored table (results/study/) is what the book shows.
# ROWS="row; row; ..." computes (and stores) those rows only, in that order.
ROWS ?=
study: data
	TQDM_DISABLE=1 $(BIN)/python -m ubwlib.experiments.study --profile study $(if $(ROWS),--rows "$(ROWS)")

clean-book:
	rm -rf book/_build

clean-cache: install
	$(BIN)/ubw cache clear
