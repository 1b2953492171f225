"""Builds and caches the default guest: a kernel and an initramfs made from distribution packages.

The initramfs holds busybox (static) as init and shell, the real filesystem tools (which shadow
busybox's applets of the same name, DESIGN §7), fio, dmsetup, flock, their shared libraries, the
kernel modules the guest needs (with their dependencies, decompressed) and the agent
(`guests/agent/`). The kernel is the newest distribution kernel in /boot, or the user's own
bzImage with an optional modules directory. A build is cached under
`${XDG_CACHE_HOME:-~/.cache}/logwrites/guests/<hash of inputs>` and rebuilt only when an input
changes (kernel, module tree, package versions, agent sources, this file); after a build, the
entries no lookup can reach again are removed (guests/cache.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import lzma
import os
import pwd
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from guests import cache
from logwrites.errors import LogwritesError
from logwrites.storagepaths import file_kind

log = logging.getLogger(__name__)

AGENT_DIR: Final = Path(__file__).resolve().parent / "agent"

#: Modules the guest loads at boot, in this order, when the kernel has them as modules
#: (names as in modules.dep, `-` and `_` equivalent). Dependencies are added from modules.dep.
BOOT_MODULES: Final = (
    "virtio_pci", "virtio_blk", "virtio_console", "qemu_fw_cfg",
    "crc32c_generic", "crc32c_intel", "libcrc32c",  # ext4/btrfs/xfs softdeps on crc32c
    "dm_mod", "dm_log_writes",
)

#: Modules in the guest that are loaded only when wanted (`modprobe fs-NAME` by the agent for a
#: job's filesystem, or by the kernel itself when a script mounts one): under TCG loading ext4
#: took about 1 s, xfs about 3 s, btrfs (with raid6_pq's and xor's boot-time benchmarks) 2-4 s,
#: paid by every boot that did not use them.
ON_DEMAND_MODULES: Final = ("ext4", "xfs", "btrfs")

GUEST_MODULES: Final = BOOT_MODULES + ON_DEMAND_MODULES

#: Packages whose versions key the cache: every tool copied into the guest comes from one.
PACKAGES: Final = ("busybox-static", "dash", "e2fsprogs", "xfsprogs", "btrfs-progs", "fio",
                   "dmsetup", "util-linux", "libc6")

#: Real tools copied into the guest: (path on the host, install command for the error message).
TOOLS: Final = (
    ("/usr/sbin/mke2fs", "e2fsprogs"), ("/usr/sbin/mkfs.ext4", "e2fsprogs"),
    ("/usr/sbin/mkfs.ext3", "e2fsprogs"), ("/usr/sbin/mkfs.ext2", "e2fsprogs"),
    ("/usr/sbin/e2fsck", "e2fsprogs"), ("/usr/sbin/fsck.ext4", "e2fsprogs"),
    ("/usr/sbin/fsck.ext3", "e2fsprogs"), ("/usr/sbin/fsck.ext2", "e2fsprogs"),
    ("/usr/sbin/tune2fs", "e2fsprogs"), ("/usr/sbin/dumpe2fs", "e2fsprogs"),
    ("/usr/sbin/debugfs", "e2fsprogs"), ("/usr/sbin/resize2fs", "e2fsprogs"),
    ("/usr/sbin/mkfs.xfs", "xfsprogs"), ("/usr/sbin/xfs_repair", "xfsprogs"),
    ("/usr/sbin/xfs_db", "xfsprogs"), ("/usr/sbin/xfs_io", "xfsprogs"),
    ("/usr/sbin/fsck.xfs", "xfsprogs"),
    ("/usr/bin/btrfs", "btrfs-progs"), ("/usr/sbin/mkfs.btrfs", "btrfs-progs"),
    ("/usr/sbin/fsck.btrfs", "btrfs-progs"),
    ("/usr/bin/fio", "fio"), ("/usr/sbin/dmsetup", "dmsetup"), ("/usr/bin/flock", "util-linux"),
    # /bin/sh for scripts: busybox's ash runs its own applet for a bare `mke2fs` whatever PATH
    # says (it is built standalone), so scripts get dash, which honours PATH.
    ("/usr/bin/dash", "dash"),
)

BUSYBOX: Final = "/usr/bin/busybox"

#: Bumped when the layout of a build changes in a way the other inputs do not show.
BUILD_FORMAT: Final = 2

#: cryptomgr.notests: the crypto self-tests ran for 1.4-2.7 s of every TCG boot (initcall_debug:
#: crypto_algapi_init, and the certificate and key initcalls waiting on it).
KERNEL_CMDLINE: Final = ("console=ttyS0 panic=-1 rdinit=/init quiet loglevel=4 tsc=unstable "
                         "cryptomgr.notests")

#: ELF note (owner "Xen") holding the 32-bit PVH entry point: QEMU boots such an ELF directly.
_XEN_ELFNOTE_PHYS32_ENTRY: Final = 18


class GuestError(LogwritesError):
    """The guest cannot be built or booted as asked."""


@dataclass(frozen=True, slots=True)
class Guest:
    """A bootable guest: `kernel` and `initrd` paths for QEMU's -kernel/-initrd."""

    kernel: Path
    initrd: Path
    kernel_version: str
    modules: tuple[str, ...]  # module files loaded at boot, relative to /lib/modules/<ver>
    cmdline: str
    cache_dir: Path
    initrd_bytes: int
    on_demand: tuple[str, ...] = ()  # module files in the guest loaded only when wanted
    direct_boot: bool = False  # `kernel` is the decompressed vmlinux, booted through PVH

    def to_json(self) -> str:
        data = {k: str(v) if isinstance(v, Path) else v
                for k, v in dataclasses.asdict(self).items()}
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Guest:
        data = json.loads(text)
        return cls(kernel=Path(data["kernel"]), initrd=Path(data["initrd"]),
                   kernel_version=data["kernel_version"], modules=tuple(data["modules"]),
                   cmdline=data["cmdline"], cache_dir=Path(data["cache_dir"]),
                   initrd_bytes=int(data["initrd_bytes"]),
                   on_demand=tuple(data.get("on_demand", ())),
                   direct_boot=bool(data.get("direct_boot", False)))


