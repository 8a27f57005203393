"""Diagnosis, not part of the product: where does the 2–16-token `mma` kernel (decode24_triton.mm24) spend
its time? Variants of its loop on the same packed weights, timed like bench/decode24.py (CUDA graphs cycling
through 6 weight copies, median of replays); results in bench/RESULTS.md, sections 2a‴, 2a⁗ and 2a⁵.
"shipped" rows time mm24 as it is now (2-D tiles since 2026-12-07); the variants below keep the 3-D tiles
it had before.

  full      the loop on 3-D tiles [rows, meta words, 8] (prmt expansion, join, tensor-core product)
  loads     the same loads (values as [rows, meta words, 8] int32, meta, activations), summed cheaply
  expand    loads, expansion and join, summed without the product
  nojoin    the values read as a plain [rows, columns/2] tile and multiplied by half the activations: the
            product and its layout without any expansion (a wrong result; a ceiling)
  prefetch  `full` with the next step's loads issued before this step's expansion
  gemvT     a multi-token CUDA-core kernel, the accumulator kept as the whole tile (2–8 tokens)
With MAIN2D=1: the loop on 2-D tiles, values as [rows, columns/4] int32 words (what mm24 adopted) or as
the bf16 [rows, columns/2] tile split into each group's pair (mm2d's docstring). MAIN2D=2 (bench/RESULTS.md 2a⁵):
the 2-D loop with the weight as the dot's left operand, over more program shapes.

    python3 bench/decode24_diag.py                  # CUDA; writes diag.json under $OUT (default .)
    TRITON_INTERPRET=1 python3 bench/decode24_diag.py   # CPU: every variant checked against the dense product
"""
import os, sys, json, statistics
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch, triton, triton.language as tl
import torch.nn.functional as F
from proxsparse_core.inference import decode24 as d24
from proxsparse_core.inference.decode24_triton import expand
from proxsparse_core.inference.sparse24 import random_24_weight
INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"

