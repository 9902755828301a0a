#!/usr/bin/env bash
# build-kernel.sh - build the vtmem guest kernel (Linux 7.3 with Rust support).
#
# Usage: guest-driver/build-kernel.sh [--force] [--jobs N]
#
#   * installs the toolchain it needs (Debian packages via scripts/apt-setup.sh,
#     rustup's rust-src component, bindgen-cli via cargo when missing);
#   * downloads Debian's linux-source-7.3 (trixie-backports) with
#     `apt-get download` and unpacks it with dpkg-deb;
#   * applies guest-driver/patches/*.patch in order;
#   * merges guest-driver/kernel.config onto tinyconfig, runs olddefconfig and
#     fails if an option of the fragment did not end up set as written;
#   * builds bzImage and modules in the source tree.
#
# The tree is kept in ${XDG_CACHE_HOME:-$HOME/.cache}/vtmem/kernel-<hash>,
# where <hash> covers the patches, the fragment, this script and the source
# package version. A run whose tree is complete does nothing. A new hash
# starts from a copy of the newest complete tree of the same source version
# (old patches reverted, new ones applied) so that make only rebuilds what
# the change touched; set VTMEM_KERNEL_NO_SEED=1 to build from scratch.
#
# Progress goes to stderr. The last line on stdout is the kernel build
# directory (KDIR), usable as `make -C KDIR M=... LLVM=-19 modules`.
#
# Environment:
#   XDG_CACHE_HOME           cache root (default ~/.cache)
#   VTMEM_KERNEL_PACKAGE     source package (default linux-source-7.3)
#   VTMEM_KERNEL_SUITE       suite to take it from (default trixie-backports)
#   VTMEM_KERNEL_KEEP        complete trees to keep (default 3)
#   VTMEM_KERNEL_NO_SEED=1   never start from a previous tree

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
script="$here/$(basename "${BASH_SOURCE[0]}")"
fragment="$here/kernel.config"
patch_dir="$here/patches"

cache="${XDG_CACHE_HOME:-$HOME/.cache}/vtmem"
pkg=${VTMEM_KERNEL_PACKAGE:-linux-source-7.3}
suite=${VTMEM_KERNEL_SUITE:-trixie-backports}
keep=${VTMEM_KERNEL_KEEP:-3}
llvm=-19
jobs=$(nproc)
force=0

log() { printf 'build-kernel: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --force) force=1 ;;
        --jobs) jobs=$2; shift ;;
        --jobs=*) jobs=${1#--jobs=} ;;
        -h|--help) sed -n '2,35p' "$script" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
    shift
done

# shellcheck source=../scripts/apt-setup.sh
. "$repo/scripts/apt-setup.sh"

