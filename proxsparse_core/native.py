"""Small C kernels for the CPU, built once with the system compiler and loaded with ctypes.

A kernel's source is plain C (no torch headers). It is compiled with -O3 -march=native and OpenMP,
without fused multiply-adds (every operation is rounded exactly as written, so a kernel can give
the same bits as the PyTorch expression it replaces) and without trapping floating-point
exceptions (-fno-trapping-math: the compiler may then evaluate both sides of a branch and blend
them, which is what lets the prox's per-lane loops vectorise on AVX2 CPUs; the arithmetic and its
rounding are unchanged, bench/RESULTS.md 3f), and the library is cached under the cache
folder keyed by its source, the flags and the CPU. Two processes building at once never see half
a file. Callers fall back to PyTorch when no compiler is found or `PROXSPARSE_NATIVE=0`.

Also here: what this CPU does natively that the kernels and torch's products depend on
(`cpu_has_native_bf16`).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math",
         "-ffp-contract=off"]


def cpu_key(source: str, flags=FLAGS) -> str:
    """What a build depends on: the source, the flags and the CPU (because of -march=native)."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = "".join(line for line in f if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        pass
    return hashlib.sha256((source + " ".join(flags) + cpu).encode()).hexdigest()[:16]


def build(name: str, source: str, flags=FLAGS) -> ctypes.CDLL:
    """The compiled library of `source` (built now, or read from the cache); raises on failure."""
    from proxsparse_core.paths import cache_dir

    target = cache_dir() / "native" / f"{name}-{cpu_key(source, flags)}.so"
    if not target.exists():
        cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
        if cc is None:
            raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src, out = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
            src.write_text(source)
            res = subprocess.run([cc, *flags, str(src), "-o", str(out)], capture_output=True, text=True)
            if res.returncode:
                raise RuntimeError(f"{cc} failed: {res.stderr.strip()[:300]}")
            os.replace(out, target)   # atomic: concurrent builders never see half a file
    return ctypes.CDLL(str(target))


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Does this CPU multiply bfloat16 natively (AVX512-BF16 or AMX)? There bf16 matrix products run
    several times faster than float32 ones (bench/RESULTS.md); elsewhere they are emulated and slower.
    Read once per process."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:          # not Linux: no way to tell cheaply, so no
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def switched_on() -> bool:
    return os.environ.get("PROXSPARSE_NATIVE", "1") != "0"


class Library:
    """One lazily built library: `get()` gives the loaded CDLL, or None (no compiler, a failed
    build, or PROXSPARSE_NATIVE=0), warning once when a build fails. `setup(lib)` declares the
    argument types of its functions."""

    def __init__(self, name: str, source: str, setup):
        self.name, self.source, self.setup = name, source, setup
        self.lib = None
        self.failed = False
        self.lock = threading.Lock()

    def get(self):
        if not switched_on() or self.failed:
            return None
        if self.lib is None:
            with self.lock:
                if self.lib is None and not self.failed:
                    try:
                        lib = build(self.name, self.source)
                        self.setup(lib)
                        self.lib = lib
                    except Exception as exc:  # noqa: BLE001 - any build failure means "use PyTorch"
                        self.failed = True
                        warnings.warn(f"native {self.name} unavailable ({exc!s:.200}); using PyTorch")
        return self.lib
