#!/usr/bin/env bash
# Create ./.venv-infinity with Infinity (infinity-emb), the embedding server serve_throughput.py
# compares the Ray Serve app with. Its own environment: infinity-emb 0.0.78 pins numpy<2 and
# sentence-transformers<4, which clash with clp-ray's stack. CPU torch first (the local wheel), as
# scripts/setup.sh does. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-infinity/bin/python ] || "$PY" -m venv .venv-infinity
export PIP_DISABLE_PIP_VERSION_CHECK=1
P=.venv-infinity/bin/pip
.venv-infinity/bin/python -c "import torch" 2>/dev/null || $P install -q "torch==2.13.0"
.venv-infinity/bin/python -c "import infinity_emb" 2>/dev/null || $P install -q "infinity-emb[server,torch]==0.0.78"
.venv-infinity/bin/infinity_emb --help >/dev/null && .venv-infinity/bin/python -c \
  "import infinity_emb, torch; print(f'infinity env ready: infinity-emb {infinity_emb.__version__}, torch {torch.__version__}')"
