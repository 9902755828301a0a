#!/usr/bin/env bash
# apt-setup.sh - make the Debian suites the vtmem builds need available.
#
# Usage:
#   scripts/apt-setup.sh                 configure suites (idempotent)
#   scripts/apt-setup.sh install PKG...  configure, then install PKGs that are
#                                        not installed yet (PKG may carry a
#                                        target release: pkg/trixie-backports)
#   source scripts/apt-setup.sh          define the functions only:
#                                        vtmem_apt_setup, vtmem_apt_install
#
# What it does:
#   * reads the mirror URI from the `URIs:` line of the bookworm stanza in
#     /etc/apt/sources.list.d/debian.sources (no mirror is hard-coded here);
#   * writes /etc/apt/sources.list.d/vtmem.sources with bookworm-backports,
#     trixie, trixie-backports (deb) and trixie (deb-src);
#   * pins trixie* to priority 100 in /etc/apt/preferences.d/vtmem-trixie so
#     nothing is upgraded from it unless asked for explicitly;
#   * runs `apt-get update` only when one of those files changed or when the
#     lists for the added suites are missing.
#
# Runs as root, or through sudo when not root.

set -euo pipefail

VTMEM_APT_SOURCES_IN=${VTMEM_APT_SOURCES_IN:-/etc/apt/sources.list.d/debian.sources}
VTMEM_APT_SOURCES_LIST=${VTMEM_APT_SOURCES_LIST:-/etc/apt/sources.list}
VTMEM_APT_SOURCES_OUT=${VTMEM_APT_SOURCES_OUT:-/etc/apt/sources.list.d/vtmem.sources}
VTMEM_APT_PREFS_OUT=${VTMEM_APT_PREFS_OUT:-/etc/apt/preferences.d/vtmem-trixie}

_vtmem_log() { printf 'apt-setup: %s\n' "$*" >&2; }

_vtmem_sudo() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        _vtmem_log "need root (or sudo) to run: $*"
        return 1
    fi
}

# Print the mirror URI of the stanza that serves plain `bookworm`.
_vtmem_mirror_uri() {
    if [ ! -r "$VTMEM_APT_SOURCES_IN" ]; then
        # One-line format fallback: "deb [opts] URI bookworm main".
        if [ -r "$VTMEM_APT_SOURCES_LIST" ]; then
            awk '$1 == "deb" { for (i = 2; i < NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/ && $(i+1) == "bookworm") { print $i; exit } }' \
                "$VTMEM_APT_SOURCES_LIST" | grep . && return 0
        fi
        _vtmem_log "cannot read $VTMEM_APT_SOURCES_IN"; return 1
    fi
    awk '
        function flush() {
            if (uri != "" && suites ~ /(^|[ \t])bookworm([ \t]|$)/ && found == "")
                found = uri
            uri = ""; suites = ""
        }
        /^[ \t]*$/          { flush(); next }
        /^[ \t]*#/          { next }
        tolower($1) == "uris:"   { uri = $2 }
        tolower($1) == "suites:" { $1 = ""; suites = $0 }
        END { flush(); if (found == "") exit 1; print found }
    ' "$VTMEM_APT_SOURCES_IN"
}

# Write $2 to file $1 only if its content differs; return 0 when it changed.
_vtmem_write_if_changed() {
    local path=$1 content=$2
    if [ -f "$path" ] && [ "$(cat "$path")" = "$content" ]; then
        return 1
    fi
    printf '%s\n' "$content" | _vtmem_sudo tee "$path" >/dev/null
    _vtmem_log "wrote $path"
    return 0
}

vtmem_apt_setup() {
    local uri keyring changed=0
    uri=$(_vtmem_mirror_uri) || {
        _vtmem_log "no URIs: line for bookworm in $VTMEM_APT_SOURCES_IN"; return 1; }
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg

    local sources
    sources="# Written by vtmem scripts/apt-setup.sh; mirror taken from ${VTMEM_APT_SOURCES_IN}.
Types: deb
URIs: ${uri}
Suites: bookworm-backports trixie trixie-backports
Components: main
Signed-By: ${keyring}

Types: deb-src
URIs: ${uri}
Suites: trixie trixie-backports
Components: main
Signed-By: ${keyring}"

    local prefs
    prefs="# Written by vtmem scripts/apt-setup.sh: take nothing from trixie unless asked.
Package: *
Pin: release n=trixie
Pin-Priority: 100

Package: *
Pin: release n=trixie-backports
Pin-Priority: 100"

    _vtmem_write_if_changed "$VTMEM_APT_SOURCES_OUT" "$sources" && changed=1
    _vtmem_write_if_changed "$VTMEM_APT_PREFS_OUT" "$prefs" && changed=1

    # Lists present for every suite we added?
    local suite missing=0
    for suite in bookworm-backports trixie trixie-backports; do
        if ! compgen -G "/var/lib/apt/lists/*_dists_${suite}_InRelease" >/dev/null; then
            missing=1
        fi
    done
    if ! compgen -G "/var/lib/apt/lists/*_dists_trixie_main_source_Sources*" >/dev/null; then
        missing=1
    fi

    if [ "$changed" -eq 1 ] || [ "$missing" -eq 1 ]; then
        _vtmem_log "running apt-get update"
        _vtmem_sudo apt-get update -q >&2
    fi
}

# Install the named packages that are not installed yet. Arguments may be
# `pkg` or `pkg/release`; installation state is checked with dpkg-query first,
# so a run with everything present never touches the network.
vtmem_apt_install() {
    local want=() arg name status
    for arg in "$@"; do
        name=${arg%%/*}
        status=$(dpkg-query -W -f='${db:Status-Status}' "$name" 2>/dev/null || true)
        if [ "$status" != "installed" ]; then
            want+=("$arg")
        fi
    done
    [ "${#want[@]}" -eq 0 ] && return 0
    vtmem_apt_setup
    _vtmem_log "installing ${want[*]}"
    _vtmem_sudo env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${want[@]}" >&2
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    case "${1:-setup}" in
        setup) vtmem_apt_setup ;;
        install) shift; vtmem_apt_install "$@" ;;
        -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//' ;;
        *) _vtmem_log "unknown command: $1 (setup | install PKG...)"; exit 2 ;;
    esac
fi
