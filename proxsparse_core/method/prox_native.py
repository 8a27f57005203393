"""The fast prox on the CPU: a small C kernel built once with the system compiler, called via ctypes.

Why C and not torch.compile: the prox wants a *per-group* loop ("iterate this group until it has
converged"), which elementwise tensor programs cannot express; they run fixed blocks of sweeps over
every group and compact the unconverged ones between blocks, which costs several extra passes over
memory, and Inductor is slow to compile on a small machine. This kernel is plain C (no torch
headers), built by native.py (cached under the ProxSparse cache folder, keyed by its source and the
CPU), and runs in place on float32 or bfloat16 weights.

What it does for each group of 4 (same mathematics and stopping rule as prox.py):
  * groups with ≤ 2 non-zeros are their own prox and are skipped (the prox makes most groups so, but
    while learning AdamW moves their zeros before the next step: there every group needs the prox);
  * the other groups are processed 32 at a time, one group per SIMD lane (32 consecutive groups that
    all need it are read and written where they lie, others are gathered one by one;
    bench/cpu_prox_step.py compares the two): sort |z| by a 5-comparator
    network, run Gauss-Seidel sweeps of keep-3 and keep-4 until *that lane* moves by no more than
    tol·max|z| (a converged lane is frozen, so a group's result never depends on its neighbours),
    pick the best of keep-2/3/4, restore order and signs, write back in the weight's dtype;
  * for a bfloat16 or float16 result it picks the best *representable* point: every coordinate of
    the keep-3 and keep-4 candidates may round down or up to the output grid, and the lowest
    objective of those 8 + 16 points and keep-2 wins (plain rounding to nearest can land on the
    worse side of a rounding midpoint, and the stored result would then lose to another schedule's);
  * it counts the groups with 0..4 non-zeros of the result, which the learner reports every step;
  * with column weights a (score "activation") it works on v = w·a in float32 and stores v / a back,
    in the same pass over memory; `prox_layers_` runs every layer of a learning step in one call,
    its threads sharing the work of all layers.
It is built with -ffp-contract=off: no fused multiply-adds, so every operation is rounded exactly as
written, in the same order as the Triton kernel (launched with enable_fp_fusion=False) and the
PyTorch schedule in prox.py. The three give bit-identical results.
Without a C compiler prox.py falls back to its PyTorch kernels (same results, slower).
"""
from __future__ import annotations

import ctypes

import torch

from proxsparse_core import native

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <omp.h>
#define L 32
#define FP16_MIN_NORMAL 6.103515625e-05f      /* 2^-14 */
#define FP16_SUBNORMAL_STEP 5.9604644775390625e-08f   /* 2^-24 */

