"""2:4 masks and their verification on the CPU in one pass over each weight (C, built by native.py).

`mask_` gives exactly what masks.mask_2to4(w, ranking(w, a)) gives — the two best scores of every
group of 4, |w| or |w|·a (float32, rounded as written), NaN ranking highest and ties going to the
lower index — and, in the same pass, can set non-finite weights to zero first and count each
group's non-zeros (`count_` does only that). `check` counts what masks.verify reports. Both read the weight where it lies
(no copy, no temporary of the weight's size) and take float32 or bfloat16 CPU weights; masks.py
uses PyTorch for anything else.
"""
from __future__ import annotations

import ctypes

import torch

from proxsparse_core import native

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

static inline float from_bf16(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline float ld(const void *w, int bf, int64_t i) { return bf ? from_bf16(((const uint16_t *)w)[i]) : ((const float *)w)[i]; }
static inline void zero(void *w, int bf, int64_t i) { if (bf) ((uint16_t *)w)[i] = 0; else ((float *)w)[i] = 0.f; }

/* One matrix of g groups of 4 (rows of cols weights, cols % 4 == 0; float32 if bf == 0, bfloat16
   if bf == 1). clean: set non-finite weights to 0 first, in place. a: NULL (score |w|) or one float
   per column (score |w|·a). out[i] = 1 for the two best scores of each group: j beats i < j when
   s_j > s_i, or s_j is NaN and s_i is not (NaN ranks highest; ties keep the lower index).
   hist[0..4] += groups with 0..4 non-zero weights (after cleaning). */
void mask24(void *w, int bf, int64_t g, int64_t cols, const float *a, int clean, uint8_t *out,
            int64_t *hist, int threads) {
    int64_t total[5] = {0, 0, 0, 0, 0};
    #pragma omp parallel num_threads(threads)
    {
        int64_t h[5] = {0, 0, 0, 0, 0};
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < g; i++) {
            float s[4];
            int nz = 0, isn[4], beaten[4] = {0, 0, 0, 0};
            const float *ac = a ? a + (4 * i) % cols : 0;
            for (int k = 0; k < 4; k++) {
                float x = ld(w, bf, 4 * i + k);
                if (clean && !isfinite(x)) { x = 0.f; zero(w, bf, 4 * i + k); }
                nz += x != 0.f;
                s[k] = ac ? fabsf(x) * ac[k] : fabsf(x);
                isn[k] = isnan(s[k]);
            }
            h[nz]++;
            for (int p = 0; p < 4; p++)
                for (int q = p + 1; q < 4; q++) {
                    int q_wins = isn[q] ? !isn[p] : (!isn[p] && s[q] > s[p]);
                    beaten[p] += q_wins;
                    beaten[q] += !q_wins;
                }
            for (int k = 0; k < 4; k++) out[4 * i + k] = beaten[k] < 2;
        }
        #pragma omp critical
        for (int k = 0; k < 5; k++) total[k] += h[k];
    }
    for (int k = 0; k < 5; k++) hist[k] += total[k];
}

/* Non-finite weights set to 0 in place (clean), and hist[0..4] += groups with 0..4 non-zeros. */
void count24(void *w, int bf, int64_t g, int clean, int64_t *hist, int threads) {
    int64_t total[5] = {0, 0, 0, 0, 0};
    #pragma omp parallel num_threads(threads)
    {
        int64_t h[5] = {0, 0, 0, 0, 0};
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < g; i++) {
            int nz = 0;
            for (int k = 0; k < 4; k++) {
                float x = ld(w, bf, 4 * i + k);
                if (clean && !isfinite(x)) { x = 0.f; zero(w, bf, 4 * i + k); }
                nz += x != 0.f;
            }
            h[nz]++;
        }
        #pragma omp critical
        for (int k = 0; k < 5; k++) total[k] += h[k];
    }
    for (int k = 0; k < 5; k++) hist[k] += total[k];
}

/* What verification counts on n weights (n % 4 == 0) with mask m (1 byte each) and, when o is not
   NULL, the original weights o (same type as w): res[0] groups with more than 2 non-zeros, res[1]
   non-zero weights where the mask is 0, res[2] non-finite weights, res[3] kept weights that differ
   from o (NaN differs from everything). */
