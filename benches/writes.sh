#!/usr/bin/env bash
# The write workloads users run on a mount, each on a native directory and on simfs in the
# same run, through a delay proxy (default 5 ms round trip, Azure's in-region order):
#
#   pip      python -m venv + pip install --no-index numpy requests (local wheels)
#   build    autoreconf + configure + make of a small C project (60 sources)
#   clone    git clone --no-local of a repository of COMMITS (default 3,000) commits
#   stream   1 GiB written with dd bs=1M, no fsync (the close included)
#   fio      1 GiB written sequentially by fio (bs=1M, psync, no fsync): the write
#            syscalls' own throughput, which fio reports, against the same on native
#   zero     1 GiB from /dev/zero with dd bs=1M into a new file, no fsync: the write syscalls
#            of a write-only handle (dd's, torch.save's, pip's; fio opens its file read-write),
#            against native's page cache and the cache disk's O_DIRECT writes
#   dd       1 GiB written with dd bs=1M conv=fsync, beside the Azure SDK for Python's
#            upload_blob (max_concurrency=8) and rclone copyto of the same file
#   drain    after pip on the default (async) mount: `simfs sync` time and the requests the
#            proxy counted; the same pip on a `-o sync` mount for comparison
#
# pip, build and clone also run on the FUSE floor (when it can be built: `bench_fuse_floor`):
# libfuse's passthrough_ll over a folder on the same disk, long timeouts and the kernel's
# permission checks as simfs has them. What the floor adds to native is what any FUSE
# filesystem pays on this machine; what simfs adds to the floor is its own.
#
# Each workload starts on a mount with nothing pending (an untimed `simfs sync` after the one
# before). Before the first of stream, fio and zero, MEM_TOUCH_GIB (default 4; 0: skip) GiB of
# memory are touched once: this VM backs memory on first touch, and a 1 GiB write into
# untouched pages is several times slower for whichever side runs first. Ratios are simfs
# over native, measured one after the other in one run; the results land in OUT (default
# benches/results/writes): table.txt and writes.json. pip, build, clone and stream run ROUNDS
# times (default 1), native and simfs alternating, each round in a fresh folder: on a shared
# VM one pair can be off by a third, and the table gives each round's ratio and their sum's
# (the drain after each pip; the -o sync pip once).
#
#   bash benches/writes.sh
#   SERVICE_CPUS=1 bash benches/writes.sh   # Azurite and the proxy on CPU 1 only, the rest elsewhere
#   RTT_MS=5 COMMITS=3000 ONLY="pip dd" OUT=/tmp/w bash benches/writes.sh
#   ROUNDS=3 ONLY="pip build clone" bash benches/writes.sh
#   AZURITE_IN_MEMORY=1 ONLY="pip build clone" bash benches/writes.sh   # no pauses of Azurite's
#                                            # own (benches/lib.sh); small files only
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RTT_MS="${RTT_MS:-5}"; COMMITS="${COMMITS:-3000}"; ROUNDS="${ROUNDS:-1}"; ONLY="${ONLY:-pip build clone stream fio zero dd}"
OUT="${OUT:-$PWD/benches/results/writes}"
source benches/lib.sh
bash fuse-tests/setup.sh
bench_apt autoreconf:autoconf automake make git rclone fio
cargo build --release --quiet --bins
bin="$PWD/target/release"
mkdir -p "$OUT"
bench_workdir simfs-writes
mkdir -p "$work/native" "$work/async" "$work/sync"
bench_mount_point "$work/async"; bench_mount_point "$work/sync"
DELAY_PROXY_COUNTS="$work/counts.json" bench_service "$RTT_MS"
# The proxy writes its counts at most 50 ms late (delay_proxy.py).
requests() { sleep 0.1; python3 -c 'import json,sys; print(sum(json.load(open(sys.argv[1])).values()))' "$work/counts.json" 2>/dev/null || echo 0; }

echo "== inputs"
mkdir -p "$work/empty"; echo "simfs write bench" > "$work/empty/README"
sas_url=""
for c in w-async w-sync w-ref; do
  s="$("$bin/simfs-seed" --endpoint "$direct" --container "$c" --dir "$work/empty=" --print-sas racwdl)"
  [ "$c" = w-ref ] && sas_url="${s/$direct/$slow}"
