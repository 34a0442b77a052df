# esmfold-peft: `make demo` and `make test` are the README's two commands; both set up first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.esmfold-peft-setup

.PHONY: setup demo demo-nlp demo-finetune test test-fast bench bench-memory bench-long bench-nlp bench-mixed bench-routing bench-gpu clean-venv

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

# the fine-tuning recipe on CPU: a small ESMFold trained here, exported in fair-esm's format, fine-tuned with
# LoRTA on a distant synthetic family (sequences it never saw), scored before and after, confidence heads frozen and trained (docs/finetune.md); ~30 min
demo-finetune: setup
	$(PY) scripts/demo_finetune.py

# the demo data (TS50, ESM-2 8M) some tests read is fetched first, as set-up (idempotent, instant once there)
test: setup
	$(PY) scripts/fetch_demo_data.py --quiet
	$(PY) -m pytest -q --durations=10

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) bench/run_all.py

# prediction memory per saving at 256-1,024 residues (about 15 min on 2 CPU cores), then BENCHMARKS.md again
bench-memory: setup
	$(PY) bench/predict_memory.py
	$(PY) bench/report.py

# long sequences at full size (hours on 2 CPU cores): ESM-2 attention SDPA against the original at 256-2,048
# residues (35M, 650M), and prediction with all 12 paper_d4 trunk blocks at 256-1,024 (checks bench-memory's estimate)
bench-long: setup
	$(PY) bench/esm_attention.py
	$(PY) bench/predict_memory.py --lengths 256,512,1024 --variants all --blocks-run 0 --cell-timeout 7200
	$(PY) bench/report.py

# our LoRA/LoRTA against Hugging Face PEFT's LoRA on MiniLM, MPNet and SmolLM2 shapes, and the DPO reference's
# memory (about 30 min on 2 CPU cores); peft is installed for this benchmark only, never a dependency
PEFT_SPEC ?= peft==0.21.2
bench-nlp: setup
	$(PY) -m pip install -q --disable-pip-version-check "$(PEFT_SPEC)"
	$(PY) bench/nlp_adapter_step.py
	$(PY) bench/nlp_dpo_reference.py
	$(PY) bench/report.py

# many adapters, one model: mixed-adapter batches of 1-512 distinct adapters against one adapter (merged and
# unmerged), the split-by-adapter fallback and PEFT's mixed LoRA (peft from the test extra; left out with a note
# when missing), and resident bytes per adapter (327 s measured on 2 CPU cores), then BENCHMARKS.md again
bench-mixed: setup
	$(PY) bench/mixed_adapters.py
	$(PY) bench/report.py

# routing records to adapters on the fine-tuning demonstration with a clade as the new family (1,617 s measured on 2
# CPU cores; the demonstration's finished stages are read, not rerun), then BENCHMARKS.md again
bench-routing: setup
	$(PY) bench/routing_demo.py
	$(PY) bench/report.py

# the real-scale suite on one H100/H200 (no set-up: GPU machines here have no network; bring the venv), then the
# mixed-adapter cells on the GPU (all 12 layers of the 35M shape, 512 records x 128 tokens, bf16; its own JSON)
bench-gpu:
	$(PY) bench/gpu_suite.py --device cuda
	$(PY) bench/mixed_adapters.py --device cuda

clean-venv:
	rm -rf $(VENV)
