# Two commands: `make demo` and `make test` (ruff, the lock check, the test suite, then every notebook top to bottom).
# Both create .venv on first use and install exactly the versions in requirements/ (`make lock` rewrites them).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements/lock.txt
LOCK_DEV := requirements/lock-dev.txt
# The locks pin the CPU build of torch (2.13.0+cpu), which lives on PyTorch's own index, not on PyPI. Where pip
# already has a local wheel folder (PIP_FIND_LINKS) it is found there; otherwise that index is added. Behind a
# mirror, set PIP_ARGS yourself (e.g. PIP_ARGS="--index-url URL --extra-index-url TORCH_URL").
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PIP_ARGS ?= $(if $(PIP_FIND_LINKS),,--extra-index-url $(TORCH_INDEX))
# `make lock` resolves for Python 3.11 on Linux x86-64, with the same torch source as the install.
UV_SPEC ?= uv==0.13.9
LOCK_ARGS ?=
UV_TORCH_ARGS ?= $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS),--extra-index-url $(TORCH_INDEX) --index-strategy unsafe-best-match)
UV_COMPILE = $(BIN)/uv pip compile pyproject.toml -c requirements/constraints.txt --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --generate-hashes --custom-compile-command "make lock" $(UV_TORCH_ARGS) $(LOCK_ARGS)

.PHONY: demo test lint lock check-lock clean-venv bench-peers browser-deps bench-peers

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# --no-deps on the package itself: every dependency comes from the lock, hash-checked.
$(VENV)/.installed: $(BIN)/activate $(LOCK)
	$(BIN)/python -m pip install --quiet $(PIP_ARGS) -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed $(LOCK_DEV)
	$(BIN)/python -m pip install --quiet $(PIP_ARGS) -r $(LOCK_DEV)
	touch $@

demo: $(VENV)/.installed
	$(BIN)/vpd demo

check-lock: $(VENV)/.installed-dev
	$(BIN)/python requirements/check_lock.py $(LOCK)
	$(BIN)/python requirements/check_lock.py $(LOCK_DEV) --extra dev

test: $(VENV)/.installed-dev check-lock
	$(BIN)/ruff check .
	$(MAKE) --no-print-directory browser-deps
	$(BIN)/python -m pytest
	$(BIN)/python -m pytest --nbmake --nbmake-timeout=1200 notebooks

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Rewrites both locks from pyproject.toml, keeping today's pins where they still fit; LOCK_ARGS=--upgrade takes
# the newest releases the ranges allow. The runtime lock is resolved inside the dev lock, so the two agree.
lock: $(BIN)/activate
	$(BIN)/python -m pip install --quiet "$(UV_SPEC)"
	$(UV_COMPILE) --extra dev -o $(LOCK_DEV)
	$(UV_COMPILE) -c $(LOCK_DEV) -o $(LOCK)

clean-venv:
	rm -rf $(VENV)

# circuit-tracer 0.5.0 in its own environment (never a dependency of the package): its graph-file model checks
# our export, then both build graphs side by side (benchmarks/peers/README.md). About 13 CPU minutes, nearly all
# circuit-tracer's.
PEERS := benchmarks/peers/.venv
$(PEERS)/.installed: benchmarks/peers/requirements.txt
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet $(PIP_ARGS) -r benchmarks/peers/requirements.txt
	touch $@

bench-peers: $(VENV)/.installed $(PEERS)/.installed
	$(PEERS)/bin/python benchmarks/peers/validate_export.py
	$(BIN)/python benchmarks/peers/compare.py

# The browser tests drive Debian's chromium through chromedriver; apt installs both when missing
# (directly as root, else through sudo).
browser-deps:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; \
	fi