done
# The wheels pip installs, and the reference uploader (the Azure SDK for Python).
bench_wheels
bench_fuse_floor
# A small autotools project: 60 sources.
proj="$work/cproj"; mkdir -p "$proj/src"
cat > "$proj/configure.ac" <<'AC'
AC_INIT([bench], [1.0])
AM_INIT_AUTOMAKE([foreign subdir-objects])
AC_PROG_CC
AC_CONFIG_FILES([Makefile])
AC_OUTPUT
AC
{ echo "bin_PROGRAMS = bench"; printf 'bench_SOURCES = src/main.c'; for i in $(seq 0 59); do printf ' src/m%d.c' "$i"; done; echo; } > "$proj/Makefile.am"
{ for i in $(seq 0 59); do echo "int m$i(int);"; done
  echo "int main(void) { int s = 0;"; for i in $(seq 0 59); do echo "s += m$i($i);"; done; echo "return s == 42; }"; } > "$proj/src/main.c"
for i in $(seq 0 59); do
  { echo "#include <string.h>"; echo "static int t$i[64];"
    echo "int m$i(int x) { for (int i = 0; i < 64; i++) t$i[i] = x * i; return (int)strlen(\"m$i\") + t$i[x % 64]; }"; } > "$proj/src/m$i.c"
done
# A repository of COMMITS commits over 400 files (fast-import: seconds to make).
repo="$work/repo"; git init -q -b main "$repo"
python3 - "$COMMITS" <<'PY' | git -C "$repo" fast-import --quiet
import random, sys
n = int(sys.argv[1]); rng = random.Random(7); mark = 0
for c in range(n):
    print("commit refs/heads/main")
    print(f"mark :{c + 1}")
    print(f"committer bench <bench@example.invalid> {1700000000 + c} +0000")
    msg = f"change {c}".encode(); print(f"data {len(msg)}"); print(msg.decode())
    if c: print(f"from :{c}")
    for _ in range(3 if c else 400):
        f = rng.randrange(400) if c else _
        body = "".join(f"line {rng.random()}\n" for _ in range(rng.randint(20, 200))).encode()
        print(f"M 644 inline src/f{f:03d}.txt"); print(f"data {len(body)}"); sys.stdout.flush()
        sys.stdout.buffer.write(body); print()
PY
git -C "$repo" checkout -q main 2>/dev/null || true
echo "   repository: $(git -C "$repo" rev-list --count main) commits, $(du -sh "$repo/.git" | cut -f1) of .git"
dd if=/dev/urandom of="$work/1g.bin" bs=1M count=1024 status=none

export AZURE_STORAGE_CONNECTION_STRING="UseDevelopmentStorage=true;BlobEndpoint=$slow"
# The Python SDK reads UseDevelopmentStorage as port 10000 whatever BlobEndpoint says: the
# development account spelled out, through the proxy.
sdk_cs="DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;BlobEndpoint=$slow"
"$bin/simfs" mount w-async "$work/async" --cache-dir "$work/cache-a"
"$bin/simfs" mount w-sync "$work/sync" --cache-dir "$work/cache-s" --sync

results="$work/results.txt"; : > "$results"
# The async mount's daemon, whose CPU each workload on it is charged.
daemon="$(pgrep -n -f "cache-dir $work/cache-a")" || { echo "bench: no daemon found for the async mount" >&2; exit 1; }
floor_pid=""
if [ -n "$floor_bin" ]; then
  mkdir -p "$work/floor-back"; bench_mount_point "$work/floor"
  "$floor_bin" -o cache=always,default_permissions,source="$work/floor-back" "$work/floor"
  floor_pid="$(pgrep -n -f "source=$work/floor-back")" || { echo "bench: the FUSE floor did not start" >&2; exit 1; }
fi
# run NAME TARGET_LABEL DIR COMMAND...: times COMMAND in DIR, records "NAME LABEL SECONDS
# REQUESTS ROUND JOB_CPU DAEMON_CPU" (ROUND: $round, 1 unless set; the CPU seconds of the
# command and its children, and of the async mount's daemon meanwhile, or the floor's for a
# run on the floor: with SERVICE_CPUS the daemon shares the workload's CPU, and its CPU
# seconds are part of simfs's wall time).
round=1
run() {
  local name="$1" label="$2" dir="$3"; shift 3
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  local r0 t0 t1 r1 c0 c1 job pid="$daemon"; [ "$label" = floor ] && pid="$floor_pid"
  r0="$(requests)"; c0="$(cpu_of "$pid")"; t0=$EPOCHREALTIME
  # In the command substitution's own shell, so the cd stays there; `time` of a subshell
  # would send its report into the log with the command's output.
  job="$( { TIMEFORMAT='%3U %3S'; time { cd "$dir" && "$@"; } > "$work/$name-$label.log" 2>&1; } 2>&1 )" \
    || { echo "$name on $label failed:" >&2; tail -5 "$work/$name-$label.log" >&2; return 1; }
  t1=$EPOCHREALTIME; c1="$(cpu_of "$pid")"; r1="$(requests)"
  awk -v n="$name" -v l="$label" -v a="$t0" -v b="$t1" -v r=$((r1 - r0)) -v k="$round" -v j="$job" -v c0="$c0" -v c1="$c1" \
    'BEGIN { split(j, u, " "); printf "%s %s %.2f %d %d %.2f %.2f\n", n, l, b - a, r, k, u[1] + u[2], c1 - c0 }' | tee -a "$results"
}
pip_job() { python3 -m venv venv && venv/bin/pip install -q --disable-pip-version-check --no-index --find-links "$wheels" numpy requests && venv/bin/python -c 'import numpy, requests'; }
build_job() { cp -r "$proj" proj && cd proj && autoreconf -i >/dev/null 2>&1 && ./configure -q && make -s -j2; }
clone_job() { git clone -q --no-local "$repo" clone; }
stream_job() { dd if="$work/1g.bin" of=1g.bin bs=1M status=none; }
fio_job() { fio --name=seqwrite --filename=fio.bin --rw=write --bs=1M --size=1G --ioengine=psync --end_fsync=0 --output-format=json --output=fio.json; }
zero_job() { dd if=/dev/zero of=zero.bin bs=1M count=1024 status=none; }
dd_job() { dd if="$work/1g.bin" of=1g.bin bs=1M conv=fsync status=none; }

