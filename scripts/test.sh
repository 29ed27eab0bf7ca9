#!/usr/bin/env bash
# Set up (first run) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev
exec "${SDVGEN_VENV:-.venv}/bin/python" -m pytest tests "$@"
