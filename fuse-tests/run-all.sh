#!/usr/bin/env bash
# The whole test suite: installs what is missing, then runs the unit tests, the real-mount
# fuse-tests against Azurite, and checks formatting and lints.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash fuse-tests/setup.sh
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt >/dev/null 2>&1 || true
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --all-targets
# Nothing may be left mounted (the tests mount under the temporary directory).
if grep -E ' /tmp/\S+ fuse(\.simfs)? ' /proc/mounts; then
  echo "a simfs mount was left behind (above)" >&2
  exit 1
fi
