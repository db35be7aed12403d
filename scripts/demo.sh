#!/usr/bin/env bash
# The main job: set up (idempotent), then the default experiment (PSL, 2 clients, tiny
# topology, Fashion-MNIST from Debian's dataset-fashion-mnist). Extra arguments go to `sledge run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/sledge run topologies/tiny.py --scheme psl --rounds 5 "$@"