static inline float from_bf16(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t to_bf16(float f) {            /* round to nearest even, like torch */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline float ld(const void *w, int bf, int64_t i) { return bf ? from_bf16(((const uint16_t *)w)[i]) : ((const float *)w)[i]; }
static inline void st(void *w, int bf, int64_t i, float x) { if (bf) ((uint16_t *)w)[i] = to_bf16(x); else ((float *)w)[i] = x; }
/* c ? x : y as a select of bits: the compiler then blends lanes instead of storing under a mask,
   which is slow on some AVX2 CPUs */
static inline float sel(int c, float x, float y) {
    uint32_t a, b, m = -(uint32_t)(c != 0), r;
    float f;
    memcpy(&a, &x, 4); memcpy(&b, &y, 4);
    r = (a & m) | (b & ~m);
    memcpy(&f, &r, 4);
    return f;
}
static inline float fmax0(float x) { return x > 0.f ? x : 0.f; }

/* Output grids (grid 1: bfloat16, grid 2: float16) for magnitudes x >= 0: the largest grid value
   <= x and the next one up (equal to lo when x is on the grid). keep: the mantissa bits the grid
   keeps, step: one unit of the last kept bit, f16: 1 for float16 (whose subnormals below 2^-14 are
   steps of 2^-24). Branch-free, so the loops over lanes vectorise. */
static inline float grid_lo(float x, uint32_t keep, int f16) {
    uint32_t u;
    float t, xs = x < FP16_MIN_NORMAL ? x : 0.f;
    float sub = (float)(int32_t)(xs * 16777216.f) * FP16_SUBNORMAL_STEP;
    memcpy(&u, &x, 4);
    u &= keep;
    memcpy(&t, &u, 4);
    return (f16 & (x < FP16_MIN_NORMAL)) ? sub : t;
}
static inline float grid_hi(float lo, float x, uint32_t step, int f16) {
    uint32_t u;
    float t;
    memcpy(&u, &lo, 4);
    u += step;
    memcpy(&t, &u, 4);
    t = (f16 & (lo < FP16_MIN_NORMAL)) ? lo + FP16_SUBNORMAL_STEP : t;
    return lo == x ? lo : t;
}
static inline float obj3(float w1, float w2, float w3, float a1, float a2, float a3, float a4, float lam) {
    return 0.5f * ((w1 - a1) * (w1 - a1) + (w2 - a2) * (w2 - a2) + (w3 - a3) * (w3 - a3) + a4 * a4)
           + lam * (w1 * w2 * w3);
}
static inline float obj4(float w1, float w2, float w3, float w4, float a1, float a2, float a3, float a4, float lam) {
    return 0.5f * ((w1 - a1) * (w1 - a1) + (w2 - a2) * (w2 - a2) + (w3 - a3) * (w3 - a3) + (w4 - a4) * (w4 - a4))
           + lam * (w1 * w2 * (w3 + w4) + w3 * w4 * (w1 + w2));
}

/* prox of n <= L groups; z holds their values (z[k][l]: entry k of lane l), replaced by the result */
static void block(float z[4][L], int n, float lam, float tol, int max_sweeps, int grid) {
    float a[4][L], ix[4][L], u1[L], u2[L], u3[L], v1[L], v2[L], v3[L], v4[L], act[L];
    static const int P[5] = {0, 2, 0, 1, 1}, Q[5] = {1, 3, 2, 3, 2};
    for (int l = 0; l < L; l++)
        for (int k = 0; k < 4; k++) { a[k][l] = l < n ? (z[k][l] < 0 ? -z[k][l] : z[k][l]) : 0.f; ix[k][l] = (float)k; }
    for (int c = 0; c < 5; c++) {
        int p = P[c], q = Q[c];
        for (int l = 0; l < L; l++) {
            int s = a[p][l] < a[q][l];
            float ap = a[p][l], aq = a[q][l], ip = ix[p][l], iq = ix[q][l];
            a[p][l] = sel(s, aq, ap); a[q][l] = sel(s, ap, aq); ix[p][l] = sel(s, iq, ip); ix[q][l] = sel(s, ip, iq);
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
            u1[l] = sel(on, n1, p1); u2[l] = sel(on, n2, p2); u3[l] = sel(on, n3, p3);
            v1[l] = sel(on, m1, q1); v2[l] = sel(on, m2, q2); v3[l] = sel(on, m3, q3); v4[l] = sel(on, m4, q4);
            act[l] = (on && d > tol * a[0][l]) ? 1.f : 0.f;
            pending |= act[l] > 0.f;
        }
    }
    /* the best candidate: keep-2, then keep-3, then keep-4 (a later one must be strictly better);
       for a bfloat16/float16 result, every rounding down/up of keep-3's and keep-4's coordinates.
       Loops run over lanes innermost so that they vectorise. */
    float best[L], w0[L], w1[L], w2[L], w3[L], lo[4][L], hi[4][L];
    for (int l = 0; l < L; l++) {
        best[l] = 0.5f * (a[2][l] * a[2][l] + a[3][l] * a[3][l]);
        w0[l] = a[0][l]; w1[l] = a[1][l]; w2[l] = 0.f; w3[l] = 0.f;
    }
    if (!grid) {
        for (int l = 0; l < L; l++) {
            float o = obj3(u1[l], u2[l], u3[l], a[0][l], a[1][l], a[2][l], a[3][l], lam);
            int t = o < best[l];
            best[l] = sel(t, o, best[l]); w0[l] = sel(t, u1[l], w0[l]); w1[l] = sel(t, u2[l], w1[l]);
            w2[l] = sel(t, u3[l], w2[l]);
        }
        for (int l = 0; l < L; l++) {
            float o = obj4(v1[l], v2[l], v3[l], v4[l], a[0][l], a[1][l], a[2][l], a[3][l], lam);
            int t = o < best[l];
            best[l] = sel(t, o, best[l]); w0[l] = sel(t, v1[l], w0[l]); w1[l] = sel(t, v2[l], w1[l]);
            w2[l] = sel(t, v3[l], w2[l]); w3[l] = sel(t, v4[l], w3[l]);
        }
    } else {
        /* (x - a)^2 of each rounding, computed once: the same values obj3/obj4 would compute */
        float dl[4][L], dh[4][L];
        const uint32_t keep = grid == 1 ? 0xffff0000u : 0xffffe000u, step = grid == 1 ? 65536u : 8192u;
        const int f16 = grid == 2;
        for (int l = 0; l < L; l++) {
            lo[0][l] = grid_lo(u1[l], keep, f16); hi[0][l] = grid_hi(lo[0][l], u1[l], step, f16);
            lo[1][l] = grid_lo(u2[l], keep, f16); hi[1][l] = grid_hi(lo[1][l], u2[l], step, f16);
            lo[2][l] = grid_lo(u3[l], keep, f16); hi[2][l] = grid_hi(lo[2][l], u3[l], step, f16);
        }
        for (int k = 0; k < 3; k++)
            for (int l = 0; l < L; l++) {
                dl[k][l] = (lo[k][l] - a[k][l]) * (lo[k][l] - a[k][l]);
                dh[k][l] = (hi[k][l] - a[k][l]) * (hi[k][l] - a[k][l]);
            }
        for (int c = 0; c < 8; c++)
            for (int l = 0; l < L; l++) {
                float x1 = c & 1 ? hi[0][l] : lo[0][l], x2 = c & 2 ? hi[1][l] : lo[1][l], x3 = c & 4 ? hi[2][l] : lo[2][l];
                float d1 = c & 1 ? dh[0][l] : dl[0][l], d2 = c & 2 ? dh[1][l] : dl[1][l], d3 = c & 4 ? dh[2][l] : dl[2][l];
                float o = 0.5f * (d1 + d2 + d3 + a[3][l] * a[3][l]) + lam * (x1 * x2 * x3);
                int t = o < best[l];
                best[l] = sel(t, o, best[l]); w0[l] = sel(t, x1, w0[l]); w1[l] = sel(t, x2, w1[l]);
                w2[l] = sel(t, x3, w2[l]); w3[l] = sel(t, 0.f, w3[l]);
            }
        for (int l = 0; l < L; l++) {
            lo[0][l] = grid_lo(v1[l], keep, f16); hi[0][l] = grid_hi(lo[0][l], v1[l], step, f16);
            lo[1][l] = grid_lo(v2[l], keep, f16); hi[1][l] = grid_hi(lo[1][l], v2[l], step, f16);
            lo[2][l] = grid_lo(v3[l], keep, f16); hi[2][l] = grid_hi(lo[2][l], v3[l], step, f16);
            lo[3][l] = grid_lo(v4[l], keep, f16); hi[3][l] = grid_hi(lo[3][l], v4[l], step, f16);
        }
        for (int k = 0; k < 4; k++)
            for (int l = 0; l < L; l++) {
                dl[k][l] = (lo[k][l] - a[k][l]) * (lo[k][l] - a[k][l]);
                dh[k][l] = (hi[k][l] - a[k][l]) * (hi[k][l] - a[k][l]);
            }
        for (int c = 0; c < 16; c++)
            for (int l = 0; l < L; l++) {
                float x1 = c & 1 ? hi[0][l] : lo[0][l], x2 = c & 2 ? hi[1][l] : lo[1][l];
                float x3 = c & 4 ? hi[2][l] : lo[2][l], x4 = c & 8 ? hi[3][l] : lo[3][l];
                float d1 = c & 1 ? dh[0][l] : dl[0][l], d2 = c & 2 ? dh[1][l] : dl[1][l];
                float d3 = c & 4 ? dh[2][l] : dl[2][l], d4 = c & 8 ? dh[3][l] : dl[3][l];
                float o = 0.5f * (d1 + d2 + d3 + d4) + lam * (x1 * x2 * (x3 + x4) + x3 * x4 * (x1 + x2));
                int t = o < best[l];
                best[l] = sel(t, o, best[l]); w0[l] = sel(t, x1, w0[l]); w1[l] = sel(t, x2, w1[l]);
                w2[l] = sel(t, x3, w2[l]); w3[l] = sel(t, x4, w3[l]);
            }
    }
    for (int j = 0; j < 4; j++)               /* back to original position j (selects, no scatter) */
        for (int l = 0; l < L; l++) {
            float fj = (float)j;
            float m = sel(ix[0][l] == fj, w0[l], sel(ix[1][l] == fj, w1[l], sel(ix[2][l] == fj, w2[l], w3[l])));
            float zj = z[j][l];
            z[j][l] = sel(zj > 0, m, sel(zj < 0, -m, 0.f));
        }
}

/* One layer's groups for the driver below. a: NULL, or one float per input column (cols of them):
   the prox then works on v = w·a (float32, rounded as written), and w = v / a is stored back. */
typedef struct { void *w; int bf; int grid; const float *a; int64_t cols; float lam; } layer_t;

/* prox the gathered block, write it back and count the non-zeros of the result (of v with a;
   ca[k][l]: the column weight of entry k of lane l, when the layer has them) */
static void flush(const layer_t *t, const int64_t *gi, float z[4][L], const float ca[4][L], int n, float tol,
                  int max_sweeps, int64_t *h) {
    block(z, n, t->lam, tol, max_sweeps, t->grid);
    if (t->a) {
        int cnt[L];
        for (int l = 0; l < L; l++)
            cnt[l] = (z[0][l] != 0.f) + (z[1][l] != 0.f) + (z[2][l] != 0.f) + (z[3][l] != 0.f);
        for (int k = 0; k < 4; k++)           /* w = v / a, lanes side by side (lanes >= n: unused) */
            for (int l = 0; l < L; l++) z[k][l] = z[k][l] / ca[k][l];
        for (int l = 0; l < n; l++) {
            int64_t base = 4 * gi[l];
            for (int k = 0; k < 4; k++) st(t->w, t->bf, base + k, z[k][l]);
            h[cnt[l]]++;
        }
        return;
    }
    for (int l = 0; l < n; l++) {
        int c = 0;
        int64_t base = 4 * gi[l];
        for (int k = 0; k < 4; k++) { st(t->w, t->bf, base + k, z[k][l]); c += ld(t->w, t->bf, base + k) != 0.f; }
        h[c]++;
    }
}

/* The 32 consecutive groups i .. i+31 of one layer as one block, read in place with loops that
   vectorise (no gathering group by group): when every one of them has >= 3 non-zeros (of
   v = w·a with column weights, and lam > 0), the usual case while learning, since AdamW moves the
   zeros the prox made. The block is then solved and stored by flush(), so the result is bit for bit
   the per-group path's. Returns 0, having written nothing, when some group has <= 2 non-zeros. */
static int run32(const layer_t *t, int64_t i, float tol, int max_sweeps, int64_t *h) {
    float z[4][L], av[4 * L], ca[4][L];
    const float *ap = 0;
    const int64_t e0 = 4 * i;
    if (t->a) {
        const int64_t c0 = e0 % t->cols;
        if (!(t->lam > 0.f)) return 0;
        if (c0 + 4 * L <= t->cols) ap = t->a + c0;
        else {                                       /* the run wraps around a row's end */
            int64_t c = c0;
            for (int e = 0; e < 4 * L; e++) { av[e] = t->a[c]; if (++c == t->cols) c = 0; }
            ap = av;
        }
    }
    if (t->bf) {
        const uint16_t *w = (const uint16_t *)t->w + e0;
        if (ap) { for (int l = 0; l < L; l++) for (int k = 0; k < 4; k++) z[k][l] = from_bf16(w[4 * l + k]) * ap[4 * l + k]; }
        else    { for (int l = 0; l < L; l++) for (int k = 0; k < 4; k++) z[k][l] = from_bf16(w[4 * l + k]); }
    } else {
        const float *w = (const float *)t->w + e0;
        if (ap) { for (int l = 0; l < L; l++) for (int k = 0; k < 4; k++) z[k][l] = w[4 * l + k] * ap[4 * l + k]; }
        else    { for (int l = 0; l < L; l++) for (int k = 0; k < 4; k++) z[k][l] = w[4 * l + k]; }
    }
    int sparse = 0;
    for (int l = 0; l < L; l++)
        sparse |= (z[0][l] != 0.f) + (z[1][l] != 0.f) + (z[2][l] != 0.f) + (z[3][l] != 0.f) <= 2;
    if (sparse) return 0;
    int64_t gi[L];
    for (int l = 0; l < L; l++) gi[l] = i + l;
    if (ap) for (int l = 0; l < L; l++) for (int k = 0; k < 4; k++) ca[k][l] = ap[4 * l + k];
    flush(t, gi, z, ca, L, tol, max_sweeps, h);      /* solved and stored as a gathered block is */
    return 1;
}

/* groups [g0, g1) of one layer: those with <= 2 non-zeros are their own prox (with a, only the
   round trip w·a / a is stored), the others are gathered 32 at a time and solved; runs of 32 that
   need no gathering go through run32 (after a run that did, the next 32 groups are gathered) */
static void range(const layer_t *t, int64_t g0, int64_t g1, float tol, int max_sweeps, int64_t *h) {
    int64_t gi[L], retry = g0;
    float z[4][L], ca[4][L];
    int n = 0;
    for (int k = 0; k < 4; k++) for (int l = 0; l < L; l++) ca[k][l] = 1.f;
    for (int64_t i = g0; i < g1; i++) {
        if (n == 0 && i >= retry && i + L <= g1) {
            if (run32(t, i, tol, max_sweeps, h)) { i += L - 1; continue; }
            retry = i + L;
        }
        float v[4];
        const float *a = 0;
        int nz = 0;
        if (t->a) {
            a = t->a + (4 * i) % t->cols;
            for (int k = 0; k < 4; k++) { v[k] = ld(t->w, t->bf, 4 * i + k) * a[k]; nz += v[k] != 0.f; }
            if (nz <= 2 || !(t->lam > 0.f)) {
                for (int k = 0; k < 4; k++) st(t->w, t->bf, 4 * i + k, v[k] / a[k]);
                h[nz]++;
                continue;
            }
        } else {
            for (int k = 0; k < 4; k++) { v[k] = ld(t->w, t->bf, 4 * i + k); nz += v[k] != 0.f; }
            if (nz <= 2) { h[nz]++; continue; }      /* already 2:4: its own prox */
        }
        gi[n] = i;
        for (int k = 0; k < 4; k++) z[k][n] = v[k];
        if (a) for (int k = 0; k < 4; k++) ca[k][n] = a[k];
        if (++n == L) { flush(t, gi, z, ca, n, tol, max_sweeps, h); n = 0; }
    }
    if (n) flush(t, gi, z, ca, n, tol, max_sweeps, h);
}

/* In place on g groups of 4 (float32 if bf == 0, bfloat16 if bf == 1); grid: the result's number
   format (0: float32, 1: bfloat16, 2: float16 values kept in float32 storage); hist[0..4] += groups
   with 0..4 non-zeros in the result. */
void prox24(void *w, int bf, int64_t g, float lam, float tol, int max_sweeps, int grid, int threads,
            int64_t *hist) {
    int64_t total[5] = {0, 0, 0, 0, 0};
    layer_t t = {w, bf, grid, 0, 4, lam};
    #pragma omp parallel num_threads(threads)
    {
        int64_t h[5] = {0, 0, 0, 0, 0};
        int nt = omp_get_num_threads(), id = omp_get_thread_num();
        range(&t, g * id / nt, g * (id + 1) / nt, tol, max_sweeps, h);
        #pragma omp critical
        for (int k = 0; k < 5; k++) total[k] += h[k];
    }
    for (int k = 0; k < 5; k++) hist[k] += total[k];
}

/* The prox of m layers in one call (a learning step's): layer j has groups[j] groups of w[j]
   (bf[j] as above), its own lam[j], and with a[j] != NULL the prox of v = w·a in float32, v / a
   stored back (cols[j] input columns). Output grid: the storage's (float32 with a). Lam 0 leaves a
   layer as it is (with a: the round trip). hist[5 j + c] += groups of layer j with c non-zeros. */
void prox24_layers(int m, void **w, const int *bf, const int64_t *groups, const float **a, const int64_t *cols,
                   const float *lam, float tol, int max_sweeps, int threads, int64_t *hist) {
    enum { CHUNK = 16384 };
    int64_t nchunks = 0;
    for (int j = 0; j < m; j++) nchunks += (groups[j] + CHUNK - 1) / CHUNK;
    #pragma omp parallel num_threads(threads)
    {
        int j = 0;
        int64_t first = 0;       /* chunk index where layer j starts */
        #pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < nchunks; c++) {
            while (c >= first + (groups[j] + CHUNK - 1) / CHUNK) { first += (groups[j] + CHUNK - 1) / CHUNK; j++; }
            layer_t t = {w[j], bf[j], a[j] ? 0 : bf[j], a[j], a[j] ? cols[j] : 4, lam[j]};
            int64_t g0 = (c - first) * CHUNK, g1 = g0 + CHUNK < groups[j] ? g0 + CHUNK : groups[j];
            int64_t h[5] = {0, 0, 0, 0, 0};
            if (a[j] || lam[j] > 0.f) range(&t, g0, g1, tol, max_sweeps, h);
            else for (int64_t i = g0; i < g1; i++) {
                int nz = 0;
                for (int k = 0; k < 4; k++) nz += ld(w[j], bf[j], 4 * i + k) != 0.f;
                h[nz]++;
            }
            for (int k = 0; k < 5; k++) {
                #pragma omp atomic
                hist[5 * j + k] += h[k];
            }
        }
    }
}
"""

def _setup(lib) -> None:
    lib.prox24.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_float,
                           ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.prox24.restype = None
    lib.prox24_layers.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 6 + [ctypes.c_float, ctypes.c_int, ctypes.c_int,
                                                                           ctypes.c_void_p]
    lib.prox24_layers.restype = None


_LIB = native.Library("prox24", _SOURCE, _setup)


def available() -> bool:
    """True when the kernel is built (or could be built now). Set PROXSPARSE_NATIVE=0 to disable."""
    return _LIB.get() is not None


def supports(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16) and t.is_contiguous()


GRIDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def prox_(groups: torch.Tensor, lam: float, tol: float, max_sweeps: int,
          hist: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """In place on a contiguous CPU float32/bfloat16 tensor of shape [G, 4]; adds the non-zero
    counts of the result to `hist` (int64 [5]) when given. `out_dtype` (default: the tensor's) is
    the number format the result must be exact in: float16 results can be computed in a float32
    buffer and then converted without rounding."""
    assert supports(groups) and groups.shape[-1] == 4 and available()
    grid = GRIDS[out_dtype or groups.dtype]
    assert groups.dtype == torch.float32 or grid == 1, "bfloat16 storage holds bfloat16 results only"
    counts = torch.zeros(5, dtype=torch.int64)
    _LIB.get().prox24(groups.data_ptr(), int(groups.dtype == torch.bfloat16), groups.numel() // 4,
                      float(lam), float(tol), int(max_sweeps), grid, torch.get_num_threads(), counts.data_ptr())
    if hist is not None:
        hist += counts.to(hist.device)
    return groups


def layers_supported(weights: list, cols: list | None = None) -> bool:
    """Whether `prox_layers_` takes these weights: contiguous CPU float32/bfloat16 matrices whose rows
    are whole groups, with float32 CPU column weights (one per input column) where given."""
    if not available():
        return False
    for i, w in enumerate(weights):
        if not (supports(w) and w.dim() == 2 and w.shape[1] % 4 == 0):
            return False
        a = None if cols is None else cols[i]
        if a is not None and not (a.device.type == "cpu" and a.dtype == torch.float32 and a.is_contiguous()
                                  and a.dim() == 1 and a.numel() == w.shape[1]):
            return False
    return True


def prox_layers_(weights: list, lams: list, tol: float, max_sweeps: int, cols: list | None = None) -> torch.Tensor:
    """The prox of every matrix in `weights`, in place, in one call (threads share the work of all
    layers): layer j at λ `lams[j]`. With `cols[j]` (column weights a), the prox of V = W·diag(a)
    in float32 and W = V / a stored back, exactly as

        v = w.float() * a;  prox_(v.view(-1, 4), λ);  w.copy_(v / a)

    computes it (with λ 0 only the round trip). Without, exactly `prox_(w.view(-1, 4), λ)` (nothing
    at λ 0). Returns int64 [layers, 5]: each layer's groups with 0..4 non-zeros of the result (of V
    with column weights). Check `layers_supported` first."""
    m = len(weights)
    hist = torch.zeros(m, 5, dtype=torch.int64)
    if m == 0:
        return hist
    keep = list(weights) + [a for a in (cols or []) if a is not None]     # alive during the call
    ptrs = (ctypes.c_void_p * m)(*[w.data_ptr() for w in weights])
    bf = (ctypes.c_int * m)(*[int(w.dtype == torch.bfloat16) for w in weights])
    groups = (ctypes.c_int64 * m)(*[w.numel() // 4 for w in weights])
    a = (ctypes.c_void_p * m)(*[(None if cols is None or cols[j] is None else cols[j].data_ptr()) for j in range(m)])
    ncols = (ctypes.c_int64 * m)(*[w.shape[1] for w in weights])
    lam = (ctypes.c_float * m)(*[float(x) for x in lams])
    _LIB.get().prox24_layers(m, ptrs, bf, groups, a, ncols, lam, float(tol), int(max_sweeps),
                             torch.get_num_threads(), hist.data_ptr())
    del keep
    return hist
