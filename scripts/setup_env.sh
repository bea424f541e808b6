#!/usr/bin/env bash
# Create or refresh .venv/ with the CPU pins that work together (see README "Install").
# Idempotent: a stamp file records the hash of this script, pyproject.toml and requirements.txt; when neither
# changed and the venv imports, it returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.tapper-setup-stamp
want=$(cat scripts/setup_env.sh pyproject.toml requirements.txt | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import torchrec, transformers, recsys_tapper" 2>/dev/null; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/pip --disable-pip-version-check -q"
# 1. CPU torch first: every later package sees torch==2.13.0 satisfied and pulls no CUDA build.
$PIP install "torch==2.13.0"
# 2. The CPU build of fbgemm, then torchrec WITHOUT its deps (a plain install drags in CUDA fbgemm-gpu 1.9).
$PIP install "fbgemm-gpu-cpu==1.8.0"
$PIP install --no-deps "torchrec==1.8.0"
$PIP install pyre-extensions tensordict torchmetrics tqdm iopath
# 3. Everything else. The project itself is installed with --no-deps: its pyproject does not
#    list torchrec/fbgemm (see README), so nothing here can replace the CPU builds.
$PIP install -r requirements.txt
$PIP install --no-deps -e .
"$VENV/bin/python" -c "import torch, torchrec, fbgemm_gpu, transformers, peft, hydra, recsys_tapper" 
echo "$want" > "$STAMP"