def cache_root() -> Path:
    """Where guests are cached: $XDG_CACHE_HOME/logwrites/guests, or ~/.cache/... when it is
    unset, empty or relative (the XDG base directory spec: relative paths "are invalid and
    should be ignored"; one would also put absolute paths in guest.json relative to wherever
    we were started).

    :raise GuestError: no XDG_CACHE_HOME to use and no home directory.
    """
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else _home() / ".cache"
    return root / "logwrites" / "guests"


def _home() -> Path:
    """$HOME, or the password database's home when HOME is unset or empty (Path.home() turns
    an empty HOME into "/", and so the cache into /.cache)."""
    home = os.environ.get("HOME")
    if home:
        return Path(home)
    try:
        return Path(pwd.getpwuid(os.getuid()).pw_dir)
    except KeyError:
        raise GuestError("no home directory for the guest cache: set HOME or "
                         "XDG_CACHE_HOME") from None


def kernel_version(bzimage: Path) -> str:
    """The release string (`uname -r`) a bzImage carries in its setup header.

    :raise GuestError: the file is not a bzImage (boot protocol 2.0+, x86).
    """
    # Documentation/arch/x86/boot.rst: "HdrS" at 0x202; kernel_version at 0x20E is a pointer
    # to a NUL-terminated string, relative to 0x200 bytes into the file.
    try:
        mode = bzimage.stat().st_mode
        # Judged before the open: opening a FIFO blocks until a writer comes, and a kernel is
        # never a device.
        if not stat.S_ISREG(mode):
            raise GuestError(f"kernel {bzimage}: {file_kind(mode)}, not a regular file")
        with bzimage.open("rb") as f:
            head = f.read(0x8000)
    except OSError as err:
        raise GuestError(f"kernel {bzimage}: {err.strerror}") from err
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        raise GuestError(f"kernel {bzimage}: not an x86 bzImage (no HdrS header)")
    pointer = int.from_bytes(head[0x20E:0x210], "little")
    start = pointer + 0x200
    if pointer == 0 or start >= len(head):
        raise GuestError(f"kernel {bzimage}: the setup header carries no version string")
    end = head.find(b"\0", start)
    if end < 0:  # no NUL in the 32 KiB read: junk, not a version string to trust
        raise GuestError(f"kernel {bzimage}: not a bzImage we can read (its version string "
                         f"has no end)")
    return head[start:end].split(b" ")[0].decode("ascii", "replace")