touched=""
for w in $ONLY; do
  echo "== $w"
  rounds=1; case "$w" in pip|build|clone|stream) rounds="$ROUNDS" ;; esac
  if [ -z "$touched" ]; then case "$w" in stream|fio|zero)
    # This VM backs guest memory on first touch (BENCHMARKS, "Cold reads and this VM's
    # memory"): the first GiB written into fresh pages took 1.42 s native, the next 0.42 s.
    # Whichever side of a 1 GiB write ran first paid that; touch the memory once before.
    cold_start "${MEM_TOUCH_GIB:-4}"; touched=1 ;;
  esac; fi
  for round in $(seq "$rounds"); do
  sides="native async"
  case "$w" in pip|build|clone) [ -n "$floor_pid" ] && sides="native floor async" ;; esac
  for t in $sides; do
    d="$work/$t/$w"; [ "$rounds" -gt 1 ] && d="$d/$round"
    mkdir -p "$d"
    run "$w" "$t" "$d" "${w}_job"
  done
  case "$w" in
    stream|fio|zero)
      # Its upload goes on after close: let it finish before the next workload.
      "$bin/simfs" sync "$work/async" >/dev/null
      if [ "$w" = zero ]; then
        mkdir -p "$work/disk/zero"
        run zero disk "$work/disk/zero" dd if=/dev/zero of=zero.bin bs=1M count=1024 oflag=direct status=none
        rm -f "$work/disk/zero/zero.bin"
      fi
      if [ "$w" = fio ]; then
        # The cache disk's own throughput: the same writes with O_DIRECT, past the page cache.
        mkdir -p "$work/disk/fio"
        (cd "$work/disk/fio" && fio --name=disk --filename=fio.bin --rw=write --bs=1M --size=1G \
          --ioengine=psync --direct=1 --output-format=json --output=fio.json && rm -f fio.bin)
        for t in native disk async; do
          python3 -c 'import json,sys; print("fiobw", sys.argv[2], json.load(open(sys.argv[1]))["jobs"][0]["write"]["bw_bytes"] / 2**20, 0, 1, 0, 0)' \
            "$work/$t/fio/fio.json" "$t" | tee -a "$results"
        done
      fi ;;
    build|clone)
      # Each workload starts with nothing pending: the next one's time is its own, not
      # that of this one's uploads (pip's drain is timed below).
      "$bin/simfs" sync "$work/async" >/dev/null ;;
    pip)
      # What the async mount still owes the container, and what it costs to pay it.
      run drain async "$work/async/pip" "$bin/simfs" sync .
      if [ "$round" = 1 ]; then mkdir -p "$work/sync/pip"; run pip sync "$work/sync/pip" pip_job; fi ;;
    dd)
      if [ -x "$work/sdk/bin/python" ] && "$work/sdk/bin/python" -c 'import azure.storage.blob' 2>/dev/null; then
        run dd sdk "$work" "$work/sdk/bin/python" -c '
import sys
from azure.storage.blob import BlobClient
c = BlobClient.from_connection_string(sys.argv[1], "w-ref", "sdk-1g.bin")
with open(sys.argv[2], "rb") as f:
    c.upload_blob(f, overwrite=True, max_concurrency=8)' "$sdk_cs" "$work/1g.bin"
      fi
      RCLONE_CONFIG_AZ_TYPE=azureblob RCLONE_CONFIG_AZ_SAS_URL="$sas_url" \
        run dd rclone "$work" rclone copyto "$work/1g.bin" az:w-ref/rclone-1g.bin --azureblob-upload-concurrency 8 ;;
  esac
  done
