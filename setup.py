"""Only the optional compiled extensions; all other metadata lives in pyproject.toml.

`_spmm` is the sparse backend's product kernel; `_graphscan` reads the plain graph JSON form
straight into arrays. `optional=True`: without a C compiler (or on a platform where it
fails) the build only warns, the sparse backend uses scipy and graph bodies are decoded the
general way. No -march=native: wheels must run on any CPU of
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
            f"dgdm.kernels.{name}",
            sources=[f"kernels/{name}.c"],
            extra_compile_args=COMPILE_ARGS,
            optional=True,
        )
        for name in ("_spmm", "_graphscan")
    ]
)
