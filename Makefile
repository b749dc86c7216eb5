# Two commands set up everything on a fresh machine: `make chat` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# A CPU build of this torch lies on the CI machines' disk; pinning it here keeps a
# fresh install fast. pyproject.toml itself asks only for a range.
TORCH  ?= torch==2.13.0

.PHONY: chat test test-gpu test-mps bench clean

# The example sampler plugin is installed as a real (non-editable) distribution, as a
# user would install it; the tests check it through `quill`. Editing it reinstalls it.
EXAMPLE_PLUGIN := examples/quill-xtc

$(VENV)/.installed: pyproject.toml $(EXAMPLE_PLUGIN)/pyproject.toml $(EXAMPLE_PLUGIN)/quill_xtc.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[test,interop]"
	$(PIP) install --quiet --no-deps --no-build-isolation ./$(EXAMPLE_PLUGIN)
	@touch $@

# The full-screen chat on the shipped Shakespeare model (the plain REPL when not on a terminal).
chat: $(VENV)/.installed
	@$(VENV)/bin/quill chat

# One test worker per core; a module stays on one worker, so its shared fixtures are built once.
test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto --dist loadscope

# The device lanes: tests marked `cuda` (or `mps`) run on that device and skip elsewhere.
# `make test` runs them too; these run only them. In an environment that already has a
# GPU build of torch and the test extras: make test-gpu PY=python3 SETUP=
SETUP ?= $(VENV)/.installed
test-gpu: $(SETUP)
	$(PY) -m pytest -q -rs -m cuda

test-mps: $(SETUP)
	$(PY) -m pytest -q -rs -m mps

bench: $(VENV)/.installed
	$(PY) benchmarks/tokenizer_bench.py
	$(PY) benchmarks/generate_bench.py
	$(PY) benchmarks/quality_bench.py
	$(PY) benchmarks/interop_bench.py
	$(PY) benchmarks/chat_bench.py --profile shakespeare-char
	$(PY) benchmarks/tui_bench.py
	$(PY) benchmarks/sessions_bench.py
	$(PY) benchmarks/finetune_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
