# Shared by the benchmark scripts (sourced, not run): a work directory cleaned up on exit
# (mounts under it unmounted, started processes stopped), Azurite behind the delay proxy on
# free loopback ports, and a memory-warming step for this kind of VM.
#
#   source benches/lib.sh
#   bench_workdir simfs-cold        # sets $work (after bench_settle); removed on exit
#   bench_service 5                 # sets $direct and $slow endpoints; DELAY_PROXY_COUNTS,
#                                   # SERVICE_CPUS (bench_isolate_service) and AZURITE_IN_MEMORY
#                                   # honoured
#   bench_apt fio autoreconf:autoconf   # installs missing Debian packages
#   bench_fuse_floor                # sets $floor_bin: libfuse's passthrough_ll, or empty

bench_pids=""
bench_mounts=()

bench_cleanup() {
  set +e
  for m in "${bench_mounts[@]}"; do
    grep -q " $m " /proc/mounts && { fusermount3 -u "$m" || umount -l "$m"; }
  done
  for p in $bench_pids; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  if [ -n "${work:-}" ]; then
    # Only a removal of many files is worth waiting for.
    if [ "$(find "$work" -xdev 2>/dev/null | head -1001 | wc -l)" -gt 1000 ]; then
      mkdir -p "$(dirname "$bench_removed")" && date +%s > "$bench_removed"
    fi
    rm -rf "$work"
  fi
}

# When a bench last removed its work folder (seconds since the epoch), for `bench_settle`.
bench_removed="$HOME/.cache/simfs-bench/last-removal"

# bench_settle: waits until INODE_SETTLE_SECONDS (default 360) have passed since a bench
# removed a work folder of more than 1,000 files. On ext4 without a journal (this VM's root
# filesystem, and a common choice for scratch NVMe), allocating an inode skips every inode
# of its block group freed in the last 60 s, or the last 360 s while the group's inode table
# has unwritten changes, which every create makes; each skip is a buffer-cache lookup. A
# run started right after another removed tens of thousands of files paid that on every
# create in its fresh cache folder (which ext4 placed among the freed inodes): 28 to 47 % of
# the daemon's CPU in a clone went to `recently_deleted`, and its CPU per clone doubled,
# while native clones into fresh folders of /tmp at the same time did not pay it
# (BENCHMARKS, eighteenth session).
bench_settle() {
  local last now left
  last="$(cat "$bench_removed" 2>/dev/null || true)"
  [[ "$last" =~ ^[0-9]+$ ]] || last=0
  now="$(date +%s)"
  left=$((last + ${INODE_SETTLE_SECONDS:-360} - now))
  if [ "$left" -gt 0 ]; then
    echo "bench: a run removed its work folder $((now - last)) s ago; waiting $left s for ext4 to stop skipping the freed inodes (INODE_SETTLE_SECONDS=0 does not wait)" >&2
    sleep "$left"
  fi
}

# bench_workdir NAME: a fresh $work directory, removed (mounts first) on exit; made once no
# removal by an earlier run can still slow its creates (`bench_settle`).
bench_workdir() {
  bench_settle
  work="$(mktemp -d "/tmp/$1.XXXXXX")"
  trap bench_cleanup EXIT
}

# bench_mount_point DIR: DIR is unmounted on exit if still mounted.
bench_mount_point() { mkdir -p "$1"; bench_mounts+=("$1"); }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.05; done; }

# bench_service RTT_MS: Azurite on a free port with its data in $work/az, and the delay proxy
# in front of it; sets direct= (Azurite) and slow= (through the proxy) endpoints.
# AZURITE_IN_MEMORY=1 keeps Azurite's data in memory instead, for runs of small files only
# (`ONLY="pip build clone"`). On disk, Azurite saves its whole blob index every 5 s and
# answers nothing meanwhile: with 20,000 blobs, small PUTs (one every 10 ms for 30 s) waited
# up to 773 ms, 8 of them over 100 ms; in memory the slowest took 13 ms. A real service never
# stops like that, and a native directory never waits for one, so the pauses only count
# against simfs (an fsync, a close on a `sync` mount, a cold read). But in memory Azurite
# could not take the GiB-sized workloads: after 3 GiB of `stream` its memory was at 7 GB and
# a 1 GiB upload got no answer for 68 s.
bench_service() {
  local az_port proxy_port store=(--location "$work/az")
  az_port="$(free_port)"; proxy_port="$(free_port)"
  if [ -n "${AZURITE_IN_MEMORY:-}" ]; then store=(--inMemoryPersistence); else mkdir -p "$work/az"; fi
  fuse-tests/node_modules/.bin/azurite-blob --blobHost 127.0.0.1 --blobPort "$az_port" \
    "${store[@]}" --skipApiVersionCheck --disableTelemetry --silent --loose >/dev/null 2>&1 &
  bench_pids="$bench_pids $!"
  python3 benches/delay_proxy.py "$proxy_port" "$az_port" "$1" &
  bench_pids="$bench_pids $!"
  wait_port "$az_port"; wait_port "$proxy_port"
  [ -n "${SERVICE_CPUS:-}" ] && bench_isolate_service "$SERVICE_CPUS"
  direct="http://127.0.0.1:$az_port/devstoreaccount1"
  slow="http://127.0.0.1:$proxy_port/devstoreaccount1"
}