def distribution_kernel() -> Path:
    """The newest installed distribution kernel, /boot/vmlinuz-*.

    :raise GuestError: none is installed or readable.
    """
    candidates = list(Path("/boot").glob("vmlinuz-*"))
    if not candidates:
        raise GuestError("no distribution kernel in /boot: run ./run.sh setup "
                         "(apt-get install linux-image-amd64)")

    def version_key(path: Path) -> list[int | str]:
        return [int(p) if p.isdigit() else p
                for p in re.split(r"[.-]", path.name.removeprefix("vmlinuz-"))]

    newest = max(candidates, key=version_key)
    if not os.access(newest, os.R_OK):
        raise GuestError(f"kernel {newest} is not readable (run as root)")
    return newest


def _package_versions() -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Package}=${Version}\n", *PACKAGES],
                         capture_output=True, text=True, check=False)
    return out.stdout


def _modules_dir(version: str, modules: Path | None) -> Path | None:
    """The /lib/modules/<version>-like directory to take modules from, or None (all built in)."""
    if modules is None:
        return None
    for candidate in (modules, modules / "lib" / "modules" / version, modules / version):
        if (candidate / "modules.dep").is_file():
            _module_text(candidate / "modules.dep")  # refused now, not halfway through a build
            return candidate
    raise GuestError(f"modules directory {modules}: no modules.dep in it, in "
                     f"lib/modules/{version} or {version} (run `make modules_install "
                     f"INSTALL_MOD_PATH=DIR` and pass DIR)")


def _inputs_hash(kernel: Path, version: str, mod_dir: Path | None) -> str:
    h = hashlib.sha256()
    h.update(f"format {BUILD_FORMAT}\nversion {version}\ncmdline {KERNEL_CMDLINE}\n".encode())
    st = kernel.stat()
    # A kernel developer rebuilds the same path: size and mtime catch that without reading it.
    h.update(f"kernel {kernel.resolve()} {st.st_size} {st.st_mtime_ns}\n".encode())
    if mod_dir is not None:
        dep = (mod_dir / "modules.dep").stat()
        h.update(f"modules {mod_dir.resolve()} {dep.st_size} {dep.st_mtime_ns}\n".encode())
    h.update(_package_versions().encode())
    h.update(Path(__file__).read_bytes())
    for path in sorted(AGENT_DIR.iterdir()):
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def default_guest(kernel: Path | None = None, modules: Path | None = None,
                  *, rebuild: bool = False) -> Guest:
    """The cached guest for `kernel` (default: the newest distribution kernel), building it
    when an input changed.

    With no `kernel`, modules come from /lib/modules/<version>; with a user's `kernel`, from
    `modules` (a /lib/modules/<version> directory or an INSTALL_MOD_PATH), else none: the
    kernel must have what the guest needs built in (guests/README.md lists it).

    :raise GuestError: a tool or the kernel is missing, or the build failed.
    """
    if kernel is None:
        kernel = distribution_kernel()
        version = kernel_version(kernel)
        if modules is None:
            modules = Path("/lib/modules") / version
    else:
        version = kernel_version(kernel)
    mod_dir = _modules_dir(version, modules)
    key = _inputs_hash(kernel, version, mod_dir)
    out = cache_root() / key
    manifest = out / cache.MANIFEST
    if manifest.is_file() and not rebuild:
        guest = Guest.from_json(manifest.read_text())
        try:
            cache.hold(out)
        except FileNotFoundError:
            pass  # removed by another process's prune a moment ago: build it again
        else:
            if guest.initrd.is_file():
                log.debug("guest cache hit: %s", out)
                return guest
    started = time.monotonic()
    sources = (str(kernel.resolve()), str(mod_dir.resolve()) if mod_dir is not None else "")
    guest = _build(kernel, version, mod_dir, out, sources)
    log.info("built guest in %.1f s: %s", time.monotonic() - started, out)
    cache.hold(out)
    cache.prune(cache_root(), out, sources)
    return guest


# ---- building -------------------------------------------------------------------------------

def _check_tools() -> None:
    missing = sorted({pkg for path, pkg in TOOLS if not os.access(path, os.X_OK)}
                     | ({"busybox-static"} if not os.access(BUSYBOX, os.X_OK) else set()))
    if missing:
        raise GuestError("guest tools missing: run ./run.sh setup "
                         f"(apt-get install {' '.join(missing)})")