done
"$bin/simfs" unmount "$work/async"
"$bin/simfs" unmount "$work/sync"
[ -n "$floor_pid" ] && fusermount3 -u "$work/floor"

python3 - "$results" "$OUT" "$RTT_MS" "${SERVICE_CPUS:-}" <<'PY' | tee "$OUT/table.txt"
import json, sys, os
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
# Summed over rounds; each round's own figures kept for the per-round ratios.
r, each, cpu = {}, {}, {}
for n, t, s, q, k, j, d in rows:
    a = r.get((n, t), (0.0, 0))
    r[(n, t)] = (a[0] + float(s), a[1] + int(q))
    each.setdefault((n, t), []).append(float(s))
    c = cpu.get((n, t), (0.0, 0.0))
    cpu[(n, t)] = (c[0] + float(j), c[1] + float(d))
out, rtt = sys.argv[2], sys.argv[3]
iso = sys.argv[4]
print(f"write workloads, {rtt} ms round trip; seconds (requests the proxy counted)"
      + (f"; service on CPU {iso}, workloads on the others" if iso else "; service and workloads share the CPUs"))
for w in ["pip", "build", "clone", "stream", "fio", "zero", "dd"]:
    if (w, "native") not in r:
        continue
    n, a = r[(w, "native")][0], r.get((w, "async"))
    rounds = len(each[(w, "native")])
    line = f"{w:6} native {n:7.2f} s   simfs {a[0]:7.2f} s ({a[1]} requests) = {a[0] / n:.2f}x"
    if rounds > 1 and len(each.get((w, "async"), [])) == rounds:
        per = " ".join(f"{b / x:.2f}x" for x, b in zip(each[(w, "native")], each[(w, "async")]))
        line += f" summed over {rounds} rounds; each round: {per}"
    if w in ("pip", "build", "clone", "stream"):
        line += (f";  CPU-s: the job {cpu[(w, 'native')][0]:.2f} native, {cpu[(w, 'async')][0]:.2f} on simfs,"
                 f" simfs's daemon {cpu[(w, 'async')][1]:.2f}")
    if (w, "floor") in r:
        f = r[(w, "floor")][0]
        line += (f"\n       FUSE floor (libfuse passthrough_ll) {f:7.2f} s = {f / n:.2f}x native; simfs = {a[0] / f:.2f}x the floor;"
                 f"  CPU-s: the job {cpu[(w, 'floor')][0]:.2f}, the floor's daemon {cpu[(w, 'floor')][1]:.2f}")
    if w == "dd":
        for ref in ["sdk", "rclone"]:
            if (w, ref) in r:
                line += f";  {ref} upload {r[(w, ref)][0]:.2f} s (simfs = {a[0] / r[(w, ref)][0]:.2f}x)"
    print(line)
if ("fiobw", "native") in r and ("fiobw", "async") in r:
    n, a = r[("fiobw", "native")][0], r[("fiobw", "async")][0]
    print(f"fio    write syscalls: native {n:.0f} MiB/s, simfs {a:.0f} MiB/s = {a / n:.2f}x of native's throughput")
    if ("fiobw", "disk") in r:
        d = r[("fiobw", "disk")][0]
        print(f"       the cache disk itself (O_DIRECT): {d:.0f} MiB/s; simfs = {a / d:.2f}x of it")
if ("zero", "native") in r and ("zero", "async") in r:
    n, a = 1024 / r[("zero", "native")][0], 1024 / r[("zero", "async")][0]
    print(f"zero   write syscalls of a write-only handle: native {n:.0f} MiB/s, simfs {a:.0f} MiB/s = {a / n:.2f}x of native's throughput")
    if ("zero", "disk") in r:
        d = 1024 / r[("zero", "disk")][0]
        print(f"       the cache disk itself (O_DIRECT): {d:.0f} MiB/s; simfs = {a / d:.2f}x of it")
if ("drain", "async") in r:
    d, s = r[("drain", "async")], r.get(("pip", "sync"))
    drains = len(each[("drain", "async")])
    print(f"drain  simfs sync after pip: {d[0]:.2f} s, {d[1]} requests"
          + (f" (after {drains} pips)" if drains > 1 else "")
          + (f";  pip on a -o sync mount: {s[0]:.2f} s ({s[1]} requests)" if s else ""))
json.dump([{"workload": n, "target": t, "s": float(s), "requests": int(q), "round": int(k),
            "job_cpu_s": float(j), "daemon_cpu_s": float(d)}
           for n, t, s, q, k, j, d in rows],
          open(os.path.join(out, "writes.json"), "w"), indent=1)
PY
