#!/usr/bin/env bash
# Idempotent set-up of the project's virtual environment (called by `make setup`).
#   torch first and pinned (a torch already in the venv, e.g. a user's CUDA build, is kept),
#   then the project and its plain dependencies, then openfold and fair-esm by their recipes
#   (see ../shared/ENVIRONMENT.md in the team's notes, summarised in the README).
set -euo pipefail

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
OPENFOLD_SPEC=${OPENFOLD_SPEC:-openfold==0.0.1}
FAIR_ESM_SPEC=${FAIR_ESM_SPEC:-fair-esm==2.0.0}
EXTRAS=${EXTRAS:-test,nlp}

say() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

have() { "$PY" -c "import $1" >/dev/null 2>&1; }

if have torch; then
  say "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed: kept"
else
  say "installing $TORCH_SPEC (first, pinned)"
  "${PIP[@]}" install "$TORCH_SPEC"
fi

"${PIP[@]}" install "setuptools>=64" wheel
say "installing esmfold-peft (editable, extras: $EXTRAS) and its dependencies"
"${PIP[@]}" install --no-build-isolation -e ".[${EXTRAS}]"

if "$PY" -c "import torch, openfold.utils.loss" >/dev/null 2>&1; then
  say "openfold already installed: kept"
else
  # The registry's openfold sdist imports scripts.utils.get_nvidia_cc, which it does not ship,
  # and needs torch at build time. A two-line stand-in answers "no CUDA"; a CPU stub extension
  # is built (70-110 s); nvcc is never used with a CPU torch.
  shim=$(mktemp -d)
  trap 'rm -rf "$shim"' EXIT
  mkdir -p "$shim/scripts"
  : > "$shim/scripts/__init__.py"
  printf 'def get_nvidia_cc():\n    return None, None\n' > "$shim/scripts/utils.py"
  say "building $OPENFOLD_SPEC (about 1-2 minutes)"
  PYTHONPATH="$shim" "${PIP[@]}" install --no-build-isolation "$OPENFOLD_SPEC"
fi

if have esm.pretrained; then
  say "fair-esm already installed: kept"
else
  # fair-esm's [esmfold] extra pins deepspeed 0.5.9; its real needs are in our dependencies.
  say "installing $FAIR_ESM_SPEC (no deps)"
  "${PIP[@]}" install --no-deps "$FAIR_ESM_SPEC"
fi

"$PY" -c "import esmfold_peft.compat as c; c.check_stack()"
say "ready: $VENV"
