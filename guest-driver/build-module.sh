#!/usr/bin/env bash
# build-module.sh - build the vtmem kernel module (vtmem.ko).
#
# Usage: guest-driver/build-module.sh [--kdir KDIR] [--clippy]
#
#   * KDIR is the guest kernel build tree; by default the one
#     guest-driver/build-kernel.sh builds or finds in its cache (the last
#     line it prints);
#   * builds out of the source directory (Kbuild's MO=), into
#     ${XDG_CACHE_HOME:-$HOME/.cache}/vtmem/module-<hash>, where <hash>
#     covers KDIR and the module's sources (including the protocol's
#     wire.rs, which the module compiles);
#   * the last line on stdout is the path of vtmem.ko; progress on stderr;
#   * --clippy: instead, lint the module: build it with `make CLIPPY=1 W=e`
#     (the kernel's and the workspace's lints, see Kbuild, with warnings
#     denied) in a scratch directory; fails on any warning, prints nothing
#     on stdout.

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/vtmem"
kdir=
clippy=0

log() { printf 'build-module: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --kdir) kdir=$2; shift ;;
        --kdir=*) kdir=${1#--kdir=} ;;
        --clippy) clippy=1 ;;
        -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
    shift
done

if [ -z "$kdir" ]; then
    kdir=$("$here/build-kernel.sh" | tail -n1)
fi
[ -f "$kdir/Module.symvers" ] || die "$kdir is not a built kernel tree"

[ -d "$HOME/.cargo/bin" ] && PATH="$HOME/.cargo/bin:$PATH"
export LIBCLANG_PATH=${LIBCLANG_PATH:-/usr/lib/llvm-19/lib}

sources=("$here/Kbuild" "$here/vtmem.rs" "$here"/src/*.rs "$here"/src/*/*.rs "$repo/protocol/src/wire.rs")
key=$( {
    printf '%s\n' "$kdir"
    stat -c %Y "$kdir/Module.symvers"
    sha256sum "${sources[@]}" | awk '{ print $1 }'
} | sha256sum | cut -c1-16)
out="$cache/module-$key"

if [ "$clippy" = 1 ]; then
    scratch="$cache/clippy-$key"
    # A failed run leaves its directory for inspection until the next run.
    rm -rf "$cache"/clippy-*
    mkdir -p "$scratch"
    log "clippy against $kdir"
    status=0
    make -C "$kdir" M="$here" MO="$scratch" LLVM=-19 CLIPPY=1 W=e modules \
        >"$scratch/build.log" 2>&1 || status=$?
    cat "$scratch/build.log" >&2
    # -Dwarnings makes a warning fail the build; a warning that still got
    # through (say from C) fails here.
    if [ "$status" -ne 0 ] || grep -q 'warning:' "$scratch/build.log"; then
        die "clippy found problems (see above)"
    fi
    rm -rf "$scratch"
    log "clippy: no warnings"
    exit 0
fi

if [ -f "$out/vtmem.ko" ]; then
    log "cached: $out/vtmem.ko"
    printf '%s\n' "$out/vtmem.ko"
    exit 0
fi

mkdir -p "$out"
log "building against $kdir"
make -C "$kdir" M="$here" MO="$out" LLVM=-19 modules >&2 \
    || die "module build failed"
[ -f "$out/vtmem.ko" ] || die "no vtmem.ko was produced"

# Keep the newest few builds.
# shellcheck disable=SC2012
ls -1dt "$cache"/module-*/ 2>/dev/null | tail -n +6 | while read -r old; do
    rm -rf "${old%/}"
done

printf '%s\n' "$out/vtmem.ko"
