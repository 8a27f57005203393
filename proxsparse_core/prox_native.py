"""The fast prox on the CPU: a small C kernel built once with the system compiler, called via ctypes.

Why C and not torch.compile: the prox wants a *per-group* loop ("iterate this group until it has
converged"), which elementwise tensor programs cannot express; they run fixed blocks of sweeps over
every group and compact the unconverged ones between blocks, which costs several extra passes over
memory. Inductor also takes 10–30 s to compile on a small machine. This kernel is plain C (no torch
headers): it builds in about a second, is cached under the ProxSparse cache folder keyed by its
source and the CPU, and runs in place on float32 or bfloat16 weights.

What it does for each group of 4 (same mathematics and stopping rule as prox.py):
  * groups with ≤ 2 non-zeros are their own prox and are skipped (learning makes most groups so);
  * the other groups are processed 32 at a time, one group per SIMD lane: sort |z| by a 5-comparator
    network, run Gauss-Seidel sweeps of keep-3 and keep-4 until *that lane* moves by no more than
    tol·max|z| (a converged lane is frozen, so a group's result never depends on its neighbours),
    pick the best of keep-2/3/4, restore order and signs, round back to the weight's dtype;
  * it counts the groups with 0..4 non-zeros of the result, which the learner reports every step.
Without a C compiler prox.py falls back to its PyTorch kernels (same results, slower).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#define L 32

static inline float from_bf16(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t to_bf16(float f) {            /* round to nearest even, like torch */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline float ld(const void *w, int bf, int64_t i) { return bf ? from_bf16(((const uint16_t *)w)[i]) : ((const float *)w)[i]; }
static inline void st(void *w, int bf, int64_t i, float x) { if (bf) ((uint16_t *)w)[i] = to_bf16(x); else ((float *)w)[i] = x; }
static inline float fmax0(float x) { return x > 0.f ? x : 0.f; }

/* prox of n <= L groups whose indices are in gi; z holds their values (z[k][l]: entry k of lane l) */
static void block(float z[4][L], int n, float lam, float tol, int max_sweeps) {
    float a[4][L], ix[4][L], u1[L], u2[L], u3[L], v1[L], v2[L], v3[L], v4[L], act[L];
    static const int P[5] = {0, 2, 0, 1, 1}, Q[5] = {1, 3, 2, 3, 2};
    for (int l = 0; l < L; l++)
        for (int k = 0; k < 4; k++) { a[k][l] = l < n ? (z[k][l] < 0 ? -z[k][l] : z[k][l]) : 0.f; ix[k][l] = (float)k; }
    for (int c = 0; c < 5; c++) {
        int p = P[c], q = Q[c];
        for (int l = 0; l < L; l++) {
            int s = a[p][l] < a[q][l];
            float ap = a[p][l], aq = a[q][l], ip = ix[p][l], iq = ix[q][l];
            a[p][l] = s ? aq : ap; a[q][l] = s ? ap : aq; ix[p][l] = s ? iq : ip; ix[q][l] = s ? ip : iq;
        }
    }
    int pending = 0;
    for (int l = 0; l < L; l++) {
        u1[l] = v1[l] = a[0][l]; u2[l] = v2[l] = a[1][l]; u3[l] = v3[l] = a[2][l]; v4[l] = a[3][l];
        act[l] = (l < n && a[2][l] > 0.f) ? 1.f : 0.f;
        pending |= act[l] > 0.f;
    }
    for (int s = 0; s < max_sweeps && pending; s++) {
        pending = 0;
        for (int l = 0; l < L; l++) {
            float p1 = u1[l], p2 = u2[l], p3 = u3[l], q1 = v1[l], q2 = v2[l], q3 = v3[l], q4 = v4[l];
            float n1 = fmax0(a[0][l] - lam * (p2 * p3));
            float n2 = fmax0(a[1][l] - lam * (n1 * p3));
            float n3 = fmax0(a[2][l] - lam * (n1 * n2));
            float m1 = fmax0(a[0][l] - lam * (q2 * q3 + q2 * q4 + q3 * q4));
            float m2 = fmax0(a[1][l] - lam * (m1 * q3 + m1 * q4 + q3 * q4));
            float m3 = fmax0(a[2][l] - lam * (m1 * m2 + m1 * q4 + m2 * q4));
            float m4 = fmax0(a[3][l] - lam * (m1 * m2 + m1 * m3 + m2 * m3));
            float d = 0.f, t;
            t = n1 - p1; t = t < 0 ? -t : t; d = d > t ? d : t;
            t = n2 - p2; t = t < 0 ? -t : t; d = d > t ? d : t;
            t = n3 - p3; t = t < 0 ? -t : t; d = d > t ? d : t;
            t = m1 - q1; t = t < 0 ? -t : t; d = d > t ? d : t;
            t = m2 - q2; t = t < 0 ? -t : t; d = d > t ? d : t;
            t = m3 - q3; t = t < 0 ? -t : t; d = d > t ? d : t;
            t = m4 - q4; t = t < 0 ? -t : t; d = d > t ? d : t;
            int on = act[l] > 0.f;
            u1[l] = on ? n1 : p1; u2[l] = on ? n2 : p2; u3[l] = on ? n3 : p3;
            v1[l] = on ? m1 : q1; v2[l] = on ? m2 : q2; v3[l] = on ? m3 : q3; v4[l] = on ? m4 : q4;
            act[l] = (on && d > tol * a[0][l]) ? 1.f : 0.f;
            pending |= act[l] > 0.f;
        }
    }
    for (int l = 0; l < L; l++) {
        float a1 = a[0][l], a2 = a[1][l], a3 = a[2][l], a4 = a[3][l];
        float o2 = 0.5f * (a3 * a3 + a4 * a4);
        float o3 = 0.5f * ((u1[l] - a1) * (u1[l] - a1) + (u2[l] - a2) * (u2[l] - a2) + (u3[l] - a3) * (u3[l] - a3) + a4 * a4)
                   + lam * (u1[l] * u2[l] * u3[l]);
        float o4 = 0.5f * ((v1[l] - a1) * (v1[l] - a1) + (v2[l] - a2) * (v2[l] - a2) + (v3[l] - a3) * (v3[l] - a3) + (v4[l] - a4) * (v4[l] - a4))
                   + lam * (v1[l] * v2[l] * (v3[l] + v4[l]) + v3[l] * v4[l] * (v1[l] + v2[l]));
        int t3 = o3 < o2, t4 = o4 < (t3 ? o3 : o2);
        float w[4];
        w[0] = t4 ? v1[l] : (t3 ? u1[l] : a1);
        w[1] = t4 ? v2[l] : (t3 ? u2[l] : a2);
        w[2] = t4 ? v3[l] : (t3 ? u3[l] : 0.f);
        w[3] = t4 ? v4[l] : 0.f;
        for (int j = 0; j < 4; j++) {         /* back to original position j (selects, no scatter) */
            float m = ix[0][l] == j ? w[0] : (ix[1][l] == j ? w[1] : (ix[2][l] == j ? w[2] : w[3]));
            float zj = z[j][l];
            z[j][l] = zj > 0 ? m : (zj < 0 ? -m : 0.f);
        }
    }
}

/* prox the gathered block, write it back and count the non-zeros of the result */
static void flush(void *w, int bf, const int64_t *gi, float z[4][L], int n, float lam, float tol,
                  int max_sweeps, int64_t *h) {
    block(z, n, lam, tol, max_sweeps);
    for (int l = 0; l < n; l++) {
        int c = 0;
        for (int k = 0; k < 4; k++) { st(w, bf, 4 * gi[l] + k, z[k][l]); c += ld(w, bf, 4 * gi[l] + k) != 0.f; }
        h[c]++;
    }
}

/* In place on g groups of 4 (float32 if bf == 0, bfloat16 if bf == 1); hist[0..4] += groups with
   0..4 non-zeros in the result. */
void prox24(void *w, int bf, int64_t g, float lam, float tol, int max_sweeps, int threads, int64_t *hist) {
    int64_t total[5] = {0, 0, 0, 0, 0};
    #pragma omp parallel num_threads(threads)
    {
        int64_t h[5] = {0, 0, 0, 0, 0}, gi[L];
        float z[4][L];
        int n = 0;
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < g; i++) {
            int nz = 0;
            for (int k = 0; k < 4; k++) nz += ld(w, bf, 4 * i + k) != 0.f;
            if (nz <= 2) { h[nz]++; continue; }      /* already 2:4: its own prox */
            gi[n] = i;
            for (int k = 0; k < 4; k++) z[k][n] = ld(w, bf, 4 * i + k);
            if (++n == L) { flush(w, bf, gi, z, n, lam, tol, max_sweeps, h); n = 0; }
        }
        if (n) flush(w, bf, gi, z, n, lam, tol, max_sweeps, h);
        #pragma omp critical
        for (int k = 0; k < 5; k++) total[k] += h[k];
    }
    for (int k = 0; k < 5; k++) hist[k] += total[k];
}
"""