def _shared_libraries(binaries: Iterable[str]) -> set[str]:
    """Every shared library (and the loader) the binaries need, as resolved by ldd."""
    libs: set[str] = set()
    for binary in binaries:
        out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False)
        if "not a dynamic executable" in out.stdout + out.stderr:
            continue  # a shell script (fsck.xfs) or a static binary
        for line in out.stdout.splitlines():
            # "libx.so.1 => /lib/.../libx.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
            m = re.search(r"(/\S+) \(0x", line)
            if m:
                libs.add(m.group(1))
            elif "not found" in line:
                raise GuestError(f"{binary}: shared library {line.split()[0]} not found")
    return libs


def _module_text(path: Path) -> str:
    """A text file of a module tree (modules.dep, .softdep, .alias).

    :raise GuestError: naming the file, when it cannot be read or is not text.
    """
    try:
        return path.read_text()
    except UnicodeDecodeError as err:
        raise GuestError(f"{path}: not a text file ({err.reason} at byte {err.start}); "
                         f"is this a modules directory?") from None
    except OSError as err:
        raise GuestError(f"{path}: {err.strerror}") from err


def _module_closure(mod_dir: Path, names: Iterable[str] = GUEST_MODULES) -> list[str]:
    """Module files (relative paths from modules.dep) to load for `names`, dependencies
    first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in _module_text(mod_dir / "modules.dep").splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[_module_name(path)] = path
    softdeps: dict[str, list[str]] = {}
    softdep_file = mod_dir / "modules.softdep"
    if softdep_file.is_file():
        for line in _module_text(softdep_file).splitlines():
            words = line.split()
            if len(words) > 2 and words[0] == "softdep":
                softdeps[words[1].replace("-", "_")] = [
                    w.replace("-", "_") for w in words[2:] if not w.endswith(":")]
    order: list[str] = []
    seen: set[str] = set()

    def visit(path: str) -> None:
        if path in seen:
            return
        seen.add(path)
        for soft in softdeps.get(_module_name(path), []):
            if soft in by_name:
                visit(by_name[soft])
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in names:
        if name in by_name:
            visit(by_name[name])
    return order


def _modules_dep(mod_dir: Path, included: Iterable[str]) -> bytes:
    """A modules.dep for the guest's flat module directory (`name.ko: dep.ko ...`, every
    dependency listed, as busybox's modprobe wants), covering the `included` module files."""
    wanted = set(included)
    lines = []
    for line in _module_text(mod_dir / "modules.dep").splitlines():
        path, sep, rest = line.partition(":")
        if sep and path in wanted:
            deps = " ".join(_module_name(d) + ".ko" for d in rest.split())
            lines.append(f"{_module_name(path)}.ko: {deps}".rstrip() + "\n")
    return "".join(lines).encode()


def _fs_aliases(mod_dir: Path | None) -> bytes:
    """modprobe.conf lines naming the module of each filesystem (`alias fs-ext3 ext4`), from the
    kernel's modules.alias where it has one: the names the kernel asks modprobe for on mount."""
    wanted = {name.replace("-", "_") for name in ON_DEMAND_MODULES}
    lines = {f"alias fs-{name} {name}\n" for name in wanted}
    alias_file = mod_dir / "modules.alias" if mod_dir is not None else None
    if alias_file is not None and alias_file.is_file():
        for line in _module_text(alias_file).splitlines():
            words = line.split()
            if (len(words) == 3 and words[0] == "alias" and words[1].startswith("fs-")
                    and words[2].replace("-", "_") in wanted):
                lines.add(f"alias {words[1]} {words[2]}\n")
    return "".join(sorted(lines)).encode()


# ---- the kernel --------------------------------------------------------------------------------

def _decompress_payload(data: bytes) -> bytes | None:
    """The kernel ELF inside a bzImage's compressed payload, or None for a compression we cannot
    undo here (the bzImage then boots as it is)."""
    if data.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
    if data.startswith(b"\x5d\x00\x00"):
        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)
    if data.startswith(b"\x1f\x8b"):
        import zlib
        return zlib.decompressobj(wbits=31).decompress(data)
    if data.startswith(b"BZh"):
        import bz2
        return bz2.BZ2Decompressor().decompress(data)
    if data.startswith(b"\x28\xb5\x2f\xfd") and shutil.which("zstd"):
        done = subprocess.run(["zstd", "-dcq"], input=data, capture_output=True, check=False)
        return done.stdout or None
    return None


