"""Builds `logwrites._replay`: the common case of the replay hot loop, in C (cffi API mode).

`logwrites/_replay_plain.c` holds the C, and the declarations of what Python touches.
setup.py lists this builder in `cffi_modules`, so `pip install -e .` (scripts/setup.sh) builds
the extension.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

SOURCE = (HERE / "_replay_plain.c").read_text()

ffibuilder = FFI()
# What Python touches is declared once, in the C file, between two marker comments.
declarations = SOURCE.split("/* cdef begin")[1].split("*/", 1)[1].split("/* cdef end */")[0]
ffibuilder.cdef(declarations)
# The C file is given as the module's source text (one file needs no separate compile step).
ffibuilder.set_source(
    "logwrites._replay",
    SOURCE,
    define_macros=[("_GNU_SOURCE", None)],
    extra_compile_args=["-std=gnu99", "-O2", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
