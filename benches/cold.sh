#!/usr/bin/env bash
# Cold data against the clients that download it to the same disk (what Download Mode does),
# in one run, through the delay proxy (default 5 ms round trip), best of two each:
#
#   large    1 GiB read cold with dd bs=1M through a fresh mount (empty cache), beside
#            `rclone copyto --multi-thread-streams 8` and the Azure SDK for Python's
#            download_blob(max_concurrency=8) into a file. simfs runs with --verify none (the
#            CPU the issue compares) and with the default --verify auto (the checksum's cost
#            is the difference); time, and CPU seconds: the daemon's utime + stime from /proc
#            for simfs, the client's own for the references.
#   parallel 4 readers of 4 different 256 MiB blobs at once, beside `rclone copy --transfers 4`.
#   import   a venv with numpy and requests written through one mount, then on a fresh node
#            (new mount, empty cache) a cold `python -c 'import numpy'` and `import requests`,
#            beside the same venv on the native disk after dropping the page cache.
#
# Results land in OUT (default benches/results/cold): table.txt and cold.json.
#
#   bash benches/cold.sh
#   RTT_MS=5 ONLY="large parallel" OUT=/tmp/c bash benches/cold.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RTT_MS="${RTT_MS:-5}"; ONLY="${ONLY:-large parallel import}"
OUT="${OUT:-$PWD/benches/results/cold}"
source benches/lib.sh
bash fuse-tests/setup.sh
bench_apt rclone
cargo build --release --quiet --bins
bin="$PWD/target/release"
mkdir -p "$OUT"
bench_workdir simfs-cold
bench_service "$RTT_MS"
results="$work/results.txt"; : > "$results"

echo "== inputs"
mkdir -p "$work/src/big" "$work/src/par" "$work/out" "$work/empty"
echo "simfs cold bench" > "$work/empty/README"
dd if=/dev/urandom of="$work/src/big/large.bin" bs=1M count=1024 status=none
for i in 0 1 2 3; do dd if=/dev/urandom of="$work/src/par/p$i.bin" bs=1M count=256 status=none; done
sas="$("$bin/simfs-seed" --endpoint "$direct" --container cold --dir "$work/src=" --print-sas racwdl | tail -1)"
"$bin/simfs-seed" --endpoint "$direct" --container venv --dir "$work/empty=" >/dev/null
export AZURE_STORAGE_CONNECTION_STRING="UseDevelopmentStorage=true;BlobEndpoint=$slow"
export RCLONE_CONFIG_AZ_TYPE=azureblob RCLONE_CONFIG_AZ_SAS_URL="${sas/$direct/$slow}"
sdk_cs="DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;BlobEndpoint=$slow"
bench_wheels

# A fresh mount of CONTAINER at $work/m with an empty cache; sets dpid. Extra args to mount.
fresh_mount() {
  local c="$1"; shift
  unmount_fresh
  rm -rf "$work/cache"
  bench_mount_point "$work/m"
  "$bin/simfs" mount "$c" "$work/m" --cache-dir "$work/cache" "$@"
  dpid="$(pgrep -f -- "mount $c $work/m " | head -1)"
}
unmount_fresh() { grep -q " $work/m " /proc/mounts && "$bin/simfs" unmount "$work/m" >/dev/null || true; }

# record NAME CONTENDER SECONDS CPU
record() { echo "$1 $2 $3 $4" | tee -a "$results"; }
now() { echo "$EPOCHREALTIME"; }
took() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }
# timed NAME CONTENDER COMMAND...: runs COMMAND, its own user + system CPU counted.
timed() {
  local n="$1" c="$2"; shift 2
  local t0 t; t0="$(now)"
  /usr/bin/time -f "%U %S" -o "$work/time.out" "$@" >/dev/null 2>"$work/cmd.err" ||
    { echo "$n with $c failed:" >&2; tail -5 "$work/cmd.err" >&2; return 1; }
  t="$(took "$t0")"
  record "$n" "$c" "$t" "$(awk '{ printf "%.2f", $1 + $2 }' "$work/time.out")"
}
# simfs_read NAME CONTENDER CONTAINER MOUNT_ARGS -- FILES...: a cold read of FILES (relative
# to the mount) through a fresh mount, all at once; the daemon's CPU counted.
simfs_read() {
  local n="$1" c="$2" cont="$3"; shift 3
  local args=(); while [ "$1" != "--" ]; do args+=("$1"); shift; done; shift
  fresh_mount "$cont" "${args[@]}"
  cold_start
  local c0 t0 f readers=(); c0="$(cpu_of "$dpid")"; t0="$(now)"
  for f in "$@"; do dd if="$work/m/$f" of=/dev/null bs=1M status=none & readers+=("$!"); done
  for f in "${readers[@]}"; do wait "$f"; done
  local t; t="$(took "$t0")"
  sleep 0.3
  record "$n" "$c" "$t" "$(awk -v a="$c0" -v b="$(cpu_of "$dpid")" 'BEGIN { printf "%.2f", b - a }')"
  unmount_fresh
}