void check24(const void *w, const void *o, int bf, int64_t n, const uint8_t *m, int64_t *res, int threads) {
    int64_t r0 = 0, r1 = 0, r2 = 0, r3 = 0;
    #pragma omp parallel for num_threads(threads) schedule(static) reduction(+:r0,r1,r2,r3)
    for (int64_t i = 0; i < n / 4; i++) {
        int nz = 0;
        for (int k = 0; k < 4; k++) {
            int64_t e = 4 * i + k;
            float x = ld(w, bf, e);
            int keep = m[e] != 0;
            nz += x != 0.f;
            r1 += !keep && x != 0.f;
            r2 += !isfinite(x);
            if (o) r3 += keep && x != ld(o, bf, e);
        }
        r0 += nz > 2;
    }
    res[0] += r0; res[1] += r1; res[2] += r2; res[3] += r3;
}
"""


def _setup(lib) -> None:
    lib.mask24.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                           ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.mask24.restype = None
    lib.count24.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    lib.count24.restype = None
    lib.check24.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p,
                            ctypes.c_void_p, ctypes.c_int]
    lib.check24.restype = None


_LIB = native.Library("mask24", _SOURCE, _setup)


def _weight_ok(w: torch.Tensor) -> bool:
    return (w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16) and w.is_contiguous()
            and w.dim() >= 1 and w.shape[-1] % 4 == 0)


def supports(w: torch.Tensor, cols: torch.Tensor | None = None) -> bool:
    """Whether `mask_` takes `w` (and its column weights): float32/bfloat16 contiguous CPU weights with
    rows of whole groups; float32 CPU column weights, one per column."""
    if not _weight_ok(w):
        return False
    if cols is not None and not (cols.device.type == "cpu" and cols.dtype == torch.float32 and cols.dim() == 1
                                 and cols.numel() == w.shape[-1] and cols.is_contiguous()):
        return False
    return _LIB.get() is not None


def mask_(w: torch.Tensor, cols: torch.Tensor | None = None, clean: bool = False,
          hist: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The 2:4 mask of `w` (bool, shaped like w) ranked by |w| or |w|·cols; with `clean`, non-finite
    weights are set to 0 in place first; `hist` (int64 [5], CPU) gets each group's non-zeros added;
    `out`: a contiguous CPU bool tensor of w's shape to write it into."""
    if out is None:
        out = torch.empty(w.shape, dtype=torch.bool)
    assert out.dtype == torch.bool and out.shape == w.shape and out.is_contiguous() and out.device.type == "cpu"
    counts = torch.zeros(5, dtype=torch.int64)
    _LIB.get().mask24(w.data_ptr(), int(w.dtype == torch.bfloat16), w.numel() // 4, w.shape[-1],
                      None if cols is None else cols.data_ptr(), int(clean), out.data_ptr(), counts.data_ptr(),
                      torch.get_num_threads())
    if hist is not None:
        hist += counts
    return out


def count_(w: torch.Tensor, hist: torch.Tensor, clean: bool = False) -> torch.Tensor:
    """hist (int64 [5], CPU) += each group's non-zeros of `w`; with `clean`, non-finite weights are set
    to 0 in place first (torch.nan_to_num_ with every non-finite value to 0). Check `supports(w)`."""
    counts = torch.zeros(5, dtype=torch.int64)
    _LIB.get().count24(w.data_ptr(), int(w.dtype == torch.bfloat16), w.numel() // 4, int(clean), counts.data_ptr(),
                       torch.get_num_threads())
    hist += counts
    return hist


def check_supports(w: torch.Tensor, m: torch.Tensor, original: torch.Tensor | None) -> bool:
    """Whether `check` takes these: `w` as for `mask_`, a contiguous CPU bool mask of its shape and an
    original of the same dtype, shape and layout (or None)."""
    if not _weight_ok(w) or not (m.device.type == "cpu" and m.dtype == torch.bool and m.shape == w.shape
                                 and m.is_contiguous()):
        return False
    if original is not None and not (original.device.type == "cpu" and original.dtype == w.dtype
                                     and original.shape == w.shape and original.is_contiguous()):
        return False
    return _LIB.get() is not None


def check(w: torch.Tensor, m: torch.Tensor, original: torch.Tensor | None) -> tuple[int, int, int, int]:
    """(groups with > 2 non-zeros, non-zeros where the mask is 0, non-finite weights, kept weights that
    differ from `original`, 0 when it is None)."""
    res = torch.zeros(4, dtype=torch.int64)
    _LIB.get().check24(w.data_ptr(), None if original is None else original.data_ptr(),
                       int(w.dtype == torch.bfloat16), w.numel(), m.data_ptr(), res.data_ptr(),
                       torch.get_num_threads())
    return tuple(int(x) for x in res)