patches=()
if compgen -G "$patch_dir/*.patch" >/dev/null; then
    for p in "$patch_dir"/*.patch; do
        # 0000-cover-letter.patch carries no diff; skip it.
        grep -q '^diff ' "$p" && patches+=("$p")
    done
fi

# --- source version (from the local package lists; no network) -------------
source_version() {
    local v
    v=$(apt-cache show "$pkg/$suite" 2>/dev/null | awk '/^Version:/ { print $2; exit }') || true
    if [ -z "$v" ]; then
        vtmem_apt_setup
        v=$(apt-cache show "$pkg/$suite" 2>/dev/null | awk '/^Version:/ { print $2; exit }') || true
    fi
    [ -n "$v" ] || die "cannot find $pkg in $suite"
    printf '%s\n' "$v"
}
version=$(source_version)

key=$( {
    printf 'package %s %s\nllvm %s\n' "$pkg" "$version" "$llvm"
    sha256sum "$script" "$fragment" | awk '{ print $1 }'
    for p in "${patches[@]}"; do
        printf 'patch %s ' "$(basename "$p")"; sha256sum "$p" | awk '{ print $1 }'
    done
} | sha256sum | cut -c1-16)
out="$cache/kernel-$key"
kdir="$out/linux"

if [ "$force" -eq 0 ] && [ -f "$out/.vtmem-complete" ]; then
    log "cached: $kdir"
    printf '%s\n' "$kdir"
    exit 0
fi

# One build at a time; a second caller waits and then finds the result.
mkdir -p "$cache"
exec 9>"$cache/.build-kernel.lock"
if ! flock -n 9; then
    log "waiting for another build-kernel.sh to finish"
    flock 9
fi
if [ "$force" -eq 0 ] && [ -f "$out/.vtmem-complete" ]; then
    log "cached: $kdir"
    printf '%s\n' "$kdir"
    exit 0
fi

# --- toolchain ---------------------------------------------------------------
[ -d "$HOME/.cargo/bin" ] && PATH="$HOME/.cargo/bin:$PATH"
vtmem_apt_install clang-19 libclang-19-dev lld-19 llvm-19 flex bison bc \
    libelf-dev libssl-dev cpio busybox-static make xz-utils patch dpkg-dev
export LIBCLANG_PATH=/usr/lib/llvm-19/lib

command -v rustc >/dev/null || die "rustc not found (install rustup, toolchain stable)"
if [ ! -d "$(rustc --print sysroot)/lib/rustlib/src/rust/library" ]; then
    log "adding rustup component rust-src"
    rustup component add rust-src >&2
fi
if ! command -v bindgen >/dev/null; then
    log "installing bindgen-cli (a few minutes)"
    cargo install bindgen-cli --locked >&2
fi

kmake() { make -C "$kdir" LLVM="$llvm" "$@" >&2; }

stage() { [ -f "$out/.vtmem-$1" ]; }
mark() { : > "$out/.vtmem-$1"; }
t0=$SECONDS
stamp_time() { printf '%s %ss\n' "$1" "$((SECONDS - $2))" >> "$out/.vtmem-times"; }

# --- patching helpers ----------------------------------------------------------
apply_patches() {    # apply the patches after the first $1 (default 0)
    local p n=0 keep=${1:-0}
    mkdir -p "$out/patches"
    for p in "${patches[@]}"; do
        n=$((n + 1))
        [ "$n" -le "$keep" ] && continue
        log "applying $(basename "$p")"
        patch -d "$kdir" -p1 --forward --batch --no-backup-if-mismatch -s < "$p" >&2 \
            || die "$(basename "$p") does not apply"
        cp "$p" "$out/patches/$(printf '%04d' "$n")-$(basename "$p")"
    done
}

shared_prefix() {    # how many of the seed's first patches equal ours, in order
    local n=0 p seeded
    for p in "${patches[@]}"; do
        seeded="$out/patches/$(printf '%04d' $((n + 1)))-$(basename "$p")"
        cmp -s "$p" "$seeded" || break
        n=$((n + 1))
    done
    printf '%s' "$n"
}

revert_patches() {   # revert the seed's patches after the first $1, newest first
    local p list keep=${1:-0}
    list=$(find "$out/patches" -name '*.patch' 2>/dev/null | sort -r)
    for p in $list; do
        [ "$((10#$(basename "$p" | cut -c1-4)))" -le "$keep" ] && continue
        patch -d "$kdir" -p1 -R --batch --no-backup-if-mismatch -s < "$p" >&2 || return 1
        rm -f "$p"
    done
}

newest_seed() {
    local d best="" best_t=0 t
    for d in "$cache"/kernel-*; do
        [ -f "$d/.vtmem-complete" ] || continue
        [ "$(cat "$d/.vtmem-source-version" 2>/dev/null)" = "$version" ] || continue
        [ "$d" = "$out" ] && continue
        t=$(stat -c %Y "$d/.vtmem-complete")
        if [ "$t" -gt "$best_t" ]; then best=$d; best_t=$t; fi
    done
    printf '%s' "$best"
}

# --- source tree ---------------------------------------------------------------
if [ "$force" -eq 1 ] || ! stage patched; then
    rm -rf "$out"
    mkdir -p "$out" "$cache/downloads"
    printf '%s\n' "$version" > "$out/.vtmem-source-version"

    seed=""
    [ "${VTMEM_KERNEL_NO_SEED:-0}" = 1 ] || [ "$force" -eq 1 ] || seed=$(newest_seed)
    if [ -n "$seed" ]; then
        ts=$SECONDS
        log "seeding from $seed"
        cp -a --reflink=auto "$seed/linux" "$kdir"
        cp -a "$seed/patches" "$out/patches"
        # Patches the seed shares with us stay applied, so their files keep
        # their timestamps and make rebuilds only what the others touch.
        keep=$(shared_prefix)
        log "keeping the seed's first $keep patch(es)"
        if revert_patches "$keep"; then
            apply_patches "$keep"
            printf '%s\n' "$seed" > "$out/.vtmem-seeded"
            stamp_time seed "$ts"
        else
            log "cannot revert the seed's patches; starting from scratch"
            rm -rf "$kdir" "$out/patches"
            seed=""
        fi
    fi
    if [ -z "$seed" ]; then
        ts=$SECONDS
        deb=$(ls "$cache/downloads/${pkg}_${version//:/%3a}_all.deb" 2>/dev/null || true)
        if [ -z "$deb" ]; then
            log "downloading $pkg $version"
            (cd "$cache/downloads" && apt-get download "$pkg=$version" >&2)
            deb=$(ls "$cache/downloads/${pkg}_${version//:/%3a}_all.deb")
        fi
        log "unpacking $(basename "$deb")"
        rm -rf "$out/deb"
        dpkg-deb -x "$deb" "$out/deb"
        tarball=$(ls "$out/deb/usr/src/"*.tar.* | head -n1)
        mkdir -p "$kdir"
        tar -xf "$tarball" -C "$kdir" --strip-components=1
        rm -rf "$out/deb"
        stamp_time extract "$ts"
        apply_patches
    fi
    rm -f "$out/.vtmem-configured"
    mark patched
fi

# --- configuration -------------------------------------------------------------
check_config() {
    local line opt val got bad=0
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=*)
                opt=${line%%=*}; val=${line#*=}
                got=$(grep -E "^${opt}=" "$kdir/.config" | head -n1 | cut -d= -f2- || true)
                if [ "$got" != "$val" ]; then
                    log "config: $opt wanted $val, got ${got:-<not set>}"; bad=1
                fi ;;
            "# CONFIG_"*" is not set")
                opt=${line#\# }; opt=${opt%% *}
                if grep -qE "^${opt}=" "$kdir/.config"; then
                    log "config: $opt wanted unset, got $(grep -E "^${opt}=" "$kdir/.config")"; bad=1
                fi ;;
        esac
    done < "$fragment"
    return "$bad"
}

if ! stage configured; then
    ts=$SECONDS
    log "checking the Rust toolchain"
    kmake rustavailable || die "make rustavailable failed: the kernel cannot use this Rust toolchain"
    log "configuring: tinyconfig + $(basename "$fragment")"
    kmake tinyconfig
    (cd "$kdir" && ./scripts/kconfig/merge_config.sh -m .config "$fragment" >&2)
    kmake olddefconfig
    check_config || die "options of $fragment were dropped by olddefconfig (see above)"
    stamp_time configure "$ts"
    rm -f "$out/.vtmem-complete"
    mark configured
fi

# --- build -----------------------------------------------------------------------
# A seeded tree sits at a new path. objtool is built with absolute paths,
# so it is relinked, and every object depends on the objtool binary's
# mtime: give the relinked binary (same sources) the old mtime back so
# that make only rebuilds what the patches and the config changed.
if [ -f "$out/.vtmem-seeded" ] && [ -x "$kdir/tools/objtool/objtool" ] \
    && ! grep -qE '^\+\+\+ b/tools/' "$out/patches"/*.patch "$(cat "$out/.vtmem-seeded")"/patches/*.patch 2>/dev/null; then
    touch -r "$kdir/tools/objtool/objtool" "$out/.vtmem-objtool-mtime"
    log "rebuilding objtool for the new tree path"
    kmake -j"$jobs" tools/objtool
    # Everything the relink produced gets the old mtime, so neither the
    # objtool build nor the objects see anything newer.
    find "$kdir/tools/objtool" -newer "$out/.vtmem-objtool-mtime" \
        -exec touch -h -r "$out/.vtmem-objtool-mtime" {} +
    rm -f "$out/.vtmem-seeded"
fi

ts=$SECONDS
log "building bzImage and modules with -j$jobs (about 10 minutes on 2 cores from scratch)"
kmake -j"$jobs" bzImage modules
stamp_time build "$ts"
[ -f "$kdir/arch/x86/boot/bzImage" ] || die "no bzImage was produced"
[ -f "$kdir/Module.symvers" ] || die "no Module.symvers was produced"
stamp_time total "$t0"
mark complete
log "done in $((SECONDS - t0))s: $kdir/arch/x86/boot/bzImage"

# --- prune: keep the newest $keep complete trees -----------------------------
if [ "$keep" -gt 0 ]; then
    # shellcheck disable=SC2012
    ls -1dt "$cache"/kernel-*/ 2>/dev/null | tail -n +"$((keep + 1))" | while read -r old; do
        old=${old%/}
        [ "$old" = "$out" ] && continue
        log "pruning $old"
        rm -rf "$old"
    done
fi

printf '%s\n' "$kdir"