for w in $ONLY; do
  echo "== $w"
  case "$w" in
    large)
      for _ in 1 2; do
        simfs_read large simfs-none cold --verify none -- big/large.bin
        simfs_read large simfs-auto cold -- big/large.bin
        rm -f "$work/out/rc.bin"; cold_start
        timed large rclone rclone copyto az:cold/big/large.bin "$work/out/rc.bin" --multi-thread-streams 8
        if "$work/sdk/bin/python" -c 'import azure.storage.blob' 2>/dev/null; then
          rm -f "$work/out/sdk.bin"; cold_start
          timed large sdk "$work/sdk/bin/python" -c '
import sys
from azure.storage.blob import BlobClient
c = BlobClient.from_connection_string(sys.argv[1], "cold", "big/large.bin")
with open(sys.argv[2], "wb") as f:
    c.download_blob(max_concurrency=8).readinto(f)' "$sdk_cs" "$work/out/sdk.bin"
        fi
      done
      rm -f "$work/out/rc.bin" "$work/out/sdk.bin" ;;
    parallel)
      for _ in 1 2; do
        simfs_read parallel simfs-none cold --verify none -- par/p0.bin par/p1.bin par/p2.bin par/p3.bin
        simfs_read parallel simfs-auto cold -- par/p0.bin par/p1.bin par/p2.bin par/p3.bin
        rm -rf "$work/out/par"; cold_start
        timed parallel rclone rclone copy az:cold/par "$work/out/par" --transfers 4
      done
      rm -rf "$work/out/par" ;;
    import)
      # Written through one mount (and committed), read on fresh ones.
      fresh_mount venv
      (cd "$work/m" && python3 -m venv venv && venv/bin/pip install -q --disable-pip-version-check \
        --no-index --find-links "$wheels" numpy requests)
      "$bin/simfs" sync "$work/m" >/dev/null
      unmount_fresh
      mkdir -p "$work/native"
      (cd "$work/native" && python3 -m venv venv && venv/bin/pip install -q --disable-pip-version-check \
        --no-index --find-links "$wheels" numpy requests)
      for mod in numpy requests; do
        for _ in 1 2; do
          cold_start
          timed "import-$mod" native "$work/native/venv/bin/python" -c "import $mod"
          fresh_mount venv
          cold_start
          c0="$(cpu_of "$dpid")"; t0="$(now)"
          "$work/m/venv/bin/python" -c "import $mod"
          record "import-$mod" simfs "$(took "$t0")" "$(awk -v a="$c0" -v b="$(cpu_of "$dpid")" 'BEGIN { printf "%.2f", b - a }')"
          unmount_fresh
        done
      done ;;
  esac
done

python3 - "$results" "$OUT" "$RTT_MS" <<'PY' | tee "$OUT/table.txt"
import json, os, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
out, rtt = sys.argv[2], sys.argv[3]
best = {}
for n, c, s, cpu in rows:
    s, cpu = float(s), float(cpu)
    if (n, c) not in best or s < best[(n, c)][0]:
        best[(n, c)] = (s, cpu)
print(f"cold data, {rtt} ms round trip, best of two; seconds and CPU seconds (simfs: the daemon's)")
for n in ["large", "parallel"]:
    refs = {c: v for (m, c), v in best.items() if m == n and not c.startswith("simfs")}
    if not refs:
        continue
    ref = min(refs, key=lambda c: refs[c][0])
    print(f"{n}: " + ";  ".join(f"{c} {v[0]:.2f} s {v[1]:.2f} CPU-s" for (m, c), v in sorted(best.items()) if m == n))
    for c in ["simfs-none", "simfs-auto"]:
        if (n, c) in best:
            s, cpu = best[(n, c)]
            print(f"  {c}: time {s / refs[ref][0]:.2f}x of {ref} (the fastest reference); "
                  f"CPU {cpu / refs['rclone'][1]:.2f}x of rclone's" if "rclone" in refs else "")
    if (n, "simfs-none") in best and (n, "simfs-auto") in best:
        print(f"  the checksum (auto - none): {best[(n, 'simfs-auto')][1] - best[(n, 'simfs-none')][1]:+.2f} CPU-s, "
              f"{best[(n, 'simfs-auto')][0] - best[(n, 'simfs-none')][0]:+.2f} s")
for mod in ["numpy", "requests"]:
    n = f"import-{mod}"
    if (n, "native") in best and (n, "simfs") in best:
        a, b = best[(n, "native")][0], best[(n, "simfs")][0]
        print(f"cold import {mod} on a fresh node: native {a * 1000:.0f} ms, simfs {b * 1000:.0f} ms = {b / a:.2f}x")
json.dump([{"workload": n, "contender": c, "s": float(s), "cpu_s": float(cpu)} for n, c, s, cpu in rows],
          open(os.path.join(out, "cold.json"), "w"), indent=1)
PY
