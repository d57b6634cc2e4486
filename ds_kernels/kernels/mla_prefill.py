"""Variable-length flash attention with qk dim != v dim (MLA prefill), forward and backward.

Work is cut into tiles of one sequence and one head. The API gives no max_seqlen, and reading
cu_seqlens on the host would stall the GPU, so the launcher builds a tile map on the device
(a few tiny torch ops, no synchronisation, CUDA-graph safe): program p of axis 0 handles tile
tile_row[p] // BLOCK of sequence tile_seq[p]. The grid is the upper bound
sum_b cdiv(len_b, BLOCK) <= cdiv(T, BLOCK) + B; programs past the real tiles (tile_seq = -1)
exit at once. Within a sequence, the query tiles with the most causal work come first.

  _fwd_kernel          BLOCK_M queries: loop over key tiles (online softmax in base 2),
                       write out and the natural-log lse.
  _bwd_delta_kernel    delta = rowsum(dO * O) - d lse (the lse gradient folds in here).
  _bwd_dkdv_kernel     BLOCK_N keys: loop over the query tiles that see them, dK and dV.
  _bwd_dq_kernel       BLOCK_M queries: loop over key tiles, dQ.
The backward recomputes P = exp2(S * log2(e) - lse * log2(e)) from the saved lse; each output
row is written by exactly one program (no atomics, deterministic).

Dqk (192 = 128 + 64 in DeepSeek-V3) is split into a power-of-two head D1 and a masked tail D2,
so the common shape pays no padding; tl.dot sees K >= 16 everywhere. Dqk and Dv are constexpr:
a column mask against a runtime bound keeps Triton from vectorising the loads, and then from
pipelining them at all (seen in the sm_90 builds). Key tiles that no causal or length mask
touches run a separate loop without the mask. Token offsets are 64-bit: T * Hq * D passes
2**31 at ~90K tokens with 128 heads.

Non-finite input (reference/mla_prefill.py): a probability 0 still multiplies its value in a
dot, and 0 * NaN is NaN, so a masked key's NaN would reach the queries that cannot see it. The
forward flags a row when a key it sees has a NaN or inf score or value, leaves that key out,
zeroes non-finite values, and writes the row's out and lse as NaN. The backward reads inputs
with non-finite values zeroed and treats a NaN lse as a row of constants (P = 0).
"""

import functools
import math

import torch
import triton
import triton.language as tl

from ds_kernels import tuning

_LOG2E = 1.0 / math.log(2.0)
# tl.dot takes operands at least 16 wide in each dimension.
_MIN_DIM = 16
# Tokens per _bwd_delta_kernel program: a [64, Dv] tile, a few registers per thread.
_DELTA_ROWS = 64


@triton.jit
def _sequence(cu_ptr, tile_seq_ptr, tile_row_ptr, pid, T):
    """(sequence, first token, length, first row of the tile in the sequence), or sequence -1
    for a program past the real tiles. Bounds are clamped to [0, T], so even cu_seqlens that
    skipped validation (CUDA graph capture) can never address outside the tensors."""
    seq = tl.load(tile_seq_ptr + pid)
    start = tl.minimum(tl.maximum(tl.load(cu_ptr + tl.maximum(seq, 0)), 0), T)
    end = tl.minimum(tl.maximum(tl.load(cu_ptr + tl.maximum(seq, 0) + 1), start), T)
    return seq, start, end - start, tl.load(tile_row_ptr + pid)


@triton.jit
def _load_rows(ptr, rows, row_ok, stride_t, stride_d, D_OFF: tl.constexpr, D: tl.constexpr,
               D_MAX: tl.constexpr, TRANSPOSE: tl.constexpr):
    """Columns D_OFF:D_OFF + D (masked at D_MAX) of token rows ([rows, D], or [D, rows])."""
    d = D_OFF + tl.arange(0, D)
    if TRANSPOSE:
        x = tl.load(ptr + rows[None, :] * stride_t + d[:, None] * stride_d,
                    mask=row_ok[None, :] & (d < D_MAX)[:, None], other=0.0)
    else:
        x = tl.load(ptr + rows[:, None] * stride_t + d[None, :] * stride_d,
                    mask=row_ok[:, None] & (d < D_MAX)[None, :], other=0.0)
    return x


