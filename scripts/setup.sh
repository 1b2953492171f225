#!/usr/bin/env bash
# Installs everything logwrites needs on a Debian 12 machine, idempotently:
# distribution packages, the deb-src lists, the QEMU source package matching the
# installed QEMU (for libvhost-user), and a virtual environment with the project.
# A second run finds everything in place and returns in seconds.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${LOGWRITES_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/logwrites}"
venv="$here/.venv"

say() { printf 'setup: %s\n' "$*" >&2; }

apt_packages=(
    qemu-system-x86 qemu-utils qemu-block-extra   # the machine, qemu-img/qemu-io, qemu-storage-daemon
    linux-image-amd64                             # the default guest's kernel and modules
    busybox-static                                # the default guest's init and shell
    e2fsprogs xfsprogs btrfs-progs fio dmsetup    # filesystem tools, host and guest
    cpio zstd kmod                                # packing the guest's initramfs
    build-essential dpkg-dev libffi-dev           # compiling libvhost-user into our extension
    python3 python3-venv python3-dev
)

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        say "installing Debian packages needs root: run this as root (or with sudo)"
        exit 2
    fi
}

missing_packages() {
    local pkg
    for pkg in "${apt_packages[@]}"; do
        dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$' \
            || printf '%s\n' "$pkg"
    done
}

install_packages() {
    local missing
    missing="$(missing_packages)"
    [ -z "$missing" ] && return 0
    need_root
    say "installing Debian packages: $(echo $missing)"
    apt-get update -q
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
}

# The deb-src entries are copies of the machine's own binary entries, so the project
# names no archive of its own.
enable_sources() {
    local src=/etc/apt/sources.list.d/logwrites-deb-src.sources
    local legacy=/etc/apt/sources.list.d/logwrites-deb-src.list
    [ -e "$src" ] || [ -e "$legacy" ] && return 0
    need_root
    if [ -e /etc/apt/sources.list.d/debian.sources ]; then
        sed 's/^Types:[[:space:]]*deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources >"$src"
    elif grep -q '^deb ' /etc/apt/sources.list 2>/dev/null; then
        sed -n 's/^deb /deb-src /p' /etc/apt/sources.list >"$legacy"
    else
        say "no binary apt entries found to copy into deb-src entries; add deb-src lines for the distribution by hand"
        exit 2
    fi
    say "enabled source package lists (copied from the binary entries)"
    apt-get update -q
}

# Extracts the QEMU source package matching the installed QEMU and keeps only what
# libvhost-user needs: its directory and the QEMU headers its links point at.
fetch_libvhost_user() {
    local version dest work
    version="$(dpkg-query -W -f='${source:Version}' qemu-system-x86)"
    dest="$cache/qemu-src/${version//:/_}"
    if [ -f "$dest/.complete" ]; then
        printf '%s\n' "$dest"
        return 0
    fi
    enable_sources >&2
    say "fetching the QEMU $version source package for libvhost-user"
    work="$(mktemp -d)"
    (
        cd "$work"
        apt-get source --download-only -q "qemu=$version" >/dev/null 2>&1 \
            || apt-get source --download-only -q "qemu=$version"
        dpkg-source -q -x ./*.dsc src >/dev/null
        rm -rf "$dest" && mkdir -p "$dest"
        cd src
        cp -a --parents subprojects/libvhost-user include/qemu/atomic.h include/qemu/compiler.h \
            include/standard-headers "$dest/"
        cp -a COPYING "$dest/"
    ) >&2
    rm -rf "$work"
    touch "$dest/.complete"
    printf '%s\n' "$dest"
}

build_inputs_hash() {
    cat "$here/pyproject.toml" "$here/setup.py" "$here"/vhost/_lvu_build.py "$here"/vhost/_lvu.cdef \
        "$here"/vhost/_lvu_glue.c "$here"/logwrites/_replay_build.py \
        "$here"/logwrites/_replay_plain.c 2>/dev/null | sha256sum | cut -d' ' -f1
}

install_venv() {
    local lvu_src="$1" stamp="$venv/.logwrites-installed" want
    want="$(build_inputs_hash) $lvu_src"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/logwrites" ]; then
        return 0
    fi
    say "creating the Python environment in $venv"
    [ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv "$venv"
    # The build's chatter goes to a file; it is shown only when the build fails.
    if ! { "$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel cffi &&
           LOGWRITES_LIBVHOST_USER_SRC="$lvu_src" "$venv/bin/python" -m pip install -q -e "$here[test]"
         } >"$venv/setup.log" 2>&1; then
        tail -40 "$venv/setup.log" >&2
        say "installing the project failed (full output: $venv/setup.log)"
        exit 1
    fi
    printf '%s\n' "$want" >"$stamp"
}

# The LD_PRELOAD read recorder e2fsck runs under (logwrites/check.py: verdicts reused while
# the bytes e2fsck read are unchanged). Not a Python extension: compiled here, outside the venv,
# whenever its source is newer than the library; built to a temporary name and renamed, so a
# check running meanwhile loads either the old library or the new one.
build_readset_recorder() {
    local src="$here/logwrites/_readset_recorder.c" so="$here/logwrites/_readset_recorder.so"
    [ -f "$so" ] && [ ! "$src" -nt "$so" ] && return 0
    say "building $so"
    gcc -shared -fPIC -O2 -Wall -Wextra -o "$so.tmp.$$" "$src" -ldl -lpthread
    mv -f "$so.tmp.$$" "$so"
}

# The fork server the checker runs e2fsck under (logwrites/forkserver.py: exec and library
# start-up paid once per worker, not once per crash state); built as the recorder is.
build_forkserver() {
    local src="$here/logwrites/_forkserver.c" so="$here/logwrites/_forkserver.so"
    [ -f "$so" ] && [ ! "$src" -nt "$so" ] && return 0
    say "building $so"
    gcc -shared -fPIC -O2 -Wall -Wextra -o "$so.tmp.$$" "$src" -ldl
    mv -f "$so.tmp.$$" "$so"
}

main() {
    install_packages
    local lvu_src
    lvu_src="$(fetch_libvhost_user)"
    install_venv "$lvu_src"
    build_readset_recorder
    build_forkserver
    printf '%s\n' "$lvu_src" >"$here/.libvhost-user-src"
}

main "$@"
