#!/usr/bin/env bash
# Builds the Debian package into target/debian/ (installs cargo-deb into target/tools first).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tools="$PWD/target/tools"
if [ ! -x "$tools/bin/cargo-deb" ] || [ "$("$tools/bin/cargo-deb" --version 2>/dev/null)" != "cargo-deb 3.8.0" ]; then
  echo "build-deb: installing cargo-deb" >&2
  cargo install --quiet --locked --root "$tools" cargo-deb@3.8.0
fi
"$tools/bin/cargo-deb" --quiet --strip --output target/debian/
ls target/debian/*.deb
