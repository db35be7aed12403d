#!/usr/bin/env bash
# The test suite: set up (idempotent), lint, then pytest. Network tests build real Mininet
# networks, so they need root and run serially (interface names are global). Afterwards the
# leak check (tests/leakcheck.py) fails the script if the suite left anything behind:
# interfaces, namespaces, cgroups, processes or /tmp/sledge-* paths.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
snapshot=$(mktemp)
trap 'rm -f "$snapshot"' EXIT
.venv/bin/python tests/leakcheck.py snapshot "$snapshot"
status=0
.venv/bin/python -m pytest -ra "$@" || status=$?
.venv/bin/python tests/leakcheck.py compare "$snapshot" || { [ "$status" -ne 0 ] || status=1; }
exit "$status"
