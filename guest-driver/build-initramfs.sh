#!/usr/bin/env bash
# build-initramfs.sh - build the vtmem test initramfs.
#
# Usage: guest-driver/build-initramfs.sh [--kdir KDIR] [--module vtmem.ko]
#
# Contents: busybox (Debian's busybox-static), vtmem.ko, the memtest
# program (tests/e2e/guest/memtest.c, built with gcc -static) and
# guest-driver/initramfs/init (see its header for the kernel command line
# it understands). The archive is made with the kernel tree's
# usr/gen_init_cpio, so no root is needed for device nodes.
#
# Output: ${XDG_CACHE_HOME:-$HOME/.cache}/vtmem/initramfs-<hash>.cpio.gz,
# <hash> covering every input. The last line on stdout is its path.

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/vtmem"
kdir=
module=

log() { printf 'build-initramfs: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --kdir) kdir=$2; shift ;;
        --kdir=*) kdir=${1#--kdir=} ;;
        --module) module=$2; shift ;;
        --module=*) module=${1#--module=} ;;
        -h|--help) sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
    shift
done

# shellcheck source=../scripts/apt-setup.sh
. "$repo/scripts/apt-setup.sh"
command -v gcc >/dev/null && [ -f /usr/lib/x86_64-linux-gnu/libc.a ] \
    || vtmem_apt_install gcc libc6-dev
[ -x /bin/busybox ] && /bin/busybox --list | grep -qx mkswap \
    || vtmem_apt_install busybox-static
busybox=/bin/busybox

if [ -z "$kdir" ]; then
    kdir=$("$here/build-kernel.sh" | tail -n1)
fi
if [ -z "$module" ]; then
    module=$("$here/build-module.sh" --kdir "$kdir" | tail -n1)
fi
gen="$kdir/usr/gen_init_cpio"
[ -x "$gen" ] || die "$gen missing (kernel built without BLK_DEV_INITRD?)"

init="$here/initramfs/init"
memtest_src="$repo/tests/e2e/guest/memtest.c"
key=$(sha256sum "$init" "$memtest_src" "$module" "$busybox" "${BASH_SOURCE[0]}" \
    | awk '{ print $1 }' | sha256sum | cut -c1-16)
out="$cache/initramfs-$key.cpio.gz"
if [ -f "$out" ]; then
    log "cached: $out"
    printf '%s\n' "$out"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log "compiling memtest"
gcc -O2 -static -Wall -o "$work/memtest" "$memtest_src" >&2

cat > "$work/list" <<LIST
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
nod /dev/null 0666 0 0 c 1 3
dir /proc 0755 0 0
dir /sys 0755 0 0
dir /tmp 1777 0 0
dir /bin 0755 0 0
dir /sbin 0755 0 0
dir /usr 0755 0 0
dir /usr/bin 0755 0 0
dir /usr/sbin 0755 0 0
dir /lib 0755 0 0
dir /lib/modules 0755 0 0
file /init $init 0755 0 0
file /bin/busybox $busybox 0755 0 0
slink /bin/sh busybox 0777 0 0
file /bin/memtest $work/memtest 0755 0 0
file /lib/modules/vtmem.ko $module 0644 0 0
LIST

mkdir -p "$cache"
"$gen" "$work/list" | gzip -9 > "$out.tmp"
mv "$out.tmp" "$out"
# shellcheck disable=SC2012
ls -1t "$cache"/initramfs-*.cpio.gz 2>/dev/null | tail -n +6 | xargs -r rm -f
log "built $out ($(du -h "$out" | cut -f1))"
printf '%s\n' "$out"