_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno"]
_lib = None
_lock = threading.Lock()
_failed = False


def _cpu_key() -> str:
    """What the build depends on: the source, the flags and the CPU (because of -march=native)."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = "".join(line for line in f if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        pass
    return hashlib.sha256((_SOURCE + " ".join(_FLAGS) + cpu).encode()).hexdigest()[:16]


def _build() -> ctypes.CDLL:
    from .models import cache_dir

    target = cache_dir() / "native" / f"prox24-{_cpu_key()}.so"
    if not target.exists():
        cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
        if cc is None:
            raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src, out = Path(tmp) / "prox24.c", Path(tmp) / "prox24.so"
            src.write_text(_SOURCE)
            res = subprocess.run([cc, *_FLAGS, str(src), "-o", str(out)], capture_output=True, text=True)
            if res.returncode:
                raise RuntimeError(f"{cc} failed: {res.stderr.strip()[:300]}")
            os.replace(out, target)   # atomic: concurrent builders never see half a file
    lib = ctypes.CDLL(str(target))
    lib.prox24.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_float,
                           ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.prox24.restype = None
    return lib


def available() -> bool:
    """True when the kernel is built (or could be built now). Set PROXSPARSE_NATIVE=0 to disable."""
    global _lib, _failed
    if os.environ.get("PROXSPARSE_NATIVE", "1") == "0" or _failed:
        return False
    with _lock:
        if _lib is None and not _failed:
            try:
                _lib = _build()
            except Exception as exc:  # noqa: BLE001 - any build failure means "use the PyTorch path"
                _failed = True
                warnings.warn(f"native prox unavailable ({exc!s:.200}); using the PyTorch kernels")
    return _lib is not None


def supports(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16) and t.is_contiguous()


def prox_(groups: torch.Tensor, lam: float, tol: float, max_sweeps: int,
          hist: torch.Tensor | None = None) -> torch.Tensor:
    """In place on a contiguous CPU float32/bfloat16 tensor of shape [G, 4]; adds the non-zero
    counts of the result to `hist` (int64 [5]) when given."""
    assert supports(groups) and groups.shape[-1] == 4 and available()
    counts = torch.zeros(5, dtype=torch.int64)
    _lib.prox24(groups.data_ptr(), int(groups.dtype == torch.bfloat16), groups.numel() // 4,
                float(lam), float(tol), int(max_sweeps), torch.get_num_threads(), counts.data_ptr())
    if hist is not None:
        hist += counts.to(hist.device)
    return groups