def _has_pvh_entry(elf: bytes) -> bool:
    """Whether a 64-bit little-endian ELF carries the PVH entry note in a PT_NOTE segment."""
    if len(elf) < 64 or elf[:6] != b"\x7fELF\x02\x01":
        return False
    phoff, = struct.unpack_from("<Q", elf, 32)
    phentsize, phnum = struct.unpack_from("<HH", elf, 54)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, min(p_offset + p_filesz, len(elf))
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def direct_boot_kernel(bzimage: Path) -> bytes | None:
    """The decompressed kernel ELF of `bzimage` when QEMU can boot it directly (PVH entry,
    CONFIG_PVH), else None.

    Under TCG the bzImage's own decompressor is the slowest part of a boot: unpacking the
    Debian kernel's xz payload took 11-15 s of emulated time before the first kernel message;
    QEMU loads the ELF's segments from the host instead (well under a second).
    """
    head = bzimage.read_bytes()
    if len(head) < 0x250 or head[0x202:0x206] != b"HdrS":
        return None
    version, = struct.unpack_from("<H", head, 0x206)
    if version < 0x208:  # payload_offset/payload_length came with boot protocol 2.08
        return None
    setup_sects = head[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", head, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    try:
        elf = _decompress_payload(head[start:start + payload_length])
    except (lzma.LZMAError, OSError, ValueError, EOFError) as err:
        log.info("kernel %s: payload not decompressed (%s): booting the bzImage", bzimage, err)
        return None
    if elf is None or not _has_pvh_entry(elf):
        log.info("kernel %s: no PVH entry (CONFIG_PVH) or unknown compression: booting the "
                 "bzImage", bzimage)
        return None
    return elf


def _module_name(path: str) -> str:
    name = Path(path).name
    for suffix in (".xz", ".zst", ".gz", ".ko"):
        name = name.removesuffix(suffix)
    return name.replace("-", "_")


def _decompressed_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".zst":
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True,
                              check=True).stdout
    if path.suffix == ".gz":
        import gzip
        return gzip.decompress(data)
    return data


