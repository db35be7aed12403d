#!/usr/bin/env bash
# Idempotent set-up of a Debian/Ubuntu machine for sledge, run as root.
# Installs the apt packages, then a venv (.venv) made by the system python3 with
# --system-site-packages, because Debian/Ubuntu's `mininet` package is only importable there.
# torch is pinned to the CPU build: never let pip resolve plain `torch` (GBs of CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."

# python3-yaml and python3-pyparsing: the venv sees system site-packages, so pip takes these
# from Debian when present; naming them makes every machine (and scripts/vm.sh's guest, which
# reads this list) resolve the same way.
APT_PKGS=(mininet iperf3 iproute2 bridge-utils iputils-ping ethtool procps
          python3-venv python3-dev python3-yaml python3-pyparsing dataset-fashion-mnist chromium)
TORCH_VERSION=${SLEDGE_TORCH_VERSION:-2.13.0}

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: run as root (Mininet needs it): sudo $0" >&2
  exit 1
fi

missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # dataset-fashion-mnist is missing from some Ubuntu releases: install it where it exists.
  apt-get install -y -qq --no-install-recommends "${missing[@]/dataset-fashion-mnist}" >/dev/null
  apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null 2>&1 \
    || echo "setup: dataset-fashion-mnist not available here; the digits data set stays the default"
fi

if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
PY=.venv/bin/python
# torch first, alone and pinned, so nothing later can pull a CUDA build.
# SLEDGE_TORCH_INDEX (e.g. PyTorch's CPU wheel index) is for machines without a local wheel.
if ! $PY -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  extra=()
  # The CPU build's local version (+cpu) sorts above the plain one, so pip prefers it.
  [ -n "${SLEDGE_TORCH_INDEX:-}" ] && extra=(--extra-index-url "$SLEDGE_TORCH_INDEX")
  $PY -m pip install -q "${extra[@]}" "torch==$TORCH_VERSION"
fi
stamp=.venv/.sledge-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  $PY -m pip install -q -e ".[test]"
  touch "$stamp"
fi
$PY -c "import mininet.net, torch, zmq, msgpack, pydantic" || { echo "setup: the venv cannot import its dependencies" >&2; exit 1; }
