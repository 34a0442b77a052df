# esmfold-peft: `make demo` and `make test` are the README's two commands; both set up first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.esmfold-peft-setup

.PHONY: setup demo test test-fast bench clean-venv

setup: $(STAMP)

# Re-runs only when the dependency recipe changed; tools/setup.sh is itself idempotent.
$(STAMP): pyproject.toml tools/setup.sh
	VENV=$(VENV) bash tools/setup.sh
	touch $@

demo: setup
	$(PY) scripts/train_fold.py --config demo --adapter lorta --rank 8

test: setup
	$(PY) -m pytest -q --durations=10

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) bench/run_all.py

clean-venv:
	rm -rf $(VENV)
