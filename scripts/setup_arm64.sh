#!/usr/bin/env bash
# Sets up what the arm64 target needs on an x86-64 Debian/Ubuntu host (idempotent):
#   1. the aarch64 cross toolchain (links the .so hwopt builds for arm64) and qemu-user;
#   2. an aarch64 sysroot with python3.11 (arm64 .debs unpacked with dpkg -x, nothing installed);
#   3. the aarch64 wheels of apache-tvm / apache-tvm-ffi / numpy / ml_dtypes in a site dir,
# so that hwopt.emulate can run saved arm64 artifacts under `qemu-aarch64 -L sysroot`.
# Everything but the apt packages goes under $HWOPT_ARM64_ROOT (default ~/.cache/hwopt-arm64;
# not inside the compile cache ~/.cache/hwopt, so clearing that cache keeps the sysroot).
# Exits 0 with a message when it cannot do this (no root, no apt): scripts/setup.sh may call it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${HWOPT_ARM64_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/hwopt-arm64}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
TVM_PINS="apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1"
# The rest pinned to what the host venv has, so both sides load the same formats.
host_pin() { "$PY" -c "import importlib.metadata as m; print('$1==' + m.version('$1'))" 2>/dev/null \
             || echo "$1"; }
DEBS="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libffi8 zlib1g libexpat1
  libbz2-1.0 liblzma5 libssl3 libc6 libgcc-s1 libstdc++6 libtinfo6 libncursesw6 libreadline8
  libsqlite3-0 libuuid1 libcrypt1 libzstd1"
start=$(date +%s)
say() { echo "setup_arm64: $*"; }
skip() { say "skipped: $*"; say "the arm64 target still compiles if aarch64-linux-gnu-g++ is on"\
" PATH; tests that run arm64 code under qemu will be skipped."; exit 0; }

if [ "$(uname -m)" = aarch64 ]; then say "nothing to do: this host is aarch64, arm64 code runs"\
" natively"; exit 0; fi
have_tools() { command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null; }
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if sudo -n true 2>/dev/null; then SUDO="sudo -n"; elif ! have_tools; then
    skip "not root and no password-less sudo: cannot apt-get install the toolchain"; fi
fi
command -v apt-get >/dev/null || have_tools || skip "no apt-get on this system"

# 1. Toolchain and emulator.
if ! have_tools; then
  say "installing gcc/g++-aarch64-linux-gnu and qemu-user"
  $SUDO apt-get update -q >/dev/null || skip "apt-get update failed"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user >/dev/null \
    || skip "apt-get install failed (see the messages above)"
fi

# 2. Sysroot: arm64 .debs unpacked (not installed) under $ROOT/sysroot.
mkdir -p "$ROOT/debs" "$ROOT/sysroot"
if [ ! -f "$ROOT/sysroot/.done" ]; then
  command -v dpkg >/dev/null && command -v apt-get >/dev/null \
    || skip "no dpkg/apt-get: cannot build the aarch64 sysroot"
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    [ -n "$SUDO" ] || [ "$(id -u)" = 0 ] || skip "not root: cannot add the arm64 dpkg architecture"
    say "adding the arm64 dpkg architecture"
    $SUDO dpkg --add-architecture arm64 || skip "dpkg --add-architecture arm64 failed"
    $SUDO apt-get update -q >/dev/null || skip "apt-get update failed"
  elif ! apt-cache show python3.11-minimal:arm64 >/dev/null 2>&1; then
    $SUDO apt-get update -q >/dev/null || skip "apt-get update failed"
  fi
  rm -f "$ROOT"/debs/*.deb
  say "downloading arm64 python3.11 and its libraries"
  # shellcheck disable=SC2046
  (cd "$ROOT/debs" && apt-get download -q $(for d in $DEBS; do echo "$d:arm64"; done) media-types \
    >/dev/null) || skip "apt-get download of the arm64 packages failed"
  for d in "$ROOT"/debs/*.deb; do dpkg -x "$d" "$ROOT/sysroot"; done
  # Debian byte-compiles the stdlib in postinst, which dpkg -x skips; under qemu the emulated
  # Python then recompiles it on every start (~3 s). Python 3.11 .pyc files are portable.
  "$PY" -m compileall -q -j 2 -s "$ROOT/sysroot" -p / -x 'test|lib2to3|idlelib|tkinter' \
    "$ROOT/sysroot/usr/lib/python3.11" >/dev/null || true
  touch "$ROOT/sysroot/.done"
fi

# 3. aarch64 wheels in a site dir (pip installs for another platform without running anything).
PINS="$TVM_PINS $(host_pin numpy) $(host_pin ml_dtypes) $(host_pin typing_extensions)"
if [ "$(cat "$ROOT/site/.pins" 2>/dev/null)" != "$PINS" ]; then
  say "installing aarch64 wheels: $PINS"
  rm -rf "$ROOT/site"
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --no-deps --target "$ROOT/site" --platform manylinux_2_28_aarch64 \
    --python-version 3.11 --implementation cp --only-binary=:all: $PINS \
    || skip "pip could not fetch the aarch64 wheels"
  echo "$PINS" >"$ROOT/site/.pins"
fi

# Check: the emulated Python imports the TVM runtime the way hwopt/emulate_runner.py does.
if ! qemu-aarch64 -L "$ROOT/sysroot" -E PYTHONPATH="$ROOT/site" -E TVM_USE_RUNTIME_LIB=1 \
    "$ROOT/sysroot/usr/bin/python3.11" \
    -c "import platform, numpy, tvm.runtime.vm; assert platform.machine() == 'aarch64'"; then
  say "ERROR: the emulated aarch64 Python could not import tvm (see above); arm64 emulation"\
" tests will fail until this is fixed"; exit 0
fi
say "ready in $(( $(date +%s) - start )) s: sysroot $ROOT/sysroot, site $ROOT/site"
