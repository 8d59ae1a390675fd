#!/usr/bin/env bash
# Sets up hwopt in ./.venv on a fresh machine (idempotent). Torch is pinned and installed first:
# a plain "torch" would pull a multi-GB CUDA build instead of the CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || .venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test,models,tune]"
# Cross-compilation and emulation for the arm64 target (aarch64 gcc, qemu-user, an arm64 Python
# sysroot with the TVM runtime); always exits 0, printing why when it cannot install them.
bash scripts/setup_arm64.sh
# Optional system tools (skipped with a note when not root or without apt): headless Chromium
# for the report rendering test.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  if ! command -v chromium >/dev/null 2>&1; then
    (apt-get install -y -q chromium >/dev/null 2>&1 \
      || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) \
      || echo "hwopt setup: could not install chromium; the report rendering test will be skipped"
  fi
else
  echo "hwopt setup: not root or no apt-get: chromium not installed (report rendering test skips)"
fi
