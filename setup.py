# pyproject.toml cannot declare cffi modules yet (cffi issue #55); everything else lives there.
from setuptools import setup

setup(cffi_modules=["vhost/_lvu_build.py:ffibuilder", "logwrites/_replay_build.py:ffibuilder"])
