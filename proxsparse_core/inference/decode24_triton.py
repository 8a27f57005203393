"""The Triton kernel of decode24.py (imported only where Triton is installed): a 2:4 product for
≤ 16 activation rows reading packed values and 4-bit codes; see decode24.py for the format."""
import triton
import triton.language as tl


@triton.jit
def expand(vw, code, dtype: tl.constexpr, ASM: tl.constexpr):
    """The 4 outputs of each group from its kept pair (one int32 word) and its 4-bit code."""
    if ASM:
        # four instructions per word: look the selector up (prmt on the tables), apply it (prmt)
        d0, d1, d2, d3 = tl.inline_asm_elementwise(
            """{
            .reg .b32 ia, ib, sa, sb, wa, wb;
            and.b32 ia, $5, 3;
            shr.b32 ib, $5, 2;
            mad.lo.u32 ia, ia, 34, 16;
            mad.lo.u32 ib, ib, 34, 16;
            prmt.b32 sa, 0x44103210, 0x44441044, ia;
            prmt.b32 sb, 0x44324444, 0x32103244, ib;
            prmt.b32 wa, $4, 0, sa;
            prmt.b32 wb, $4, 0, sb;
            mov.b32 {$0, $1}, wa;
            mov.b32 {$2, $3}, wb;
            }""",
            "=h,=h,=h,=h,r,r", [vw, code], dtype=(tl.int16, tl.int16, tl.int16, tl.int16), is_pure=True, pack=1)
        d0, d1 = d0.to(dtype, bitcast=True), d1.to(dtype, bitcast=True)
        d2, d3 = d2.to(dtype, bitcast=True), d3.to(dtype, bitcast=True)
    else:
        a = code & 3
        b = code >> 2
        wa = tl.where(a == 0, vw, tl.where(a == 1, vw & 0xFFFF, tl.where(a == 2, vw << 16, 0)))
        wb = tl.where(b == 3, vw, tl.where(b == 2, vw & -65536, tl.where(b == 1, (vw >> 16) & 0xFFFF, 0)))
        d0 = (wa & 0xFFFF).to(tl.int16).to(dtype, bitcast=True)
        d1 = ((wa >> 16) & 0xFFFF).to(tl.int16).to(dtype, bitcast=True)
        d2 = (wb & 0xFFFF).to(tl.int16).to(dtype, bitcast=True)
        d3 = ((wb >> 16) & 0xFFFF).to(tl.int16).to(dtype, bitcast=True)
    return d0, d1, d2, d3