class _Cpio:
    """A writer of the newc cpio format the kernel unpacks (Documentation/driver-api/
    early-userspace/buffer-format.rst): headers of ASCII hex fields, 4-byte alignment."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 1
        self.paths: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        name_b = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(name_b), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + name_b + b"\0" * (-(len(header) + len(name_b)) % 4))
        self._out.write(data + b"\0" * (-len(data) % 4))
        self._ino += 1

    def directory(self, name: str) -> None:
        name = name.strip("/")
        if name in self.paths or not name:
            return
        parent = os.path.dirname(name)
        if parent:
            self.directory(parent)
        self.paths.add(name)
        self._entry(name, 0o040755, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o755) -> None:
        name = name.strip("/")
        if name in self.paths:
            return
        self.directory(os.path.dirname(name))
        self.paths.add(name)
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        if name in self.paths:
            return
        self.directory(os.path.dirname(name))
        self.paths.add(name)
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self.directory(os.path.dirname(name.strip("/")))
        self.paths.add(name.strip("/"))
        self._entry(name.strip("/"), 0o020600, rdev=(major, minor))

    def trailer(self) -> None:
        self._entry("TRAILER!!!", 0, nlink=1)


def _strip(data: bytes) -> bytes:
    """The binary with debug sections removed where strip can, else unchanged."""
    with tempfile.NamedTemporaryFile() as tmp:
        tmp.write(data)
        tmp.flush()
        if subprocess.run(["strip", "--strip-unneeded", tmp.name], capture_output=True,
                          check=False).returncode != 0:
            return data
        return Path(tmp.name).read_bytes()


def _host_file(path: str) -> Iterator[tuple[str, str | None]]:
    """The path, and if it is a symlink chain, each link (name, target) down to the file."""
    current = path
    for _ in range(10):
        if not os.path.islink(current):
            break
        target = os.readlink(current)
        yield current, target
        current = os.path.normpath(os.path.join(os.path.dirname(current), target))
    yield current, None


def _build(kernel: Path, version: str, mod_dir: Path | None, out: Path,
           sources: tuple[str, str]) -> Guest:
    _check_tools()
    if not shutil.which("strip"):
        log.warning("strip is missing (apt-get install binutils): the guest will be larger")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=cache.BUILD_PREFIX, dir=out.parent))
    try:
        initrd = work / "initrd.cpio"
        with initrd.open("wb") as f:
            cpio = _Cpio(f)
            for d in ("dev", "proc", "sys", "run", "tmp", "mnt", "root", "etc", "lib/modules"):
                cpio.directory(d)
            cpio.chardev("dev/console", 5, 1)
            cpio.chardev("dev/null", 1, 3)
            # Real tools first: their names then win over busybox applets in /bin and /sbin.
            tool_paths = [p for p, _ in TOOLS]
            for path in sorted(_shared_libraries(tool_paths)) + tool_paths:
                for name, target in _host_file(path):
                    if target is not None:
                        cpio.symlink(name, target)
                    else:
                        data = Path(name).read_bytes()
                        cpio.file(name, _strip(data) if data[:4] == b"\x7fELF" else data,
                                  os.stat(name).st_mode & 0o777)
            for path in tool_paths:
                base = os.path.basename(path)
                for d in ("bin", "sbin"):
                    cpio.symlink(f"{d}/{base}", path)
            cpio.symlink("bin/sh", "/usr/bin/dash")
            cpio.file("bin/busybox", Path(BUSYBOX).read_bytes())
            applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True,
                                     check=True).stdout.split()
            for applet in applets:
                if applet not in ("busybox", "[[") and "/" not in applet:
                    cpio.symlink(f"bin/{applet}", "busybox")
                    cpio.symlink(f"sbin/{applet}", "../bin/busybox")
            for path in sorted(AGENT_DIR.iterdir()):
                if path.is_file() and not path.name.endswith(".md"):
                    name = "init" if path.name == "init" else f"usr/lib/logwrites/{path.name}"
                    cpio.file(name, path.read_bytes(), 0o755)
            for helper in ("lw-mark", "lw-report"):
                cpio.symlink(f"bin/{helper}", f"/usr/lib/logwrites/{helper}")
            cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)
            cpio.file("etc/group", b"root:x:0:\n", 0o644)
            modules: list[str] = []
            on_demand: list[str] = []
            if mod_dir is not None:
                boot = _module_closure(mod_dir, BOOT_MODULES)
                every = _module_closure(mod_dir, GUEST_MODULES)
                for rel in every:
                    data = _decompressed_module(mod_dir / rel)
                    name = _module_name(rel) + ".ko"
                    cpio.file(f"lib/modules/{version}/{name}", data, 0o644)
                    (modules if rel in boot else on_demand).append(name)
                # busybox modprobe finds the on-demand ones (and the kernel asks it for
                # "fs-xfs" when a script mounts xfs itself: the aliases below).
                cpio.file(f"lib/modules/{version}/modules.dep", _modules_dep(mod_dir, every),
                          0o644)
            cpio.file(f"lib/modules/{version}/lw-load-order",
                      "".join(m + "\n" for m in modules).encode(), 0o644)
            cpio.file("etc/modprobe.d/logwrites.conf", _fs_aliases(mod_dir), 0o644)
            cpio.trailer()
        elf = direct_boot_kernel(kernel)
        kernel_name = "vmlinux" if elf is not None else "bzImage"
        if elf is not None:
            (work / kernel_name).write_bytes(elf)
        else:
            shutil.copyfile(kernel, work / kernel_name)
        guest = Guest(kernel=out / kernel_name, initrd=out / "initrd.cpio",
                      kernel_version=version, modules=tuple(modules), cmdline=KERNEL_CMDLINE,
                      cache_dir=out, initrd_bytes=initrd.stat().st_size,
                      on_demand=tuple(on_demand), direct_boot=elf is not None)
        # The paths it was built from let a later build tell when this one is unreachable.
        manifest = json.loads(guest.to_json()) | {"source_kernel": sources[0],
                                                  "source_modules": sources[1]}
        (work / cache.MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
        return guest
    except subprocess.CalledProcessError as err:
        raise GuestError(f"guest build: {err.cmd[0]} failed: {err.stderr!r}") from err
    finally:
        shutil.rmtree(work, ignore_errors=True)
