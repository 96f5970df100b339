"""Keep BLAS on one thread.

The trainer's matrix products are small (batch 20, width <= a few hundred); measured on a
2-core machine, OpenBLAS's thread pool made them 8x slower than one thread. The environment
variables work only before NumPy loads, so entry points set them and `limit_blas_threads`
also asks an already loaded OpenBLAS directly through its C API.
"""

from __future__ import annotations

import ctypes
import os
import re

THREAD_ENV_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
# Symbol names of the C setter in the OpenBLAS builds NumPy wheels and distributions ship.
_SETTERS = (
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "openblas_set_num_threads",
)


def set_thread_env(environ: dict, threads: int = 1) -> None:
    """Set the BLAS thread variables (call at an entry point, before NumPy is imported)."""
    for name in THREAD_ENV_VARS:
        environ.setdefault(name, str(threads))


def _loaded_openblas_paths() -> list[str]:
    try:
        with open("/proc/self/maps") as maps:
            text = maps.read()
    except OSError:  # not Linux: rely on the environment variables
        return []
    return sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)", text)))


def limit_blas_threads(threads: int = 1) -> bool:
    """Set the thread count of every loaded OpenBLAS; True if one was found and set."""
    import numpy  # noqa: F401  (make sure the library is loaded before looking for it)

    done = False
    for path in _loaded_openblas_paths():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _SETTERS:
            setter = getattr(lib, name, None)
            if setter is not None:
                setter(ctypes.c_int(threads))
                done = True
                break
    return done


def configure_blas(threads: int = 1) -> bool:
    """Entry-point helper: environment for child processes plus the loaded library."""
    set_thread_env(os.environ, threads)
    return limit_blas_threads(threads)
