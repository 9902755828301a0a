#!/usr/bin/env bash
# build-qemu.sh - build qemu-system-x86_64 with the vtmem device patches.
#
# Usage: qemu/build-qemu.sh [--force] [--jobs N]
#
#   * installs the build dependencies (Debian packages via
#     scripts/apt-setup.sh; meson and pycotap in a virtualenv of its own in
#     the cache, because QEMU's configure does not download anything);
#   * fetches Debian's QEMU source (`apt-get source --download-only
#     qemu/trixie`) and unpacks the upstream (+ds) tarball;
#   * applies qemu/patches/*.patch in order;
#   * configures the x86_64-softmmu target only, with TCG, KVM and vhost-user,
#     builds with ninja and installs into the cache. The +ds tarball ships no
#     firmware, so edk2 unpacking is switched off and the BIOS and option ROMs
#     of Debian's `seabios` and `qemu-system-data` are copied next to the
#     binary's data directory (no -L option is needed).
#
# Output goes to ${XDG_CACHE_HOME:-$HOME/.cache}/vtmem/qemu-<hash>, where
# <hash> covers the patches, this script and the source version. A run whose
# output is complete does nothing but print the path. Progress goes to
# stderr; the last line on stdout is the path of qemu-system-x86_64.
#
# Environment:
#   XDG_CACHE_HOME        cache root (default ~/.cache)
#   VTMEM_QEMU_SUITE      suite to take the source from (default trixie)
#   VTMEM_QEMU_KEEP       installed versions to keep (default 3)
#   VTMEM_QEMU_KEEP_BUILD=1  keep the build tree after installing

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
script="$here/$(basename "${BASH_SOURCE[0]}")"
patch_dir="$here/patches"

cache="${XDG_CACHE_HOME:-$HOME/.cache}/vtmem"
suite=${VTMEM_QEMU_SUITE:-trixie}
jobs=$(nproc)
force=0

log() { printf 'build-qemu: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --force) force=1 ;;
        --jobs) jobs=$2; shift ;;
        --jobs=*) jobs=${1#--jobs=} ;;
        -h|--help) sed -n '2,30p' "$script" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
    shift
done

# shellcheck source=../scripts/apt-setup.sh
. "$repo/scripts/apt-setup.sh"

