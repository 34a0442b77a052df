# esmfold-peft: `make demo` and `make test` are the README's two commands; both set up first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.esmfold-peft-setup

.PHONY: setup demo demo-nlp test test-fast bench bench-memory bench-gpu clean-venv

setup: $(STAMP)

# Re-runs only when the dependency recipe changed; tools/setup.sh is itself idempotent.
$(STAMP): pyproject.toml tools/setup.sh
	VENV=$(VENV) bash tools/setup.sh
	touch $@

demo: setup
	$(PY) scripts/train_fold.py --config demo --adapter lorta --rank 8

# The NLP harness on its offline defaults: classification (head only, then LoRTA r=4), instruction tuning, DPO.
NLP_DEMO ?= runs/demo-nlp-$(shell date +%Y%m%d-%H%M%S)

demo-nlp: setup
	$(PY) scripts/train_nlp.py --task rt-polarity --adapter none --out $(NLP_DEMO)/classify-head-only --no-progress
	$(PY) scripts/train_nlp.py --task rt-polarity --adapter lorta --rank 4 --out $(NLP_DEMO)/classify-lorta-r4
	$(PY) scripts/train_nlp.py --task alpaca --adapter lorta --rank 4 --out $(NLP_DEMO)/alpaca-lorta-r4
	$(PY) scripts/train_nlp.py --task dpo --adapter lorta --rank 4 --out $(NLP_DEMO)/dpo-lorta-r4
	@echo "NLP demo results: $(NLP_DEMO)/*/summary.json, curves in */training_curves.png, generations in $(NLP_DEMO)/alpaca-lorta-r4/generations.jsonl; docs/nlp.md explains them"

test: setup
	$(PY) -m pytest -q --durations=10

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) bench/run_all.py

# prediction memory per saving at 256-1,024 residues (about 15 min on 2 CPU cores), then BENCHMARKS.md again
bench-memory: setup
	$(PY) bench/predict_memory.py
	$(PY) bench/report.py

# the real-scale suite on one H100/H200 (no set-up: GPU machines here have no network; bring the venv)
bench-gpu:
	$(PY) bench/gpu_suite.py --device cuda

clean-venv:
	rm -rf $(VENV)
