#!/usr/bin/env bash
# Create .venv (or $SDVGEN_VENV) and install sdvgen into it. Safe to run again.
# torch: an already installed torch is kept. Otherwise torch==$SDVGEN_TORCH_VERSION is installed
# explicitly first, so the unpinned `torch` requirement never pulls a different (multi-GB) build.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${SDVGEN_VENV:-.venv}"
extras="${1:-}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip >/dev/null
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  echo "installing torch==${SDVGEN_TORCH_VERSION:-2.13.0}"
  "$py" -m pip install -q "torch==${SDVGEN_TORCH_VERSION:-2.13.0}"
fi
echo "installing sdvgen${extras:+[$extras]}"
"$py" -m pip install -q -e ".${extras:+[$extras]}"