patches=()
if compgen -G "$patch_dir/*.patch" >/dev/null; then
    patches=("$patch_dir"/*.patch)
fi

# --- source version: resolved from the local lists, no download -------------
dsc_name() {
    apt-get source --print-uris "qemu/$suite" 2>/dev/null \
        | awk '$2 ~ /\.dsc$/ { print $2; exit }'
}
dsc=$(dsc_name || true)
if [ -z "$dsc" ]; then
    vtmem_apt_setup
    dsc=$(dsc_name || true)
fi
[ -n "$dsc" ] || die "no qemu source package in $suite (is deb-src for $suite configured?)"
version=${dsc#qemu_}; version=${version%.dsc}

key=$( {
    printf 'qemu %s\n' "$version"
    sha256sum "$script" | awk '{ print $1 }'
    for p in "${patches[@]}"; do
        printf 'patch %s ' "$(basename "$p")"; sha256sum "$p" | awk '{ print $1 }'
    done
} | sha256sum | cut -c1-16)
out="$cache/qemu-$key"
bin="$out/bin/qemu-system-x86_64"

if [ "$force" -eq 0 ] && [ -f "$out/.vtmem-complete" ] && [ -x "$bin" ]; then
    log "cached: $bin"
    printf '%s\n' "$bin"
    exit 0
fi

# One build at a time; a second caller waits and then finds the result.
mkdir -p "$cache"
exec 9>"$cache/.build-qemu.lock"
if ! flock -n 9; then
    log "waiting for another build-qemu.sh to finish"
    flock 9
fi
if [ "$force" -eq 0 ] && [ -f "$out/.vtmem-complete" ] && [ -x "$bin" ]; then
    log "cached: $bin"
    printf '%s\n' "$bin"
    exit 0
fi

t0=$SECONDS

# --- dependencies ---------------------------------------------------------------
vtmem_apt_install build-essential pkg-config ninja-build libglib2.0-dev \
    libpixman-1-dev python3-venv libfdt-dev seabios qemu-system-data \
    dpkg-dev xz-utils patch

venv="$cache/qemu-venv"
if ! "$venv/bin/python3" -c 'import mesonbuild, pycotap' 2>/dev/null \
    || [ "$("$venv/bin/meson" --version 2>/dev/null)" != "1.5.0" ]; then
    log "creating the build virtualenv in $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q meson==1.5.0 pycotap==1.3.1 >&2
fi

# --- source ------------------------------------------------------------------------
dl="$cache/downloads/qemu"
mkdir -p "$dl"
upstream=${version#*:}; upstream=${upstream%-*}
orig=$(ls "$dl/qemu_${upstream}.orig.tar."* 2>/dev/null | head -n1 || true)
if [ -z "$orig" ]; then
    log "downloading the qemu $version source"
    (cd "$dl" && apt-get source --download-only "qemu/$suite" >&2)
    orig=$(ls "$dl/qemu_${upstream}.orig.tar."* | head -n1)
fi

work="$cache/qemu-build-$key"
rm -rf "$work" "$out"
mkdir -p "$work"
log "unpacking $(basename "$orig")"
tar -xf "$orig" -C "$work" --strip-components=1 --no-same-owner

for p in "${patches[@]}"; do
    log "applying $(basename "$p")"
    patch -d "$work" -p1 --forward --batch --no-backup-if-mismatch -s < "$p" >&2 \
        || die "$(basename "$p") does not apply"
done

# The +ds tarball has no firmware blobs: do not unpack the edk2 images.
grep -q '^    unpack_edk2_blobs = bzip2.found()$' "$work/meson.build" \
    || die "meson.build changed: cannot switch off edk2 unpacking"
sed -i 's/^    unpack_edk2_blobs = bzip2.found()$/    unpack_edk2_blobs = false/' "$work/meson.build"

# --- configure, build, install --------------------------------------------------
ts=$SECONDS
mkdir -p "$work/build"
log "configuring"
(cd "$work/build" && ../configure \
    --prefix="$out" \
    --python="$venv/bin/python3" \
    --target-list=x86_64-softmmu \
    --disable-docs --disable-werror --without-default-features \
    --enable-kvm --enable-tcg --enable-vhost-user \
    --disable-install-blobs --disable-download >&2)
t_conf=$((SECONDS - ts))

ts=$SECONDS
log "building with ninja -j$jobs (about 5 minutes on 2 cores)"
# Only the emulator: `ninja` alone would also build the unit and qtest
# programs, a third of the work.
ninja -C "$work/build" -j"$jobs" qemu-system-x86_64 >&2
t_build=$((SECONDS - ts))
log "installing into $out"
install -D -m 0755 "$work/build/qemu-system-x86_64" "$bin"

# The data directory compiled into the binary is $out/share/qemu: put the
# x86 firmware there (SeaBIOS, VGA BIOSes, option ROMs for -kernel
# booting, iPXE ROMs), taken from Debian's seabios and qemu-system-data.
fw="$out/share/qemu"
mkdir -p "$fw"
for src in /usr/share/seabios /usr/share/qemu; do
    for f in "$src"/bios*.bin "$src"/vgabios*.bin "$src"/kvmvapic.bin \
             "$src"/linuxboot*.bin "$src"/multiboot*.bin "$src"/pvh.bin \
             "$src"/qboot.rom "$src"/efi-*.rom "$src"/pxe-*.rom; do
        [ -f "$f" ] || continue
        name=$(basename "$f")
        [ -e "$fw/$name" ] || cp -L "$f" "$fw/$name"
    done
done
cp -r "$work/pc-bios/keymaps" "$fw/keymaps"

# --- check ---------------------------------------------------------------------------
devices=$("$bin" -device help 2>&1 | grep -o '"vhost-user-tmem[a-z-]*"' | tr '\n' ' ')
case "$devices" in
    *'"vhost-user-tmem"'*'"vhost-user-tmem-pci"'*|*'"vhost-user-tmem-pci"'*'"vhost-user-tmem"'*) ;;
    *) die "the built QEMU does not list the tmem devices (got: ${devices:-none})" ;;
esac
log "devices: $devices"

printf 'configure %ss\nbuild %ss\ntotal %ss\n' "$t_conf" "$t_build" "$((SECONDS - t0))" \
    > "$out/.vtmem-times"
printf '%s\n' "$version" > "$out/.vtmem-source-version"
: > "$out/.vtmem-complete"
[ "${VTMEM_QEMU_KEEP_BUILD:-0}" = 1 ] || rm -rf "$work"
log "done in $((SECONDS - t0))s"

# Keep the newest $VTMEM_QEMU_KEEP (default 3) installed versions.
keep=${VTMEM_QEMU_KEEP:-3}
if [ "$keep" -gt 0 ]; then
    # shellcheck disable=SC2012
    ls -1dt "$cache"/qemu-*/ 2>/dev/null | grep -E '/qemu-[0-9a-f]{16}/$' \
        | tail -n +"$((keep + 1))" | while read -r old; do
            old=${old%/}
            [ "$old" = "$out" ] && continue
            log "pruning $old"
            rm -rf "$old"
        done
fi

printf '%s\n' "$bin"
