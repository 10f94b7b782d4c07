#!/usr/bin/env bash
# The whole test suite: installs what is missing, then runs the unit tests (the model-based
# test among them), the real-mount fuse-tests against Azurite (pjdfstest, also through a
# slow fault-injecting proxy, fsx, and the fault tests), a heavier model and fsx stage, the
# Debian package's install and mount test, and checks formatting and lints.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash fuse-tests/setup.sh
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt >/dev/null 2>&1 || true
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings

# Runs "$@" for at most $1 seconds. A hung test would otherwise hold CI until its own limit
# and say nothing; past the bound, every thread of the test processes still running is
# printed (gdb), they are killed, their mounts are lazily unmounted, and the stage fails.
bounded() {
  local limit=$1 waited=0 tests='/deps/[a-z_]+-[0-9a-f]{16}( |$)'
  shift
  "$@" &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$waited" -ge "$limit" ]; then
      echo "run-all: '$*' still running after ${limit}s; the threads of its test processes:" >&2
      for p in $(pgrep -f "$tests"); do
        echo "=== $(tr '\0' ' ' </proc/"$p"/cmdline)" >&2
        gdb -p "$p" -batch -ex 'thread apply all bt' >&2 2>&1 || true
      done
      pkill -KILL -f "$tests" || true
      kill "$pid" 2>/dev/null || true
      wait "$pid" || true
      grep -E ' /tmp/\S+ fuse(\.simfs)? ' /proc/mounts | cut -d' ' -f2 | xargs -r -n1 fusermount3 -uz || true
      return 124
    fi
    sleep 5
    waited=$((waited + 5))
  done
  wait "$pid"
}

bounded 2700 cargo test --all-targets
# The heavier, bounded stage: about 10,000 random operations against the POSIX model with
# uploads racing them, and fsx with 20,000 operations on a real mount.
SIMFS_MODEL_CASES=100 SIMFS_MODEL_OPS=200 bounded 900 cargo test --test core model_tests
SIMFS_FSX_OPS=20000 bounded 900 cargo test --test fuse fsx_
# The Debian package, installed and mounted three ways (needs root: CI runs as root).
if [ "$(id -u)" = 0 ]; then
  bash packaging/test-deb.sh
else
  echo "run-all: not root, skipping packaging/test-deb.sh" >&2
fi
# Nothing may be left mounted (the tests mount under the temporary directory).
if grep -E ' /tmp/\S+ fuse(\.simfs)? ' /proc/mounts; then
  echo "a simfs mount was left behind (above)" >&2
  exit 1
fi
