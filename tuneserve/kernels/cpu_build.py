"""Compiling the C kernels in kernels/csrc at first use, with the system C compiler.

Each source builds into a shared library cached under $TUNESERVE_CACHE/kernels, keyed by the source,
the flags and this CPU's feature flags (the code is built with -march=native). The library is linked
with -fopenmp and loaded after torch, so it shares torch's OpenMP runtime and thread pool (the dynamic
loader resolves libgomp.so.1 to the copy torch already loaded).

When there is no compiler, the build fails or the platform is not Linux/x86-64/aarch64, `load()` returns
None and callers use their portable PyTorch path. Whether a model uses a library that did build is its
KernelConfig's choice (kernels/config.py), not this module's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math", "-fPIC", "-shared", "-std=c11"]


def _cpu_signature() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return hashlib.sha256((platform.machine() + flags).encode()).hexdigest()[:12]


def _cache_dir() -> Path:
    from tuneserve.weights.sources import cache_dir

    d = cache_dir() / "kernels"
    d.mkdir(parents=True, exist_ok=True)
    return d


def enabled() -> bool:
    """Whether compiled CPU kernels can be built here (Linux on x86-64 / aarch64, a C compiler)."""
    return bool(sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64")
                and shutil.which(os.environ.get("CC", "gcc")))


@cache
def load(name: str) -> ctypes.CDLL | None:
    """The compiled library for csrc/<name>.c, building it if needed; None when unavailable."""
    if not enabled():
        return None
    import torch  # noqa: F401 - torch's libgomp must be loaded first so the kernels share it

    src = CSRC / f"{name}.c"
    cc = os.environ.get("CC", "gcc")
    headers = b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))  # shared code the sources include
    key = hashlib.sha256(src.read_bytes() + headers + " ".join([cc, *FLAGS]).encode() + _cpu_signature().encode())
    lib = _cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        res = subprocess.run([cc, *FLAGS, str(src), "-o", str(tmp), "-lm"], capture_output=True, text=True)
        if res.returncode != 0:
            print(f"[tuneserve] building kernel {name} failed, using the portable path:\n{res.stderr[-1500:]}",
                  file=sys.stderr)
            return None
        os.replace(tmp, lib)
    return load_library(lib)


@cache
def _libm() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("m"))


@contextmanager
def kept_fp_env() -> Iterator[None]:
    """Run a block and then put the calling thread's floating-point environment back as it was."""
    env = ctypes.create_string_buffer(256)  # fenv_t is 32 bytes on x86-64, 8 on aarch64
    _libm().fegetenv(env)
    try:
        yield
    finally:
        _libm().fesetenv(env)


@contextmanager
def flushing_denormals() -> Iterator[None]:
    """Flush-to-zero and denormals-are-zero for the calling thread during a block, then the thread's own
    environment again. Denormal floats (from underflowing activations) take a slow path on x86; an engine
    step runs about 5% faster at batch 1 in fp32 with them flushed (SmolLM2, Zen 3), and no logit moves
    by a value a denormal could carry."""
    with kept_fp_env():
        import torch

        torch.set_flush_denormal(True)
        yield


def load_library(path: Path | str) -> ctypes.CDLL:
    """ctypes.CDLL(path), keeping the calling thread's floating-point environment. A library linked with
    -ffast-math (gcc < 13) runs crtfastmath on load, which turns on flush-to-zero and denormals-are-zero
    for the whole thread, silently changing every later float computation in the process (numpy's,
    torch's, a client library's). The kernels do not need it, so the environment is put back."""
    with kept_fp_env():
        return ctypes.CDLL(str(path))


def load_functions(name: str, signatures: dict[str, list]) -> ctypes.CDLL | None:
    """load(name), with each named function given its ctypes argument types and no return value."""
    lib = load(name)
    if lib is None:
        return None
    for fn, argtypes in signatures.items():
        f = getattr(lib, fn)
        f.argtypes, f.restype = argtypes, None
    return lib
