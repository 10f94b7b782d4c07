#!/usr/bin/env bash
# CI check of the package: build the .deb, install it, and mount an Azurite container three
# ways — `simfs mount`, `mount -t fuse.simfs`, and an fstab line with `mount -a` — checking
# each serves the container and unmounts cleanly. Needs root (it installs the package and
# edits /etc/fstab); everything it changes is undone on exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ "$(id -u)" = 0 ] || { echo "test-deb: needs root" >&2; exit 1; }
bash fuse-tests/setup.sh
bash packaging/build-deb.sh >/dev/null
cargo build --quiet --bin simfs-seed
deb="$(ls -t target/debian/simfs_*.deb | head -1)"

work="$(mktemp -d /tmp/simfs-deb.XXXXXX)"
mkdir -p "$work/az" "$work/m1" "$work/m2" "$work/m3" /etc/simfs
cred=/etc/simfs/simfs-deb-test.conf
fstab_mark="# simfs-deb-test"
installed_before=$(dpkg-query -W -f='${Status}' simfs 2>/dev/null || true)
cleanup() {
  set +e
  for m in "$work/m1" "$work/m2" "$work/m3"; do
    grep -q " $m " /proc/mounts && /usr/bin/simfs unmount "$m"
  done
  sed -i "\|$fstab_mark|d" /etc/fstab
  rm -f "$cred"
  [ -n "${az_pid:-}" ] && kill "$az_pid" 2>/dev/null && wait "$az_pid" 2>/dev/null
  case "$installed_before" in *installed*) ;; *) dpkg -r simfs >/dev/null 2>&1 ;; esac
  rm -rf "$work"
}
trap cleanup EXIT

dpkg -i "$deb" >/dev/null
command -v simfs >/dev/null && [ -x /sbin/mount.fuse.simfs ] && man -w simfs >/dev/null 2>&1 || true
simfs --version

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
fuse-tests/node_modules/.bin/azurite-blob --blobHost 127.0.0.1 --blobPort "$port" \
  --location "$work/az" --skipApiVersionCheck --disableTelemetry --silent >/dev/null 2>&1 &
az_pid=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
endpoint="http://127.0.0.1:$port/devstoreaccount1"
echo "hello from the container" > "$work/hello.txt"
mkdir "$work/seed" && cp "$work/hello.txt" "$work/seed/"
"${CARGO_TARGET_DIR:-target}/debug/simfs-seed" --endpoint "$endpoint" --container debtest --dir "$work/seed=" >/dev/null
( umask 077; printf 'connection_string = "UseDevelopmentStorage=true;BlobEndpoint=%s"\n' "$endpoint" > "$cred" )

check() { # mountpoint, how
  grep -q " $1 " /proc/mounts || { echo "FAIL ($2): not mounted" >&2; exit 1; }
  cmp -s "$1/hello.txt" "$work/hello.txt" || { echo "FAIL ($2): wrong content" >&2; exit 1; }
  echo "written via $2" > "$1/via-$(basename "$1").txt"
  simfs unmount "$1"
  ! grep -q " $1 " /proc/mounts || { echo "FAIL ($2): still mounted" >&2; exit 1; }
  echo "ok: $2"
}

simfs mount debtest "$work/m1" --cache-dir "$work/c1" --credential-file "$cred"
check "$work/m1" "simfs mount"

mount -t fuse.simfs debtest "$work/m2" -o "cache_dir=$work/c2,credential_file=$cred,allow_other"
check "$work/m2" "mount -t fuse.simfs"

echo "debtest $work/m3 fuse.simfs _netdev,nofail,allow_other,cache_dir=$work/c3,credential_file=$cred 0 0 $fstab_mark" >> /etc/fstab
mount -a -t fuse.simfs
check "$work/m3" "fstab + mount -a"

# What the three mounts wrote is in the container: a fresh mount sees all of it.
simfs mount debtest "$work/m1" --cache-dir "$work/c4" --credential-file "$cred"
for f in via-m1.txt via-m2.txt via-m3.txt; do
  [ -s "$work/m1/$f" ] || { echo "FAIL: $f missing on a fresh mount" >&2; exit 1; }
done
simfs unmount "$work/m1"

# Bad options and credentials are refused with their reason.
out=$(mount -t fuse.simfs debtest "$work/m2" -o "cache_dir=$work/c2,credential_file=$cred,bogus_option" 2>&1) && exit 1
grep -q 'unknown mount option "bogus_option"' <<<"$out" || { echo "FAIL: $out" >&2; exit 1; }
chmod 644 "$cred"
out=$(mount -t fuse.simfs debtest "$work/m2" -o "cache_dir=$work/c2,credential_file=$cred" 2>&1) && exit 1
grep -q 'chmod 600' <<<"$out" || { echo "FAIL: $out" >&2; exit 1; }
echo "ok: bad options and a readable credential file are refused"
echo "test-deb: all checks passed"
