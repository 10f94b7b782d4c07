#!/usr/bin/env bash
# The demo: start Azurite, seed a container in the Blobfuse2 format (a real Python venv, a few
# thousand data files, a checkpoint with a latest.pt symlink, a 64 MiB file), mount it with
# simfs, show what a user sees and how fast stat() is, then write a checkpoint, link, chmod
# and rename, and show the result from a second mount on an empty cache. Cleans up after itself;
# DEMO_HOLD=1 keeps the mount until you press Enter; DEMO_ARGS adds options to the remount.
set -euo pipefail
DEMO_ARGS="${DEMO_ARGS:-}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash fuse-tests/setup.sh
cargo build --release --quiet --bins
bin="$PWD/target/release"

work="$(mktemp -d /tmp/simfs-demo.XXXXXX)"
mnt="$work/mnt"; mkdir -p "$mnt" "$work/azurite" "$work/src"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
cleanup() {
  set +e
  for m in "$mnt" "$work/mnt2"; do
    grep -q " $m " /proc/mounts && "$bin/simfs" unmount "$m"
  done
  [ -n "${az_pid:-}" ] && kill "$az_pid" 2>/dev/null && wait "$az_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

fuse-tests/node_modules/.bin/azurite-blob --blobHost 127.0.0.1 --blobPort "$port" \
  --location "$work/azurite" --skipApiVersionCheck --disableTelemetry --silent >/dev/null 2>&1 &
az_pid=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
endpoint="http://127.0.0.1:$port/devstoreaccount1"
echo "== Azurite on $endpoint"

python3 -m venv --without-pip "$work/src/venv"
mkdir -p "$work/src/ckpt"
head -c 1048576 /dev/urandom > "$work/src/ckpt/step-1000.pt"
ln -s step-1000.pt "$work/src/ckpt/latest.pt"
"$bin/simfs-seed" --endpoint "$endpoint" --container demo --dir "$work/src=" --files 3000 --big-mib 64

export AZURE_STORAGE_CONNECTION_STRING="UseDevelopmentStorage=true;BlobEndpoint=$endpoint"
echo "== simfs mount demo $mnt --cache-dir $work/cache"
time "$bin/simfs" mount demo "$mnt" --cache-dir "$work/cache" $DEMO_ARGS

echo "== the tree"
ls -l "$mnt" "$mnt/ckpt" "$mnt/venv/bin"
echo "== the venv's python runs from the mount"
"$mnt/venv/bin/python" -c 'import sys; print("python", sys.version.split()[0], "prefix", sys.prefix)'
echo "== remount: the persisted index is reused, the kernel's caches start empty"
find "$mnt" -mindepth 1 > "$work/paths"
"$bin/simfs" unmount "$mnt"
time "$bin/simfs" mount demo "$mnt" --cache-dir "$work/cache" $DEMO_ARGS
echo "== stat() of every path by name (cold: one FUSE lookup each), then again (warm)"
python3 - "$work/paths" <<'PY'
import os, sys, time
paths = open(sys.argv[1]).read().split("\n")[:-1]
for label in ("cold pass", "warm pass"):
    t = []
    for p in paths:
        t0 = time.perf_counter_ns(); os.lstat(p); t.append(time.perf_counter_ns() - t0)
    t.sort()
    q = lambda f: t[min(len(t) - 1, int(f * len(t)))] / 1000
    print(f"{label}: {len(t)} paths in {sum(t)/1e9:.3f} s, p50 {q(.5):.1f} us, p99 {q(.99):.1f} us, max {t[-1]/1000:.0f} us")
PY
echo "== ls -lR"
time (ls -lR "$mnt" > /dev/null)
echo "== first read of a 64 MiB file (hydration), then a cached read"
time (cat "$mnt/big/large.bin" > /dev/null)
time (cat "$mnt/big/large.bin" > /dev/null)
echo "== write: a checkpoint written and fsynced, a hard link, a chmod, a rename"
python3 - "$mnt" <<'PY'
import os, sys, time
mnt = sys.argv[1]
data = os.urandom(1 << 20) * 256
t0 = time.perf_counter()
with open(f"{mnt}/ckpt/step-2000.pt", "wb") as f:
    f.write(data); f.flush(); t1 = time.perf_counter(); os.fsync(f.fileno())
t2 = time.perf_counter()
print(f"256 MiB checkpoint: write {t1-t0:.2f} s, fsync (upload, returns when committed) {t2-t1:.2f} s")
PY
ln "$mnt/ckpt/step-2000.pt" "$mnt/ckpt/best.pt"
ln -sfn step-2000.pt "$mnt/ckpt/latest.pt"
chmod 0640 "$mnt/ckpt/step-2000.pt"
mv "$mnt/data" "$mnt/data-v2"
ls -li "$mnt/ckpt"
echo "== unmount (waits for the uploads), then mount on an EMPTY cache: a fresh node's view"
time "$bin/simfs" unmount "$mnt"
time "$bin/simfs" mount demo "$mnt" --cache-dir "$work/fresh-cache" $DEMO_ARGS
ls -li "$mnt/ckpt"
ls "$mnt" | tr '\n' ' '; echo
cmp <(head -c 1048576 "$mnt/ckpt/best.pt") <(head -c 1048576 "$mnt/ckpt/step-2000.pt") && echo "hard link and data intact"
echo "== freshness: a second node (its own cache) writes; this mount sees it after simfs refresh"
mnt2="$work/mnt2"; mkdir -p "$mnt2"
"$bin/simfs" mount demo "$mnt2" --cache-dir "$work/node2-cache" --upload-delay 0 $DEMO_ARGS
echo "written by node 2" > "$mnt2/ckpt/from-node-2.txt"
"$bin/simfs" unmount "$mnt2"
ls "$mnt/ckpt/from-node-2.txt" 2>/dev/null || echo "not visible yet (next background refresh: within --refresh-interval, 60 s)"
"$bin/simfs" refresh "$mnt" ckpt
cat "$mnt/ckpt/from-node-2.txt"
"$bin/simfs" status | grep -E "^/|last refresh"
if [ "${DEMO_HOLD:-0}" = 1 ]; then
  read -rp "mounted at $mnt; press Enter to unmount " _
fi
"$bin/simfs" unmount "$mnt"
echo "== unmounted; demo done"
