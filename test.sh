#!/usr/bin/env bash
# Install the dev extra and run the test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")"
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0   # CPU build first
python -m pip install -q -e ".[dev]"
exec python -m pytest -q "$@"
