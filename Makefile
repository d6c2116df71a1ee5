# MoE-Lens developer entry points. `make run` and `make test` work from a fresh clone.

PYTHON ?= python3
VENV ?= .venv
TORCH_PIN := torch==2.13.0

VENV_PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.moe-lens-installed

.PHONY: venv system-deps test run proto clean distclean

venv: $(VENV_STAMP)

# torch goes in first and pinned: anything that later asks for "torch" is then satisfied,
# where an unpinned resolve would fetch a multi-GB CUDA build.
$(VENV_STAMP): pyproject.toml Makefile
	test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install -q $(TORCH_PIN)
	$(VENV_PY) -m pip install -q -e '.[test]'
	touch $@

# The generated modules (moelens/v1/) are committed; a test fails when they are stale.
proto: venv
	$(VENV_PY) -m moelens.protogen

# Debian's prometheus (promtool, the integration test's server) and docker-compose (validates
# compose.yaml); idempotent.
system-deps:
	bash scripts/install_system_deps.sh

test: venv system-deps
	$(VENV)/bin/pytest -q --durations=15

run: venv
	mkdir -p out
	$(VENV)/bin/moe-lens generate --model default --input examples/prompts.jsonl \
		--output out/generations.jsonl

# Peer comparison (slow: builds llama.cpp, starts vLLM; never part of `make test`).
# `make bench-peers PEERS="hf ours"` runs a subset; results in bench/results/.
bench-peers: venv
	bash bench/peers/run_all.sh $(PEERS)

clean:
	rm -rf build out .pytest_cache *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
