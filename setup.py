"""Only the optional compiled kernel; all other metadata lives in pyproject.toml.

`optional=True`: without a C compiler (or on a platform where it fails) the build only
warns and the sparse backend uses scipy. No -march=native: wheels must run on any CPU of
the platform; the AVX2 path is chosen at run time inside the extension.

`DGDM_PURE=1` builds without it: a `py3-none-any` wheel that installs on every
architecture of a mixed fleet (x86-64 controllers, aarch64 Coral boards).
"""

import os
import sys

from setuptools import Extension, setup

COMPILE_ARGS = [] if sys.platform == "win32" else ["-O3"]
PURE = os.environ.get("DGDM_PURE", "") not in ("", "0")

setup(
    ext_modules=[]
    if PURE
    else [
        Extension(
            "dgdm.kernels._spmm",
            sources=["kernels/_spmm.c"],
            extra_compile_args=COMPILE_ARGS,
            optional=True,
        )
    ]
)