@triton.jit
def diag(x_ptr, v_ptr, m_ptr, y_ptr, T, N, K, KW, KM, stride_x, BN: tl.constexpr, BK: tl.constexpr,
         TP: tl.constexpr, SPLIT: tl.constexpr, MODE: tl.constexpr, ASM: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    rt = tl.arange(0, TP)
    tmask = rt < T
    steps = tl.cdiv(K, BK)
    per = tl.cdiv(steps, SPLIT)
    k_lo = pid_s * per * BK
    acc = tl.zeros([TP, BN], dtype=tl.float32)
    j8 = tl.arange(0, BK // 32)
    j = tl.arange(0, 8)
    v_off = rn[:, None, None].to(tl.int64) * KW + (j8[None, :, None] * 8 + j[None, None, :])
    m_off = rn[:, None].to(tl.int64) * KM + j8[None, :]
    shift = (4 * j)[None, None, :]
    x_row = x_ptr + rt[:, None] * stride_x
    v2 = rn[:, None].to(tl.int64) * (2 * KW) + tl.arange(0, BK // 2)[None, :]
    if MODE == 4:
        kk = k_lo + tl.arange(0, BK)
        inside = k_lo < 4 * KW
        vw = tl.load(v_ptr + v_off + k_lo // 4, mask=nmask[:, None, None] & inside, other=0)
        mw = tl.load(m_ptr + m_off + k_lo // 32, mask=nmask[:, None] & inside, other=0)
        x = tl.load(x_row + kk[None, :], mask=tmask[:, None] & (kk < K)[None, :], other=0.0)
        for k0 in range(k_lo, k_lo + per * BK, BK):
            kn = k0 + BK
            inn = (kn < 4 * KW) & (kn < k_lo + per * BK)
            kkn = kn + tl.arange(0, BK)
            vwn = tl.load(v_ptr + v_off + kn // 4, mask=nmask[:, None, None] & inn, other=0)
            mwn = tl.load(m_ptr + m_off + kn // 32, mask=nmask[:, None] & inn, other=0)
            xn = tl.load(x_row + kkn[None, :], mask=tmask[:, None] & (kkn < K)[None, :] & inn, other=0.0)
            code = (mw[:, :, None] >> shift) & 15
            d0, d1, d2, d3 = expand(vw, code, x_ptr.dtype.element_ty, ASM)
            w = tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), [BN, BK])
            acc = tl.dot(x, tl.trans(w), acc)
            vw, mw, x = vwn, mwn, xn
    k_hi = k_lo + per * BK
    if MODE == 4:
        k_hi = k_lo
    for k0 in range(k_lo, k_hi, BK):
        inside = k0 < 4 * KW
        if MODE == 3:
            vh = tl.load(v_ptr.to(tl.pointer_type(x_ptr.dtype.element_ty)) + v2 + k0 // 2, mask=nmask[:, None] & inside, other=0.0)
            mw = tl.load(m_ptr + m_off + k0 // 32, mask=nmask[:, None] & inside, other=0)
            kk = k0 // 2 + tl.arange(0, BK // 2)
            x = tl.load(x_row + kk[None, :], mask=tmask[:, None] & (kk < K)[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(vh), acc)
            acc += tl.sum(mw, axis=1).to(tl.float32)[None, :] * 1e-30
        else:
            vw = tl.load(v_ptr + v_off + k0 // 4, mask=nmask[:, None, None] & inside, other=0)
            mw = tl.load(m_ptr + m_off + k0 // 32, mask=nmask[:, None] & inside, other=0)
            kk = k0 + tl.arange(0, BK)
            x = tl.load(x_row + kk[None, :], mask=tmask[:, None] & (kk < K)[None, :], other=0.0)
            if MODE == 1:
                s = tl.sum(tl.sum(vw ^ (mw[:, :, None] >> shift), axis=2), axis=1).to(tl.float32)
                acc += s[None, :] * 1e-30 + tl.sum(x.to(tl.float32), axis=1)[:, None] * 1e-30
            else:
                code = (mw[:, :, None] >> shift) & 15
                d0, d1, d2, d3 = expand(vw, code, x_ptr.dtype.element_ty, ASM)
                w = tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), [BN, BK])
                if MODE == 2:
                    acc += tl.sum(w.to(tl.float32), axis=1)[None, :] + tl.sum(x.to(tl.float32), axis=1)[:, None] * 1e-30
                else:
                    acc = tl.dot(x, tl.trans(w), acc)
    # partial sums of the shares simply added (a diagnosis: order does not matter)
    out = y_ptr + rt[:, None] * N + rn[None, :]
    tl.atomic_add(out, acc, mask=tmask[:, None] & nmask[None, :])


@triton.jit
def gemvT(x_ptr, v_ptr, m_ptr, y_ptr, T, N, K, KG, KM, sxw, TT: tl.constexpr, BN: tl.constexpr,
          BG: tl.constexpr, SPLIT: tl.constexpr, SEL: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    BW: tl.constexpr = BG // 8
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    rw = tl.arange(0, BW)
    rj = tl.arange(0, 8)
    rt = tl.arange(0, TT)
    steps = tl.cdiv(KG, BG)
    per = tl.cdiv(steps, SPLIT)
    g_lo = pid_s * per * BG
    shift = (4 * rj)[None, None, :]
    goff = rw[:, None] * 8 + rj[None, :]
    v_row = v_ptr + rn[:, None, None].to(tl.int64) * KG
    m_row = m_ptr + rn[:, None].to(tl.int64) * KM
    x_row = x_ptr + rt[:, None, None] * sxw
    acc = tl.zeros([TT, BN, BW, 8], dtype=tl.float32)
    for g0 in range(g_lo, g_lo + per * BG, BG):
        g = g0 + goff
        vw = tl.load(v_row + g[None, :, :], mask=nmask[:, None, None] & (g < KG)[None, :, :], other=0)
        mw = tl.load(m_row + (g0 // 8 + rw)[None, :], mask=nmask[:, None] & (g0 + rw * 8 < KG)[None, :], other=0)
        xw = tl.load(x_row + g[None, :, :], mask=(rt < T)[:, None, None] & (g < KG)[None, :, :], other=0)
        code = (mw[:, :, None] >> shift) & 15
        a = code & 3
        b = code >> 2
        v0 = (vw << 16).to(tl.float32, bitcast=True)
        v1 = (vw & -65536).to(tl.float32, bitcast=True)
        lo = xw.to(tl.int32)
        hi = (xw >> 32).to(tl.int32)
        x0 = (lo << 16).to(tl.float32, bitcast=True)[:, None, :, :]
        x1 = (lo & -65536).to(tl.float32, bitcast=True)[:, None, :, :]
        x2 = (hi << 16).to(tl.float32, bitcast=True)[:, None, :, :]
        x3 = (hi & -65536).to(tl.float32, bitcast=True)[:, None, :, :]
        if SEL:     # selects on the activations, per token (as gemv24)
            s0 = tl.where((a < 2)[None], x0, tl.where((a == 2)[None], x1, x2))
            s1 = tl.where((b == 0)[None], x1, tl.where((b == 1)[None], x2, x3))
            acc += v0[None] * s0 + v1[None] * s1
        else:       # the weight expanded once, shared by the tokens
            w0 = tl.where(a < 2, v0, 0.0)
            w1 = tl.where(a == 2, v0, tl.where(b == 0, v1, 0.0))
            w2 = tl.where(a == 3, v0, tl.where(b == 1, v1, 0.0))
            w3 = tl.where(b >= 2, v1, 0.0)
            acc += w0[None] * x0 + w1[None] * x1 + w2[None] * x2 + w3[None] * x3
    tot = tl.sum(tl.sum(acc, axis=3), axis=2)
    out = y_ptr + rt[:, None] * N + rn[None, :]
    tl.atomic_add(out, tot, mask=(rt < T)[:, None] & nmask[None, :])


def runT(x, vals, meta, y, bn, bg, split, warps, sel):
    t, k = x.shape
    n = vals.shape[0]
    words = vals.view(torch.int32)
    tt = max(2, triton.next_power_of_2(t))
    gemvT[(triton.cdiv(n, bn), split)](x.view(torch.int64), words, meta, y, t, n, k, words.shape[1], meta.shape[1],
                                       x.stride(0) // 4, TT=tt, BN=bn, BG=bg, SPLIT=split, SEL=sel,
                                       num_warps=warps, num_stages=1)


@triton.jit
def mm2d(x_ptr, v_ptr, m_ptr, y_ptr, T, N, K, KW, KM, stride_x, BN: tl.constexpr, BK: tl.constexpr,
         TP: tl.constexpr, SPLIT: tl.constexpr, MODE: tl.constexpr, ASM: tl.constexpr):
    """2-D tiles: values as [BN, BK/4] int32 words (MODE 11, 12) or [BN, BK/2] bf16 (MODE 13), meta
    [BN, BK/32] broadcast to the groups. 10: 3-D loads as mm24, summed elementwise (reduced at the end);
    11: 2-D loads, summed elementwise; 12: 2-D loads, prmt expansion, join, dot; 13: bf16 loads split
    into the pair, expansion by selects, join, dot; 14: as 12 with the weight as the dot's left operand."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    rt = tl.arange(0, TP)
    tmask = rt < T
    steps = tl.cdiv(K, BK)
    per = tl.cdiv(steps, SPLIT)
    k_lo = pid_s * per * BK
    acc = tl.zeros([TP, BN], dtype=tl.float32)
    accT = tl.zeros([BN, TP], dtype=tl.float32)
    acc2 = tl.zeros([BN, BK // 4], dtype=tl.int32)
    acc3 = tl.zeros([BN, BK // 32, 8], dtype=tl.int32)
    rw = tl.arange(0, BK // 4)
    rm = tl.arange(0, BK // 32)
    v_off = rn[:, None].to(tl.int64) * KW + rw[None, :]
    h_off = rn[:, None].to(tl.int64) * (2 * KW) + tl.arange(0, BK // 2)[None, :]
    m_off = rn[:, None].to(tl.int64) * KM + rm[None, :]
    shift = (4 * (rw % 8))[None, :]
    j = tl.arange(0, 8)
    v3 = rn[:, None, None].to(tl.int64) * KW + (rm[None, :, None] * 8 + j[None, None, :])
    shift3 = (4 * j)[None, None, :]
    x_row = x_ptr + rt[:, None] * stride_x
    for k0 in range(k_lo, k_lo + per * BK, BK):
        inside = k0 < 4 * KW
        mw = tl.load(m_ptr + m_off + k0 // 32, mask=nmask[:, None] & inside, other=0)
        kk = k0 + tl.arange(0, BK)
        x = tl.load(x_row + kk[None, :], mask=tmask[:, None] & (kk < K)[None, :], other=0.0)
        if MODE == 10:
            vw = tl.load(v_ptr + v3 + k0 // 4, mask=nmask[:, None, None] & inside, other=0)
            acc3 += vw ^ (mw[:, :, None] >> shift3)
        else:
            code = (tl.reshape(tl.broadcast_to(mw[:, :, None], [BN, BK // 32, 8]), [BN, BK // 4]) >> shift) & 15
            if MODE == 13:
                vh = tl.load(v_ptr.to(tl.pointer_type(x_ptr.dtype.element_ty)) + h_off + k0 // 2,
                             mask=nmask[:, None] & inside, other=0.0)
                v0, v1 = tl.split(tl.reshape(vh, [BN, BK // 4, 2]))
                a = code & 3
                b = code >> 2
                zero = tl.zeros_like(v0)
                d0 = tl.where(a < 2, v0, zero)
                d1 = tl.where(a == 2, v0, tl.where(b == 0, v1, zero))
                d2 = tl.where(a == 3, v0, tl.where(b == 1, v1, zero))
                d3 = tl.where(b >= 2, v1, zero)
                w = tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), [BN, BK])
                acc = tl.dot(x, tl.trans(w), acc)
            else:
                vw = tl.load(v_ptr + v_off + k0 // 4, mask=nmask[:, None] & inside, other=0)
                if MODE == 11:
                    acc2 += vw ^ code
                else:
                    d0, d1, d2, d3 = expand(vw, code, x_ptr.dtype.element_ty, ASM)
                    w = tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), [BN, BK])
                    if MODE == 14:       # the weight as the left operand: [BN, BK] · [BK, TP]
                        accT = tl.dot(w, tl.trans(x), accT)
                    else:
                        acc = tl.dot(x, tl.trans(w), acc)
        acc += tl.sum(x.to(tl.float32), axis=1)[:, None] * 1e-30 if MODE < 12 else 0.0
    if MODE == 10:
        acc += tl.sum(tl.sum(acc3, axis=2), axis=1).to(tl.float32)[None, :] * 1e-30
    if MODE == 11:
        acc += tl.sum(acc2, axis=1).to(tl.float32)[None, :] * 1e-30
    if MODE == 14:
        acc = tl.trans(accT)
    out = y_ptr + rt[:, None] * N + rn[None, :]
    tl.atomic_add(out, acc, mask=tmask[:, None] & nmask[None, :])


def run2d(x, vals, meta, y, cfg, mode):
    t, k = x.shape
    n = vals.shape[0]
    words = vals.view(torch.int32)
    mm2d[(triton.cdiv(n, cfg.bn), cfg.split)](x, words, meta, y, t, n, k, words.shape[1], meta.shape[1], x.stride(0),
                                              BN=cfg.bn, BK=cfg.bk, TP=16, SPLIT=cfg.split, MODE=mode,
                                              ASM=not INTERP, num_warps=cfg.warps, num_stages=cfg.stages)


def run(x, vals, meta, y, cfg, mode):
    t, k = x.shape
    n = vals.shape[0]
    words = vals.view(torch.int32)
    diag[(triton.cdiv(n, cfg.bn), cfg.split)](x, words, meta, y, t, n, k, words.shape[1], meta.shape[1], x.stride(0),
                                              BN=cfg.bn, BK=cfg.bk, TP=16, SPLIT=cfg.split, MODE=mode,
                                              ASM=not INTERP, num_warps=cfg.warps, num_stages=cfg.stages)


def main():
    dev = "cpu" if INTERP else "cuda"
    if INTERP:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        import triton_interp; triton_interp.install()
        from test_decode24 import weight_24
        w = weight_24(64, 256, seed=1, dtype=torch.float16)
        vals, meta = d24.pack_24(w)
        x = torch.randn(3, 256).half()
        y = torch.zeros(3, 64)
        run(x, vals, meta, y, d24.Config(bn=16, bk=64, split=2), 0)
        ref = x.float() @ w.float().t()
        print("full err", float((y - ref).norm() / ref.norm()))
        for mode in (1, 2, 3):
            y.zero_(); run(x, vals, meta, y, d24.Config(bn=16, bk=64, split=2), mode); print("mode", mode, "ran")
        y.zero_(); run(x, vals, meta, y, d24.Config(bn=16, bk=64, split=2), 4)
        print("prefetch err", float((y - ref).norm() / ref.norm()))
        for mode in (12, 13, 14):
            y.zero_(); run2d(x, vals, meta, y, d24.Config(bn=16, bk=64, split=2), mode)
            print("2d mode", mode, "err", float((y - ref).norm() / ref.norm()))
        for mode in (10, 11):
            y.zero_(); run2d(x, vals, meta, y, d24.Config(bn=16, bk=64, split=2), mode); print("2d mode", mode, "ran")
        xb = x.bfloat16(); wb = weight_24(64, 256, seed=1, dtype=torch.bfloat16)
        vb, mb = d24.pack_24(wb); refb = xb.float() @ wb.float().t()
        for sel in (False, True):
            for split in (1, 2):
                y.zero_(); runT(xb, vb, mb, y, 16, 16, split, 1, sel)
                print("gemvT sel", sel, "split", split, "err", float((y - refb).norm() / refb.norm()))
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from decode24 import graph_call_ms
    res = []
    for (o, i) in [(4096, 4096), (11008, 4096), (4096, 11008)]:
        ws = [random_24_weight(o, i, seed=s) for s in range(6)]
        packed = [d24.pack_24(w) for w in ws]
        for t in (2, 4, 8, 16):
            x = torch.randn(t, i, device="cuda", dtype=torch.bfloat16)
            y = torch.zeros(t, o, device="cuda", dtype=torch.float32)
            dense = graph_call_ms([lambda w=w: F.linear(x, w) for w in ws])
            row = dict(shape=f"{o}x{i}", tokens=t, dense_us=1e3 * dense)
            for cfg in (d24.Config(bn=32, bk=128, split=4, warps=2), d24.Config(bn=16, bk=128, split=2, warps=1),
                        d24.Config(bn=64, bk=128, split=4, warps=4)):
                sem = torch.zeros(o, dtype=torch.int32, device="cuda")
                row[f"{cfg}:shipped"] = round(1e3 * graph_call_ms([lambda p=p: d24.mm24(x, *p, i, None, cfg, sem) for p in packed]), 1)
                for mode, name in ((0, "full"), (1, "loads"), (2, "expand"), (3, "nojoin"), (4, "prefetch")):
                    try:
                        ms = graph_call_ms([lambda p=p: run(x, p[0], p[1], y, cfg, mode) for p in packed])
                        row[f"{cfg}:{name}"] = round(1e3 * ms, 1)
                    except Exception as e:
                        row[f"{cfg}:{name}"] = f"{type(e).__name__}"
            if t <= 8:
                ref = x.float() @ ws[0].float().t()
                for bn, bg, split, warps in ((4, 128, 2, 1), (8, 128, 2, 2), (8, 128, 4, 2), (4, 256, 2, 2),
                                             (16, 128, 2, 4), (8, 64, 4, 1), (2, 128, 4, 1)):
                    for sel in (False, True):
                        key = f"T·BN{bn}·BG{bg}·S{split}·W{warps}·{'sel' if sel else 'exp'}"
                        try:
                            y.zero_(); runT(x, *packed[0], y, bn, bg, split, warps, sel)
                            err = float((y - ref).norm() / ref.norm())
                            ms = graph_call_ms([lambda p=p: runT(x, p[0], p[1], y, bn, bg, split, warps, sel) for p in packed])
                            row[key] = [round(1e3 * ms, 1), float(f"{err:.1e}")]
                        except Exception as e:
                            row[key] = f"{type(e).__name__}: {str(e)[:80]}"
            res.append(row)
            print(json.dumps(row), flush=True)
    json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "diag.json"), "w"), indent=1)


C = d24.Config
CONFIGS2D = [C(bn=32, bk=128, split=4, warps=2), C(bn=64, bk=128, split=4, warps=4), C(bn=64, bk=256, split=4, warps=4),
             C(bn=32, bk=128, split=4, warps=2, stages=1), C(bn=64, bk=128, split=8, warps=4, stages=2),
             C(bn=16, bk=128, split=2, warps=1)]
MODES2D = [(10, "loads3"), (11, "loads2"), (12, "full2"), (13, "full2s")]
if os.environ.get("MAIN2D") == "2":      # the second round: the left-operand product, more shapes of program
    CONFIGS2D = [C(bn=16, bk=128, split=2, warps=1), C(bn=32, bk=128, split=4, warps=2), C(bn=64, bk=128, split=4, warps=4),
                 C(bn=64, bk=128, split=2, warps=4), C(bn=128, bk=128, split=2, warps=4), C(bn=128, bk=128, split=4, warps=8),
                 C(bn=64, bk=64, split=4, warps=4), C(bn=32, bk=256, split=2, warps=2), C(bn=16, bk=128, split=4, warps=1, stages=2)]
    MODES2D = [(12, "full2"), (14, "full2T")]


def main2d():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from decode24 import graph_call_ms
    res = []
    for (o, i) in [(4096, 4096), (11008, 4096), (4096, 11008)]:
        ws = [random_24_weight(o, i, seed=s) for s in range(6)]
        packed = [d24.pack_24(w) for w in ws]
        for t in (2, 16):
            x = torch.randn(t, i, device="cuda", dtype=torch.bfloat16)
            y = torch.zeros(t, o, device="cuda", dtype=torch.float32)
            row = dict(shape=f"{o}x{i}", tokens=t, dense_us=round(1e3 * graph_call_ms([lambda w=w: F.linear(x, w) for w in ws]), 1))
            ref = x.float() @ ws[0].float().t()
            for cfg in CONFIGS2D:
                sem = torch.zeros(o, dtype=torch.int32, device="cuda")
                try:
                    row[f"{cfg}:nojoin"] = round(1e3 * graph_call_ms([lambda p=p: run(x, p[0], p[1], y, cfg, 3) for p in packed]), 1)
                except Exception as e:
                    row[f"{cfg}:nojoin"] = type(e).__name__
                try:
                    row[f"{cfg}:shipped"] = round(1e3 * graph_call_ms([lambda p=p: d24.mm24(x, *p, i, None, cfg, sem) for p in packed]), 1)
                except Exception as e:
                    row[f"{cfg}:shipped"] = type(e).__name__
                for mode, name in MODES2D:
                    try:
                        y.zero_(); run2d(x, *packed[0], y, cfg, mode)
                        err = float((y - ref).norm() / ref.norm()) if mode >= 12 else None
                        ms = graph_call_ms([lambda p=p: run2d(x, p[0], p[1], y, cfg, mode) for p in packed])
                        row[f"{cfg}:{name}"] = [round(1e3 * ms, 1)] + ([float(f"{err:.1e}")] if err is not None else [])
                    except Exception as e:
                        row[f"{cfg}:{name}"] = f"{type(e).__name__}: {str(e)[:60]}"
            res.append(row)
            print(json.dumps(row), flush=True)
    json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "diag2d.json"), "w"), indent=1)


main2d() if os.environ.get("MAIN2D") and not INTERP else main()
