#!/usr/bin/env bash
# Installs what the demo and the tests need on a fresh Debian machine: FUSE 3, Node.js/npm,
# the pinned Azurite, Python's venv module (the demo stores a real venv), OpenSSL headers,
# pjdfstest and fsx, and a Rust toolchain check. Safe to run again: it only installs what is missing.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

need_apt=()
command -v fusermount3 >/dev/null 2>&1 || need_apt+=(fuse3)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
# OpenSSL: azure_identity's certificate credential (service principals with a certificate).
{ command -v pkg-config >/dev/null 2>&1 && pkg-config --exists openssl; } || need_apt+=(pkg-config libssl-dev)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
# rsync: a fuse-test copies a tree onto the mount with rsync -a.
command -v rsync >/dev/null 2>&1 || need_apt+=(rsync)
# strace: a fuse-test checks that cp asks the mount for copy_file_range.
command -v strace >/dev/null 2>&1 || need_apt+=(strace)
# run-all prints the threads of a test that hangs.
command -v gdb >/dev/null 2>&1 || need_apt+=(gdb)
if ((${#need_apt[@]})); then
  echo "setup: installing ${need_apt[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# Prometheus: a fuse-test scrapes a live mount with it (its recommends, the exporters, are
# not needed).
if ! command -v prometheus >/dev/null 2>&1; then
  echo "setup: installing prometheus" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  [ "${#need_apt[@]}" -gt 0 ] || $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is missing: install Rust (rustup) first" >&2
  exit 1
fi
if [ ! -x "$here/node_modules/.bin/azurite-blob" ] ||
   [ "$(node -p "require('$here/node_modules/azurite/package.json').version" 2>/dev/null)" != "3.37.0" ]; then
  echo "setup: installing azurite 3.37.0" >&2
  (cd "$here" && npm install --no-audit --no-fund --loglevel=error >/dev/null)
fi
# The POSIX test suite and the data-integrity exerciser run against a real mount; both are
# Rust ports published on crates.io, built once into target/tools.
tools="$here/../target/tools"
if [ ! -x "$tools/bin/pjdfstest" ] || [ ! -x "$tools/bin/fsx" ]; then
  echo "setup: building pjdfstest 0.2.2 and fsx 0.3.2" >&2
  cargo install --quiet --locked --root "$tools" pjdfstest@0.2.2 fsx@0.3.2
fi
# pjdfstest switches to these users to test permissions.
if ! getent passwd tests >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  echo 'tests:x:::pjdfstest dummy user:/:/usr/sbin/nologin' | $SUDO newusers
fi
[ -e /dev/fuse ] || { echo "setup: /dev/fuse is missing (modprobe fuse)" >&2; exit 1; }
