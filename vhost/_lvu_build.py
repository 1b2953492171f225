"""Builds `vhost._lvu`: libvhost-user's C sources compiled into a cffi extension (API mode).

The sources come from the QEMU source package matching the installed QEMU; scripts/setup.sh
fetches them and names the directory in LOGWRITES_LIBVHOST_USER_SRC (also remembered in
`.libvhost-user-src` beside this project, for rebuilds by hand).
"""

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent


def libvhost_user_source() -> Path:
    configured = os.environ.get("LOGWRITES_LIBVHOST_USER_SRC")
    if not configured:
        remembered = PROJECT / ".libvhost-user-src"
        if remembered.is_file():
            configured = remembered.read_text().strip()
    root = Path(configured) if configured else None
    if root is None or not (root / "subprojects/libvhost-user/libvhost-user.c").is_file():
        raise SystemExit(
            "libvhost-user source not found: run ./run.sh setup (or scripts/setup.sh), which "
            "fetches the QEMU source package and sets LOGWRITES_LIBVHOST_USER_SRC"
        )
    return root


lvu_root = libvhost_user_source() / "subprojects/libvhost-user"

ffibuilder = FFI()
ffibuilder.cdef((HERE / "_lvu.cdef").read_text())
# setuptools refuses absolute paths in `sources`, and the library lives outside the project,
# so the library's one C file is compiled as part of the module's own source text.
ffibuilder.set_source(
    "vhost._lvu",
    '#include "libvhost-user.c"\n' + (HERE / "_lvu_glue.c").read_text(),
    include_dirs=[str(lvu_root)],
    define_macros=[("_GNU_SOURCE", None)],
    extra_compile_args=["-std=gnu99", "-O2", "-Wno-unused-parameter", "-Wno-sign-compare"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
