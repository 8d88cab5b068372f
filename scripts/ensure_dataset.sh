#!/usr/bin/env bash
# Make sure Fashion-MNIST is on this machine and staged for torchvision.
# 1. Debian's dataset-fashion-mnist (offline; installed here when apt-get is usable),
# 2. otherwise torchvision's download (needs internet).
set -euo pipefail
PY=${1:-python}
DIR=/usr/share/datasets/fashion-mnist
if [ ! -f "$DIR/train-images-idx3-ubyte.gz" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "Installing Debian package dataset-fashion-mnist ..."
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; }; then
    echo "apt-get could not install dataset-fashion-mnist; falling back to torchvision's download." >&2
  fi
fi
exec "$PY" "$(dirname "$0")/stage_dataset.py"