# bench_isolate_service CPUS: Azurite and the proxy (every thread) on CPUS, this script and
# all it starts later (mounts, workloads, reference clients) on the other CPUs. On a small VM
# the emulated service otherwise takes its CPU from the workload beside it (Azurite spent
# 0.8 CPU-s during a 1.4 s git clone on 2 vCPUs), which a real, remote service never does.
# Native and simfs runs then have the same, smaller, set of CPUs.
bench_isolate_service() {
  local all rest p
  all="$(nproc --all)"
  rest="$(python3 -c 'import sys; s={int(c) for p in sys.argv[1].split(",") for c in (range(int(p.split("-")[0]), int(p.split("-")[-1]) + 1))}; print(",".join(str(c) for c in range(int(sys.argv[2])) if c not in s))' "$1" "$all")"
  [ -n "$rest" ] || { echo "bench: SERVICE_CPUS=$1 leaves no CPU for the workload" >&2; exit 1; }
  for p in $bench_pids; do taskset -a -p -c "$1" "$p" >/dev/null; done
  taskset -p -c "$rest" $$ >/dev/null
  echo "bench: service on CPU $1, workloads on CPU $rest" >&2
}

# bench_apt COMMAND[:PACKAGE]...: installs the Debian packages whose command is missing (the
# package is named like the command unless given).
bench_apt() {
  local need=() p
  for p in "$@"; do command -v "${p%%:*}" >/dev/null 2>&1 || need+=("${p##*:}"); done
  ((${#need[@]})) || return 0
  bench_apt_packages "${need[@]}"
}

# bench_apt_packages PACKAGE...: installs these Debian packages (for those that provide no
# command to look for, `bench_apt` otherwise).
bench_apt_packages() {
  local SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "bench: installing $*" >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

# bench_wheels: the numpy and requests wheels in $wheels (downloaded from PyPI once per
# machine, then never again: pip installs them with --no-index); and the reference client,
# the Azure SDK for Python, in a venv of its own at $work/sdk (skipped, with a warning, when
# PyPI cannot be reached).
bench_wheels() {
  wheels="${WHEELS:-$HOME/.cache/simfs-bench/wheels}"
  mkdir -p "$wheels"
  ls "$wheels"/numpy-*.whl >/dev/null 2>&1 && ls "$wheels"/requests-*.whl >/dev/null 2>&1 ||
    python3 -m pip download -q --only-binary=:all: --dest "$wheels" numpy requests
  python3 -m venv "$work/sdk"
  "$work/sdk/bin/pip" install -q --disable-pip-version-check --find-links "$wheels" azure-storage-blob ||
    echo "bench: no azure-storage-blob (PyPI unreachable?): the SDK reference is skipped" >&2
  "$work/sdk/bin/pip" download -q --disable-pip-version-check --dest "$wheels" azure-storage-blob >/dev/null 2>&1 || true
}

# bench_fuse_floor: libfuse's passthrough_ll example, the reference FUSE filesystem that
# answers every request by doing it again on a local folder and nothing else, built once per
# machine in ~/.cache/simfs-bench; sets floor_bin (empty, with a warning, when it cannot be
# fetched or built). A workload run through it shows what FUSE alone costs on this machine
# (every request a round trip through the kernel and two context switches), so a ratio of
# simfs to native can be read as FUSE's share and simfs's own. The source is libfuse 3.14.0's
# release as Debian ships it (deb.debian.org, the apt mirror this script already uses),
# checked against its SHA-256; the example builds against any libfuse3 since.
bench_fuse_floor() {
  local dir="$HOME/.cache/simfs-bench/fuse-floor-3.14.0"
  floor_bin=""
  if [ ! -x "$dir/passthrough_ll" ]; then
    bench_apt gcc pkg-config curl
    dpkg -s libfuse3-dev >/dev/null 2>&1 || bench_apt_packages libfuse3-dev
    # Each step chained (`set -e` does not apply inside a condition), in a subshell for its cd.
    # shellcheck disable=SC2046
    if ! (mkdir -p "$dir" && cd "$dir" &&
           curl -fsS -o orig.tar.xz http://deb.debian.org/debian/pool/main/f/fuse3/fuse3_3.14.0.orig.tar.xz &&
           echo "96115b2a8ff34bd1e0c7b00c5dfd8297571d7e165042b94498c9a26356a9a70a  orig.tar.xz" | sha256sum -c --quiet &&
           tar -xf orig.tar.xz --strip-components=2 fuse-3.14.0/example/passthrough_ll.c fuse-3.14.0/example/passthrough_helpers.h &&
           gcc -O2 -o passthrough_ll passthrough_ll.c $(pkg-config fuse3 --cflags --libs) &&
           rm -f orig.tar.xz) >/dev/null 2>&1; then
      echo "bench: could not fetch or build libfuse's passthrough_ll: the FUSE floor is skipped" >&2
      return 0
    fi
  fi
  floor_bin="$dir/passthrough_ll"
}

# cold_start: empties the page cache and touches GIB GiB (default 3) of memory first. This
# kind of VM backs guest memory on first touch: the first GiB written into fresh page cache
# ran at 70 MB/s here, the next at 2.2 GB/s, so a cold read measured on untouched memory
# measures the hypervisor. Every contender gets the same treatment before its run.
cold_start() {
  sync
  echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  python3 -c "bytearray(${1:-3} << 30)"
}

# cpu_of PID: the process's user + system CPU seconds so far.
cpu_of() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f\n", ($14 + $15) / hz }' "/proc/$1/stat"; }