@triton.jit
def mm24(x_ptr, v_ptr, m_ptr, b_ptr, y_ptr, ws_ptr, sem_ptr, T, N, K, KW, KM, stride_x, stride_y,
         HAS_BIAS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, TP: tl.constexpr,
         SPLIT: tl.constexpr, ASM: tl.constexpr, LEFT: tl.constexpr):
    """LEFT: the expanded weight is the product's left operand ([BN, BK]·[BK, TP]); on Hopper its
    tile can then stay in registers instead of passing through shared memory (bench/RESULTS.md 2a⁵)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    rt = tl.arange(0, TP)
    tmask = rt < T
    steps = tl.cdiv(K, BK)
    per = tl.cdiv(steps, SPLIT)
    k_lo = pid_s * per * BK               # steps past K load nothing (masked)
    if LEFT:
        acc = tl.zeros([BN, TP], dtype=tl.float32)
    else:
        acc = tl.zeros([TP, BN], dtype=tl.float32)
    # 2-D tiles [BN, BK/4]: row, group (one int32 word of values each); a group's meta nibble comes
    # from its word of 8, loaded once as [BN, BK/32] and broadcast. (3-D [BN, BK/32, 8] tiles of
    # the same words made the join into [BN, BK] costly: bench/RESULTS.md 2a⁗.)
    rw = tl.arange(0, BK // 4)
    v_off = rn[:, None].to(tl.int64) * KW + rw[None, :]
    m_off = rn[:, None].to(tl.int64) * KM + tl.arange(0, BK // 32)[None, :]
    shift = (4 * (rw % 8))[None, :]
    x_row = x_ptr + rt[:, None] * stride_x
    for k0 in range(k_lo, k_lo + per * BK, BK):
        inside = k0 < 4 * KW                  # BK divides the packed size: whole tiles
        vw = tl.load(v_ptr + v_off + k0 // 4, mask=nmask[:, None] & inside, other=0)
        mw = tl.load(m_ptr + m_off + k0 // 32, mask=nmask[:, None] & inside, other=0)
        kk = k0 + tl.arange(0, BK)
        x = tl.load(x_row + kk[None, :], mask=tmask[:, None] & (kk < K)[None, :], other=0.0)
        code = (tl.reshape(tl.broadcast_to(mw[:, :, None], [BN, BK // 32, 8]), [BN, BK // 4]) >> shift) & 15
        d0, d1, d2, d3 = expand(vw, code, x_ptr.dtype.element_ty, ASM)
        w = tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), [BN, BK])
        if LEFT:
            acc = tl.dot(w, tl.trans(x), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if LEFT:
        acc = tl.trans(acc)
    finish(acc, rn, nmask, rt, tmask, pid_n, pid_s, N, b_ptr, y_ptr, ws_ptr, sem_ptr, stride_y,
           HAS_BIAS, BN, TP, SPLIT)


@triton.jit
def finish(acc, rn, nmask, rt, tmask, pid_n, pid_s, N, b_ptr, y_ptr, ws_ptr, sem_ptr, stride_y,
           HAS_BIAS: tl.constexpr, BN: tl.constexpr, TP: tl.constexpr, SPLIT: tl.constexpr):
    """Store a program's [TP, BN] float32 sums: directly (one share), or as a partial sum that the
    last share of the row block to finish adds to the others in a fixed order (SPLIT shares)."""
    out_ptrs = y_ptr + rt[:, None] * stride_y + rn[None, :]
    out_mask = tmask[:, None] & nmask[None, :]
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        part = ws_ptr + rt[:, None] * N + rn[None, :]
        tl.store(part + pid_s * (TP * N), acc, mask=nmask[None, :])
        tl.debug_barrier()
        done = tl.atomic_add(sem_ptr + pid_n, 1, sem="acq_rel")
        if done == SPLIT - 1:             # the last share adds all partial sums, in order
            tot = tl.zeros([TP, BN], dtype=tl.float32)
            for s in tl.static_range(SPLIT):
                tot += tl.load(part + s * (TP * N), mask=nmask[None, :], other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                tot += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, tot.to(y_ptr.dtype.element_ty), mask=out_mask)
            tl.store(sem_ptr + pid_n, 0)  # ready for the next call


@triton.jit
def gemv24(x_ptr, v_ptr, m_ptr, b_ptr, y_ptr, ws_ptr, sem_ptr, N, K, KG, KM,
           HAS_BIAS: tl.constexpr, BN: tl.constexpr, BG: tl.constexpr, SPLIT: tl.constexpr,
           BF16: tl.constexpr, EVEN: tl.constexpr):
    """The same product for one token on the CUDA cores, without expanding the weight: each kept
    value multiplies the activation at its position, picked by two selects from its group's four.
    x_ptr points at int64 words (the four activations of a group, K/4 of them). Tiles are [BN rows,
    BG/8 meta words, 8 groups]: the groups of one meta word share its register and a program's rows
    share each activation word it loads. Per group and row: one word of values (two bit operations
    make them float32 for bf16), a nibble of code, four compares, four selects, two multiply-adds.
    EVEN: no row or group past the end in any program (no masks)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    BW: tl.constexpr = BG // 8
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    rw = tl.arange(0, BW)
    rj = tl.arange(0, 8)
    steps = tl.cdiv(KG, BG)
    per = tl.cdiv(steps, SPLIT)
    g_lo = pid_s * per * BG
    shift = (4 * rj)[None, None, :]
    goff = rw[:, None] * 8 + rj[None, :]                      # [BW, 8] group offsets in a step
    v_row = v_ptr + rn[:, None, None].to(tl.int64) * KG
    m_row = m_ptr + rn[:, None].to(tl.int64) * KM
    acc = tl.zeros([BN], dtype=tl.float32)
    for g0 in range(g_lo, g_lo + per * BG, BG):
        g = g0 + goff
        if EVEN:
            vw = tl.load(v_row + g[None, :, :])
            mw = tl.load(m_row + (g0 // 8 + rw)[None, :])
            xw = tl.load(x_ptr + g)
        else:
            vw = tl.load(v_row + g[None, :, :], mask=nmask[:, None, None] & (g < KG)[None, :, :], other=0)
            mw = tl.load(m_row + (g0 // 8 + rw)[None, :], mask=nmask[:, None] & (g0 + rw * 8 < KG)[None, :],
                         other=0)
            xw = tl.load(x_ptr + g, mask=g < K // 4, other=0)
        code = (mw[:, :, None] >> shift) & 15
        a = code & 3                       # word A: kept value 0 sits at 0 (a ≤ 1), 1 (a = 2) or 2 (a = 3)
        b = code >> 2                      # word B: kept value 1 sits at 1 (b = 0), 2 (b = 1) or 3 (b ≥ 2)
        lo = xw.to(tl.int32)
        hi = (xw >> 32).to(tl.int32)
        if BF16:
            v0 = (vw << 16).to(tl.float32, bitcast=True)
            v1 = (vw & -65536).to(tl.float32, bitcast=True)
            x0 = (lo << 16).to(tl.float32, bitcast=True)
            x1 = (lo & -65536).to(tl.float32, bitcast=True)
            x2 = (hi << 16).to(tl.float32, bitcast=True)
            x3 = (hi & -65536).to(tl.float32, bitcast=True)
        else:
            v0 = (vw & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            v1 = ((vw >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            x0 = (lo & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            x1 = ((lo >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            x2 = (hi & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            x3 = ((hi >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        x0, x1, x2, x3 = x0[None, :, :], x1[None, :, :], x2[None, :, :], x3[None, :, :]
        s0 = tl.where(a < 2, x0, tl.where(a == 2, x1, x2))
        s1 = tl.where(b == 0, x1, tl.where(b == 1, x2, x3))
        acc += tl.sum(tl.sum(v0 * s0 + v1 * s1, axis=2), axis=1)
    rt = tl.arange(0, 1)
    finish(acc[None, :], rn, nmask, rt, rt < 1, pid_n, pid_s, N, b_ptr, y_ptr, ws_ptr, sem_ptr,
           0, HAS_BIAS, BN, 1, SPLIT)
