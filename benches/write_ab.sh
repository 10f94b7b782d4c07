#!/usr/bin/env bash
# Write throughput of two simfs builds side by side, in one run of `simfs bench --write`:
# a native directory on the cache disk, a mount by the BEFORE binary and a mount by this
# tree's release build, each over its own empty container of one Azurite (no delay: the
# writes are local until close). The bench writes STREAM_MIB (default 1024) in 1 MiB writes
# without fsync and reports MiB/s and the ratio to the native directory.
#
#   BEFORE=/tmp/simfs-before bash benches/write_ab.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${BEFORE:?set BEFORE to the simfs binary to compare with}"
STREAM_MIB="${STREAM_MIB:-1024}"
bash fuse-tests/setup.sh
cargo build --release --quiet --bins
bin="$PWD/target/release"
work="$(mktemp -d /tmp/simfs-write-ab.XXXXXX)"
mkdir -p "$work/az" "$work/native" "$work/before" "$work/after"
cleanup() {
  set +e
  for m in "$work/before" "$work/after"; do
    grep -q " $m " /proc/mounts && { fusermount3 -u "$m" || umount -l "$m"; }
  done
  [ -n "${az:-}" ] && kill "$az" 2>/dev/null
  wait 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
fuse-tests/node_modules/.bin/azurite-blob --blobHost 127.0.0.1 --blobPort "$port" \
  --location "$work/az" --skipApiVersionCheck --disableTelemetry --silent --loose >/dev/null 2>&1 &
az=$!
for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
endpoint="http://127.0.0.1:$port/devstoreaccount1"
export AZURE_STORAGE_CONNECTION_STRING="UseDevelopmentStorage=true;BlobEndpoint=$endpoint"
for side in before after; do
  mkdir -p "$work/seed-$side" && echo seeded > "$work/seed-$side/README"
  "$bin/simfs-seed" --endpoint "$endpoint" --container "$side" --dir "$work/seed-$side=" >/dev/null
done
"$BEFORE" mount before "$work/before" --cache-dir "$work/cache-before"
"$bin/simfs" mount after "$work/after" --cache-dir "$work/cache-after"
cp "$work/seed-before/README" "$work/native/README"
"$bin/simfs" bench "$work/native" "$work/before" "$work/after" --write --small-files 1 \
  --stream-write-mib "$STREAM_MIB"
echo "(native = $work/native, on the same disk as both caches; before = $BEFORE)"