@triton.jit
def _is_finite(x):
    return (x == x) & (tl.abs(x) < float("inf"))


@triton.jit
def _finite_or_zero(x):
    return tl.where(_is_finite(x), x, 0.0)


@triton.jit
def _store_rows(ptr, value, rows, row_ok, stride_t, D_OFF: tl.constexpr, D: tl.constexpr,
                D_MAX: tl.constexpr):
    d = D_OFF + tl.arange(0, D)
    tl.store(ptr + rows[:, None] * stride_t + d[None, :], value.to(ptr.dtype.element_ty),
             mask=row_ok[:, None] & (d < D_MAX)[None, :])


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b, accumulated in acc's dtype (fp32, or fp64 for fp64 inputs)."""
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def _fwd_step(acc, l_i, m_i, bad, q1, q2, k_ptr, v_ptr, start, L, n0, offs_m,
              stride_kt, stride_kd, stride_vt, stride_vd, scale2,
              DQK: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
              DV_P: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
              BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Fold key tile n0 into the running (acc, sum, max, poisoned) of a query tile."""
    offs_n = n0 + tl.arange(0, BLOCK_N)                           # [BN]
    col_ok = offs_n < L
    cols = (start + offs_n).to(tl.int64)
    s = tl.zeros([q1.shape[0], BLOCK_N], dtype=acc.dtype)          # [BM, BN]
    s = _mma(q1, _load_rows(k_ptr, cols, col_ok, stride_kt, stride_kd, 0, D1, DQK, True), s,
             PRECISION)
    if D2 > 0:
        s = _mma(q2, _load_rows(k_ptr, cols, col_ok, stride_kt, stride_kd, D1, D2, DQK, True), s,
                 PRECISION)
    v = _load_rows(v_ptr, cols, col_ok, stride_vt, stride_vd, 0, DV_P, DV, False)  # [BN, DV]
    v_ok = _is_finite(v)
    v_bad = tl.max((~v_ok).to(tl.int32), axis=1)                  # [BN]
    v = tl.where(v_ok, v, 0.0)
    s = s * scale2
    poison = ~_is_finite(s) | (v_bad[None, :] > 0)                # [BM, BN]
    if MASK:
        ok = col_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None])
        poison = poison & ok
        s = tl.where(ok, s, float("-inf"))
    bad = tl.maximum(bad, tl.max(poison.to(tl.int32), axis=1))
    s = tl.where(poison, float("-inf"), s)
    # Every row sees key 0 in its first tile, so m_new is finite and no exp2 sees inf - inf
    # (but in a poisoned row, which comes out NaN anyway).
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], PRECISION)
    return acc, l_i, m_new, bad


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_ptr, tile_seq_ptr, tile_row_ptr,
    T, H, scale2,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    DQK: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    DV_P: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """out and lse of BLOCK_M queries of one sequence (tile map) and head (axis 1).

    q_ptr [T, H, DQK], k_ptr [T, H, DQK], v_ptr [T, H, DV]: any strides (stride_<x>t/h/d).
    out_ptr: [T, H, DV] contiguous, q's dtype. lse_ptr: [T, H] fp32 contiguous, natural log.
    cu_ptr: int32 [B + 1] cu_seqlens. tile_seq_ptr / tile_row_ptr: int32 tile map (module
    docstring). scale2: softmax_scale * log2(e). D1 + D2 >= DQK: the power-of-two head and
    tail of the qk dim (D2 = 0: none); DV_P >= DV. CAUSAL: query i sees keys 0..i of its
    sequence. PRECISION: tl.dot input precision for fp32 ("ieee" or "tf32"). ACC: fp32, or
    fp64 for fp64 inputs (gradcheck).
    """
    seq, start, L, m0 = _sequence(cu_ptr, tile_seq_ptr, tile_row_ptr, tl.program_id(0), T)
    if seq < 0:
        return
    h = tl.program_id(1)
    q_ptr += h * stride_qh
    k_ptr += h * stride_kh
    v_ptr += h * stride_vh
    offs_m = m0 + tl.arange(0, BLOCK_M)                           # [BM] rows in the sequence
    row_ok = offs_m < L
    rows = (start + offs_m).to(tl.int64)
    q1 = _load_rows(q_ptr, rows, row_ok, stride_qt, stride_qd, 0, D1, DQK, False)
    q2 = q1  # unread without a tail
    if D2 > 0:
        q2 = _load_rows(q_ptr, rows, row_ok, stride_qt, stride_qd, D1, D2, DQK, False)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, DV_P], dtype=ACC)
    bad = tl.zeros([BLOCK_M], dtype=tl.int32)                     # sees a non-finite input
    if CAUSAL:
        hi = tl.minimum(m0 + BLOCK_M, L)
        unmasked = (m0 + 1) // BLOCK_N * BLOCK_N   # tiles whose last key <= the first query
    else:
        hi = L
        unmasked = L // BLOCK_N * BLOCK_N
    for n0 in range(0, unmasked, BLOCK_N):
        acc, l_i, m_i, bad = _fwd_step(acc, l_i, m_i, bad, q1, q2, k_ptr, v_ptr, start, L,
                                       n0, offs_m, stride_kt, stride_kd, stride_vt, stride_vd,
                                       scale2, DQK, DV, D1, D2, DV_P, False, CAUSAL, BLOCK_N,
                                       PRECISION)
    for n0 in range(unmasked, hi, BLOCK_N):
        acc, l_i, m_i, bad = _fwd_step(acc, l_i, m_i, bad, q1, q2, k_ptr, v_ptr, start, L,
                                       n0, offs_m, stride_kt, stride_kd, stride_vt, stride_vd,
                                       scale2, DQK, DV, D1, D2, DV_P, True, CAUSAL, BLOCK_N,
                                       PRECISION)

    out = tl.where(bad[:, None] > 0, float("nan"), acc / l_i[:, None])
    _store_rows(out_ptr + h * DV, out, rows, row_ok, H * DV, 0, DV_P, DV)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453                 # log2 -> natural log
    lse = tl.where(bad > 0, float("nan"), lse)
    tl.store(lse_ptr + rows * H + h, lse.to(tl.float32), mask=row_ok)


@triton.jit
def _bwd_delta_kernel(
    out_ptr, do_ptr, dlse_ptr, delta_ptr, T, H,
    stride_ot, stride_oh, stride_od, stride_dot, stride_doh, stride_dod, stride_dlt, stride_dlh,
    DV: tl.constexpr, DV_P: tl.constexpr, BLOCK_T: tl.constexpr, ACC: tl.constexpr,
):
    """delta[t, h] = sum_d out[t, h, d] * dO[t, h, d] - dlse[t, h] for BLOCK_T tokens, head
    axis 1.

    out_ptr, do_ptr: out and dO [T, H, DV], any strides. dlse_ptr: [T, H] fp32, any strides.
    delta_ptr: [T, H] in ACC, contiguous.
    """
    h = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)      # [BT]
    row_ok = rows < T
    rows = rows.to(tl.int64)
    # A poisoned row's out is NaN and its P will be 0: its delta only has to stay finite.
    o = _finite_or_zero(_load_rows(out_ptr + h * stride_oh, rows, row_ok, stride_ot, stride_od,
                                   0, DV_P, DV, False))
    do = _load_rows(do_ptr + h * stride_doh, rows, row_ok, stride_dot, stride_dod, 0, DV_P, DV,
                    False)
    dlse = tl.load(dlse_ptr + rows * stride_dlt + h * stride_dlh, mask=row_ok, other=0.0)
    delta = tl.sum(o.to(ACC) * do.to(ACC), axis=1) - dlse.to(ACC)
    tl.store(delta_ptr + rows * H + h, delta, mask=row_ok)


@triton.jit
def _bwd_dkdv_step(dk1, dk2, dv, k1, k2, v, q_ptr, do_ptr, lse_ptr, delta_ptr, start, L, m0,
                   offs_n, h, H, stride_qt, stride_qd, stride_dot, stride_dod, scale2,
                   DQK: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                   DV_P: tl.constexpr, MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                   PRECISION: tl.constexpr):
    """Add query tile m0's share to a key tile's dK (unscaled) and dV; transposed [BN, BM]."""
    offs_m = m0 + tl.arange(0, BLOCK_M)                           # [BM]
    row_ok = offs_m < L
    rows = (start + offs_m).to(tl.int64)
    q1 = _finite_or_zero(_load_rows(q_ptr, rows, row_ok, stride_qt, stride_qd, 0, D1, DQK, False))
    s = _mma(k1, tl.trans(q1), tl.zeros([k1.shape[0], BLOCK_M], dtype=dv.dtype), PRECISION)
    if D2 > 0:
        q2 = _finite_or_zero(_load_rows(q_ptr, rows, row_ok, stride_qt, stride_qd, D1, D2, DQK,
                                        False))
        s = _mma(k2, tl.trans(q2), s, PRECISION)                  # [BN, BM]
    # Rows past the sequence, and poisoned rows (lse NaN), get lse = +inf: p = 0 there.
    lse = tl.load(lse_ptr + rows * H + h, mask=row_ok, other=float("inf")).to(dv.dtype)
    lse = tl.where(lse == lse, lse, float("inf"))
    p = tl.exp2(s * scale2 - lse[None, :] * 1.4426950408889634)
    if MASK:  # causal: key j sees query i only if j <= i
        p = tl.where(offs_n[:, None] <= offs_m[None, :], p, 0.0)
    do = _load_rows(do_ptr, rows, row_ok, stride_dot, stride_dod, 0, DV_P, DV, False)  # [BM, DV]
    dv = _mma(p.to(do.dtype), do, dv, PRECISION)
    dp = _mma(v, tl.trans(do), tl.zeros([k1.shape[0], BLOCK_M], dtype=dv.dtype), PRECISION)
    delta = tl.load(delta_ptr + rows * H + h, mask=row_ok, other=0.0)
    ds = (p * (dp - delta[None, :])).to(q1.dtype)                 # [BN, BM]
    dk1 = _mma(ds, q1, dk1, PRECISION)
    if D2 > 0:
        dk2 = _mma(ds, q2, dk2, PRECISION)
    return dk1, dk2, dv


@triton.jit
def _bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    cu_ptr, tile_seq_ptr, tile_row_ptr,
    T, H, scale2, softmax_scale,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd, stride_dot, stride_doh, stride_dod,
    DQK: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    DV_P: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """dK and dV of BLOCK_N keys of one sequence (tile map over key tiles) and head (axis 1).

    q, k, v, cu, tile map, scale2, D1/D2/DV_P, CAUSAL, PRECISION, ACC: as in _fwd_kernel.
    do_ptr: dO [T, H, DV], any strides. lse_ptr: [T, H] fp32 contiguous (the forward's).
    delta_ptr: [T, H] in ACC contiguous (_bwd_delta_kernel). dk_ptr [T, H, DQK], dv_ptr
    [T, H, DV]: contiguous, in the inputs' dtype. softmax_scale: the natural-log scale dK takes.
    """
    seq, start, L, n0 = _sequence(cu_ptr, tile_seq_ptr, tile_row_ptr, tl.program_id(0), T)
    if seq < 0:
        return
    h = tl.program_id(1)
    q_ptr += h * stride_qh
    do_ptr += h * stride_doh
    offs_n = n0 + tl.arange(0, BLOCK_N)                           # [BN] keys in the sequence
    col_ok = offs_n < L
    cols = (start + offs_n).to(tl.int64)
    k1 = _finite_or_zero(_load_rows(k_ptr + h * stride_kh, cols, col_ok, stride_kt, stride_kd,
                                    0, D1, DQK, False))
    k2 = k1  # unread without a tail
    if D2 > 0:
        k2 = _finite_or_zero(_load_rows(k_ptr + h * stride_kh, cols, col_ok, stride_kt,
                                        stride_kd, D1, D2, DQK, False))
    v = _finite_or_zero(_load_rows(v_ptr + h * stride_vh, cols, col_ok, stride_vt, stride_vd, 0,
                                   DV_P, DV, False))

    dk1 = tl.zeros([BLOCK_N, D1], dtype=ACC)
    dk2 = tl.zeros([BLOCK_N, D2 if D2 > 0 else 1], dtype=ACC)
    dv = tl.zeros([BLOCK_N, DV_P], dtype=ACC)
    if CAUSAL:
        # Query tiles from the one holding key n0 see the keys; from the first tile starting
        # at or past n0 + BLOCK_N on, they see all of them.
        first = n0 // BLOCK_M * BLOCK_M
        unmasked = tl.minimum(tl.cdiv(n0 + BLOCK_N, BLOCK_M) * BLOCK_M, L)
        for m0 in range(first, unmasked, BLOCK_M):
            dk1, dk2, dv = _bwd_dkdv_step(dk1, dk2, dv, k1, k2, v, q_ptr, do_ptr, lse_ptr,
                                          delta_ptr, start, L, m0, offs_n, h, H, stride_qt,
                                          stride_qd, stride_dot, stride_dod, scale2, DQK, DV,
                                          D1, D2, DV_P, True, BLOCK_M, PRECISION)
    else:
        unmasked = 0
    for m0 in range(unmasked, L, BLOCK_M):
        dk1, dk2, dv = _bwd_dkdv_step(dk1, dk2, dv, k1, k2, v, q_ptr, do_ptr, lse_ptr,
                                      delta_ptr, start, L, m0, offs_n, h, H, stride_qt,
                                      stride_qd, stride_dot, stride_dod, scale2, DQK, DV,
                                      D1, D2, DV_P, False, BLOCK_M, PRECISION)

    _store_rows(dk_ptr + h * DQK, dk1 * softmax_scale, cols, col_ok, H * DQK, 0, D1, DQK)
    if D2 > 0:
        _store_rows(dk_ptr + h * DQK, dk2 * softmax_scale, cols, col_ok, H * DQK, D1, D2, DQK)
    _store_rows(dv_ptr + h * DV, dv, cols, col_ok, H * DV, 0, DV_P, DV)


@triton.jit
def _bwd_dq_step(dq1, dq2, q1, q2, do, lse2, delta, k_ptr, v_ptr, start, L, n0, offs_m,
                 stride_kt, stride_kd, stride_vt, stride_vd, scale2,
                 DQK: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                 DV_P: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                 BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Add key tile n0's share to a query tile's dQ (unscaled)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)                           # [BN]
    col_ok = offs_n < L
    cols = (start + offs_n).to(tl.int64)
    k1 = _finite_or_zero(_load_rows(k_ptr, cols, col_ok, stride_kt, stride_kd, 0, D1, DQK,
                                    False))                       # [BN, D1]
    s = _mma(q1, tl.trans(k1), tl.zeros([q1.shape[0], BLOCK_N], dtype=dq1.dtype), PRECISION)
    if D2 > 0:
        k2 = _finite_or_zero(_load_rows(k_ptr, cols, col_ok, stride_kt, stride_kd, D1, D2, DQK,
                                        False))
        s = _mma(q2, tl.trans(k2), s, PRECISION)                  # [BM, BN]
    p = tl.exp2(s * scale2 - lse2[:, None])
    if MASK:
        ok = col_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None])
        p = tl.where(ok, p, 0.0)
    vt = _finite_or_zero(_load_rows(v_ptr, cols, col_ok, stride_vt, stride_vd, 0, DV_P, DV,
                                    True))                        # [DV, BN]
    dp = _mma(do, vt, tl.zeros([q1.shape[0], BLOCK_N], dtype=dq1.dtype), PRECISION)
    ds = (p * (dp - delta[:, None])).to(k1.dtype)                 # [BM, BN]
    dq1 = _mma(ds, k1, dq1, PRECISION)
    if D2 > 0:
        dq2 = _mma(ds, k2, dq2, PRECISION)
    return dq1, dq2


@triton.jit
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    cu_ptr, tile_seq_ptr, tile_row_ptr,
    T, H, scale2, softmax_scale,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd, stride_dot, stride_doh, stride_dod,
    DQK: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    DV_P: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """dQ of BLOCK_M queries of one sequence (tile map over query tiles) and head (axis 1).

    Arguments as in _bwd_dkdv_kernel; dq_ptr: [T, H, DQK] contiguous, in q's dtype.
    """
    seq, start, L, m0 = _sequence(cu_ptr, tile_seq_ptr, tile_row_ptr, tl.program_id(0), T)
    if seq < 0:
        return
    h = tl.program_id(1)
    k_ptr += h * stride_kh
    v_ptr += h * stride_vh
    offs_m = m0 + tl.arange(0, BLOCK_M)                           # [BM]
    row_ok = offs_m < L
    rows = (start + offs_m).to(tl.int64)
    q1 = _finite_or_zero(_load_rows(q_ptr + h * stride_qh, rows, row_ok, stride_qt, stride_qd,
                                    0, D1, DQK, False))
    q2 = q1  # unread without a tail
    if D2 > 0:
        q2 = _finite_or_zero(_load_rows(q_ptr + h * stride_qh, rows, row_ok, stride_qt,
                                        stride_qd, D1, D2, DQK, False))
    do = _load_rows(do_ptr + h * stride_doh, rows, row_ok, stride_dot, stride_dod, 0, DV_P, DV,
                    False)
    # Rows past the sequence, and poisoned rows (lse NaN), get lse = +inf: p = 0 there.
    lse = tl.load(lse_ptr + rows * H + h, mask=row_ok, other=float("inf")).to(ACC)
    lse = tl.where(lse == lse, lse, float("inf"))
    lse2 = lse * 1.4426950408889634                               # natural log -> log2
    delta = tl.load(delta_ptr + rows * H + h, mask=row_ok, other=0.0)

    dq1 = tl.zeros([BLOCK_M, D1], dtype=ACC)
    dq2 = tl.zeros([BLOCK_M, D2 if D2 > 0 else 1], dtype=ACC)
    if CAUSAL:
        hi = tl.minimum(m0 + BLOCK_M, L)
        unmasked = (m0 + 1) // BLOCK_N * BLOCK_N
    else:
        hi = L
        unmasked = L // BLOCK_N * BLOCK_N
    for n0 in range(0, unmasked, BLOCK_N):
        dq1, dq2 = _bwd_dq_step(dq1, dq2, q1, q2, do, lse2, delta, k_ptr, v_ptr, start, L, n0,
                                offs_m, stride_kt, stride_kd, stride_vt, stride_vd, scale2, DQK,
                                DV, D1, D2, DV_P, False, CAUSAL, BLOCK_N, PRECISION)
    for n0 in range(unmasked, hi, BLOCK_N):
        dq1, dq2 = _bwd_dq_step(dq1, dq2, q1, q2, do, lse2, delta, k_ptr, v_ptr, start, L, n0,
                                offs_m, stride_kt, stride_kd, stride_vt, stride_vd, scale2, DQK,
                                DV, D1, D2, DV_P, True, CAUSAL, BLOCK_N, PRECISION)

    _store_rows(dq_ptr + h * DQK, dq1 * softmax_scale, rows, row_ok, H * DQK, 0, D1, DQK)
    if D2 > 0:
        _store_rows(dq_ptr + h * DQK, dq2 * softmax_scale, rows, row_ok, H * DQK, D1, D2, DQK)


def _split_qk_dim(dqk):
    """(D1, D2): D1 the largest power of two <= dqk, D2 the power-of-two tail (0: none)."""
    d1 = max(_MIN_DIM, 1 << (dqk.bit_length() - 1))
    d2 = 0 if dqk <= d1 else max(_MIN_DIM, triton.next_power_of_2(dqk - d1))
    return d1, d2


# Tile candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, best first; a launch
# takes the first that fits the device. Not yet timed on a GPU. At Dqk + Dv = 192 + 128 each
# is a tile whose offline build (triton 3.9) spilled no registers, the first ones the largest
# such: for 16-bit inputs on sm_90, fwd 193 registers / 168 KiB of shared memory, dkdv
# 239 / 101 KiB, dq 208 / 120 KiB. The backward holds a tile's q or k, v and fp32 gradient
# accumulators, so its other dim stays narrow. fp32 operands (tf32 or FMA dots) take smaller
# tiles: most of the 16-bit ones spill kilobytes of registers there.
_CANDIDATES = {
    ("fwd", 2): [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 1)],
    ("dkdv", 2): [(32, 64, 8, 3), (32, 32, 8, 3), (16, 64, 8, 2), (16, 32, 4, 1)],
    ("dq", 2): [(64, 64, 8, 2), (64, 32, 8, 2), (32, 32, 4, 1)],
    ("fwd", 4): [(32, 16, 8, 2), (16, 16, 4, 2)],
    ("dkdv", 4): [(16, 16, 8, 2)],
    ("dq", 4): [(32, 16, 8, 2), (16, 16, 8, 2)],
}
# Before Hopper (sm_80 builds): the sm_90 choices above spill 64-100 bytes there; these
# spilled none (fwd 186 registers / 88 KiB, dkdv 176 / 105 KiB, dq 128 / 104 KiB).
_CANDIDATES_BEFORE_HOPPER = {
    ("fwd", 2): [(128, 32, 8, 3), (64, 64, 8, 2), (64, 32, 8, 2), (32, 32, 4, 1)],
    ("dkdv", 2): [(64, 32, 8, 3), (32, 32, 8, 3), (16, 32, 4, 1)],
    ("dq", 2): [(32, 64, 8, 3), (64, 16, 8, 2), (32, 32, 8, 2)],
}


def _shared_bytes(kind, block_m, block_n, stages, width_qk, width, itemsize):
    """Shared memory of a launch, from above: the tile a program holds (fwd: q, which its dot
    reads from shared memory) plus a copy per stage (at least two) of the tiles it streams
    (rows of k|v, or of q|dO and their fp32 lse and delta, padded). Within 3% of every
    multi-stage build above."""
    stages = max(stages, 2)
    if kind == "fwd":
        return itemsize * (block_m * width_qk + stages * block_n * width)
    if kind == "dkdv":
        return itemsize * (block_n + stages * block_m) * width + stages * block_m * 16
    return itemsize * (block_m + stages * block_n) * width


# Register words per thread that a launch's tiles need (_register_words), at most: the largest
# estimate among the 16-bit builds above that spilled nothing (the fwd tile's). The fp32
# versions of those tiles, which spilled, estimate 168-192.
_REGISTER_WORDS = 144


def _register_words(kind, block_m, block_n, num_warps, width_qk, width_v, itemsize):
    """Register words per thread: the fp32 accumulators and score tile plus the input tiles a
    program keeps for its whole loop (fwd: q; dkdv: k and v; dq: q and dO)."""
    if kind == "fwd":
        words = block_m * (width_v + block_n) + block_m * width_qk * itemsize / 4
    elif kind == "dkdv":
        words = block_n * (width_qk + width_v) * (1 + itemsize / 4) + block_m * block_n
    else:
        words = block_m * (width_qk + block_n) + block_m * (width_qk + width_v) * itemsize / 4
    return words / (32 * num_warps)


def fits(kind, config, dqk, dv, dtype, device) -> bool:
    """Whether a launch of kernel ``kind`` with ``config`` stays within the device's shared
    memory and, by the estimate above, its registers."""
    d1, d2 = _split_qk_dim(dqk)
    dv_p = max(_MIN_DIM, triton.next_power_of_2(dv))
    bm, bn = config["BLOCK_M"], config["BLOCK_N"]
    shared = _shared_bytes(kind, bm, bn, config["num_stages"], d1 + d2, d1 + d2 + dv_p,
                           dtype.itemsize)
    registers = _register_words(kind, bm, bn, config["num_warps"], d1 + d2, dv_p, dtype.itemsize)
    return (min(bm, bn) >= _MIN_DIM and shared <= tuning.shared_memory_bytes(device)
            and registers <= _REGISTER_WORDS)


@functools.cache
def _heuristic(kind, dqk, dv, dtype, device):
    key = (kind, min(dtype.itemsize, 4))
    before_hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9
    tiles = (before_hopper and _CANDIDATES_BEFORE_HOPPER.get(key)) or _CANDIDATES[key]
    candidates = [dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), c)) for c in tiles]
    return next((c for c in candidates if fits(kind, c, dqk, dv, dtype, device)), candidates[-1])


def _config(kind, T, H, dqk, dv, causal, dtype, device):
    """BLOCK_M (queries), BLOCK_N (keys), num_warps, num_stages of one kernel's launch: tuned
    for this token-count bucket (`python -m autotune sweep --op mla_prefill`), else the
    heuristic."""
    key = tuning.shape_key("mla_prefill", kernel=kind, H=H, Dqk=dqk, Dv=dv, causal=causal)
    return tuning.config("mla_prefill", "triton", key, T, dtype, device,
                         _heuristic(kind, dqk, dv, dtype, device), kernel=kind)


def _tile_map(cu_seqlens, T, block, heavy_last):
    """(tile_seq, tile_row) int32 [cdiv(T, block) + B]: sequence and first row of each tile,
    tile_seq = -1 past the real tiles. With heavy_last, each sequence's tiles run last first
    (the causal query tiles with the most keys)."""
    B = cu_seqlens.shape[0] - 1
    lengths = torch.diff(cu_seqlens).clamp_min(0)                 # [B]
    tiles = (lengths + block - 1) // block
    ends = tiles.cumsum(0)                                        # [B] one past each seq's tiles
    grid = triton.cdiv(T, block) + B
    index = torch.arange(grid, device=cu_seqlens.device)
    seq = torch.searchsorted(ends, index, right=True)            # [grid] in [0, B]
    real = seq < B
    seq = seq.clamp_max(B - 1)
    local = index - (ends - tiles)[seq]
    if heavy_last:
        local = tiles[seq] - 1 - local
    tile_seq = torch.where(real, seq, -1).to(torch.int32)
    return tile_seq, (local * block).to(torch.int32)


def _precision(dtype):
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _common(q, v):
    dqk, dv = q.shape[2], v.shape[2]
    d1, d2 = _split_qk_dim(dqk)
    return dict(DQK=dqk, DV=dv, D1=d1, D2=d2, DV_P=max(_MIN_DIM, triton.next_power_of_2(dv)),
                PRECISION=_precision(q.dtype),
                ACC=tl.float64 if q.dtype == torch.float64 else tl.float32)


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()]


def mla_prefill(q, k, v, cu_seqlens, causal, softmax_scale):
    T, H, Dqk = q.shape
    Dv = v.shape[2]
    out = q.new_empty(T, H, Dv)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    if T == 0 or H == 0:
        return out, lse
    cu_seqlens = cu_seqlens.contiguous()  # B + 1 ints, read densely by the kernels
    config = _config("fwd", T, H, Dqk, Dv, causal, q.dtype, q.device)
    tile_seq, tile_row = _tile_map(cu_seqlens, T, config["BLOCK_M"], heavy_last=causal)
    _fwd_kernel[(tile_seq.shape[0], H)](
        q, k, v, out, lse, cu_seqlens, tile_seq, tile_row,
        T, H, softmax_scale * _LOG2E, *_strides(q, k, v),
        CAUSAL=causal, **_common(q, v), **config)
    return out, lse


def mla_prefill_backward(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens, causal,
                         softmax_scale):
    T, H, Dqk = q.shape
    Dv = v.shape[2]
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if T == 0 or H == 0:
        return dq, dk, dv
    cu_seqlens = cu_seqlens.contiguous()  # B + 1 ints, read densely by the kernels
    common = _common(q, v)
    delta = torch.empty(T, H, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
    _bwd_delta_kernel[(triton.cdiv(T, _DELTA_ROWS), H)](
        out, grad_out, grad_lse, delta, T, H, *_strides(out, grad_out, grad_lse),
        DV=Dv, DV_P=common["DV_P"], BLOCK_T=_DELTA_ROWS, ACC=common["ACC"])
    args = (T, H, softmax_scale * _LOG2E, softmax_scale, *_strides(q, k, v, grad_out))
    config = _config("dkdv", T, H, Dqk, Dv, causal, q.dtype, q.device)
    tile_seq, tile_row = _tile_map(cu_seqlens, T, config["BLOCK_N"], heavy_last=False)
    _bwd_dkdv_kernel[(tile_seq.shape[0], H)](
        q, k, v, grad_out, lse, delta, dk, dv, cu_seqlens, tile_seq, tile_row, *args,
        CAUSAL=causal, **common, **config)
    config = _config("dq", T, H, Dqk, Dv, causal, q.dtype, q.device)
    tile_seq, tile_row = _tile_map(cu_seqlens, T, config["BLOCK_M"], heavy_last=causal)
    _bwd_dq_kernel[(tile_seq.shape[0], H)](
        q, k, v, grad_out, lse, delta, dq, cu_seqlens, tile_seq, tile_row, *args,
        CAUSAL=causal, **common, **config)
    return dq, dk, dv
