#!/usr/bin/env bash
# frontswap-smoke.sh - boot the guest kernel under QEMU with a RAM-backed
# frontswap backend (scripts/frontswap-smoke/fsmoke.c) and check that swap
# pages go through frontswap and come back intact.
#
# Usage: scripts/frontswap-smoke.sh [FSMOKE_PARAMS...]
#   e.g. scripts/frontswap-smoke.sh refuse_every=3 exclusive=1
#
# Builds (or takes from the cache) the kernel with guest-driver/build-kernel.sh
# and QEMU with qemu/build-qemu.sh (set VTMEM_QEMU to use another binary),
# builds the module and a static test program, packs a busybox initramfs
# and boots it with 256 MiB of RAM and a zram swap device. The backend
# keeps its pages in guest RAM, so memory pressure comes from a memory
# cgroup limit rather than from the size of RAM. Inside, it:
#   1. loads fsmoke (a second registration must fail with -EBUSY);
#   2. in a cgroup limited to 16 MiB: fills 48 MiB and keeps it, then
#      churns 64 MiB twice, all verified;
#   3. checks the frontswap counters moved and that rmmod is refused while
#      the backend holds pages;
#   4. lifts the limit, swapoff (pages come back through frontswap loads),
#      verifies the held data, checks nothing is left stored, and unloads
#      the module.
# Prints "SMOKE: PASS" and exits 0, or exits 1.

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
params="$*"

log() { printf 'frontswap-smoke: %s\n' "$*" >&2; }

kdir=$("$repo/guest-driver/build-kernel.sh" | tail -n1)
qemu=${VTMEM_QEMU:-$("$repo/qemu/build-qemu.sh" | tail -n1)}
export LIBCLANG_PATH=/usr/lib/llvm-19/lib

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

log "building fsmoke.ko and memtest"
cp "$here/frontswap-smoke/fsmoke.c" "$here/frontswap-smoke/Kbuild" "$work/"
make -C "$kdir" M="$work" LLVM=-19 modules >&2
gcc -O2 -Wall -static -o "$work/memtest" "$here/frontswap-smoke/memtest.c"

root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp}
cp /bin/busybox "$root/bin/busybox"
cp "$work/fsmoke.ko" "$work/memtest" "$root/"
cat > "$root/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t debugfs debugfs /sys/kernel/debug
fs=/sys/kernel/debug/frontswap
fail() { echo "SMOKE: FAIL: \$*"; grep . \$fs/* 2>/dev/null; poweroff -f; }
fsstat() { cat \$fs/\$1; }

insmod /fsmoke.ko $params || fail "insmod"
dmesg | grep -q "fsmoke: second register: -16" || fail "second registration not refused"
echo 256M > /sys/block/zram0/disksize || fail "zram"
mkswap /dev/zram0 >/dev/null && swapon /dev/zram0 || fail "swapon"

# Large folios (THP, 64 KiB mTHP): split on swap-out once a backend is
# registered; any large folio that still reaches frontswap goes to zram.
thp=/sys/kernel/mm/transparent_hugepage
[ -w \$thp/enabled ] && echo always > \$thp/enabled
[ -w \$thp/hugepages-64kB/enabled ] && echo always > \$thp/hugepages-64kB/enabled

mkdir -p /sys/fs/cgroup
mount -t cgroup2 none /sys/fs/cgroup || fail "cgroup2"
echo +memory > /sys/fs/cgroup/cgroup.subtree_control || fail "memory controller"
mkdir /sys/fs/cgroup/smoke
echo 16M > /sys/fs/cgroup/smoke/memory.max
echo \$\$ > /sys/fs/cgroup/smoke/cgroup.procs

/memtest 48 1 hold > /tmp/hold.log 2>&1 &
holder=\$!
while ! grep -q holding /tmp/hold.log; do
    kill -0 \$holder 2>/dev/null || { cat /tmp/hold.log; fail "holder died"; }
    sleep 1
done
/memtest 64 2 || fail "memtest 64"
echo "stats: stores \$(fsstat succ_stores) failed \$(fsstat failed_stores) loads \$(fsstat loads) invalidates \$(fsstat invalidates) stored \$(fsstat stored_pages)"
[ "\$(fsstat succ_stores)" -gt 0 ] || fail "no successful store"
[ "\$(fsstat loads)" -gt 0 ] || fail "no load"
[ "\$(fsstat stored_pages)" -gt 0 ] || fail "held pages not in the backend"
rmmod fsmoke 2>/dev/null && fail "rmmod succeeded while the backend holds pages"

echo max > /sys/fs/cgroup/smoke/memory.max
swapoff /dev/zram0 || fail "swapoff"
[ "\$(fsstat stored_pages)" -eq 0 ] || fail "pages left after swapoff"
kill -USR1 \$holder
wait \$holder || { cat /tmp/hold.log; fail "held data corrupted"; }
cat /tmp/hold.log
rmmod fsmoke || fail "rmmod after swapoff"
dmesg | grep -q "fsmoke: unregister: 0" || fail "unregister did not succeed"
dmesg | grep -E "WARNING|BUG|Oops|frontswap: load" && fail "kernel warnings"
echo "SMOKE: PASS"
poweroff -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/initramfs.gz"

accel=tcg
grep -qE '\b(vmx|svm)\b' /proc/cpuinfo && [ -w /dev/kvm ] && accel=kvm
log "booting ($accel)"
timeout 600 "$qemu" -accel "$accel" -m 256M -smp 2 -nographic -no-reboot -nic none \
    -kernel "$kdir/arch/x86/boot/bzImage" -initrd "$work/initramfs.gz" \
    -append "console=ttyS0 panic=-1 quiet" | tee "$work/console.log" >&2 || true

if grep -q "SMOKE: PASS" "$work/console.log"; then
    echo "SMOKE: PASS"
    exit 0
fi
log "failed"
exit 1
