#!/usr/bin/env bash
# The test suite: set up (idempotent), lint, then pytest. Network tests build real Mininet
# networks, so they need root and run serially (interface names are global).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -ra "$@"
