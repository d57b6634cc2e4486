"""mHC (DeepSeek-V4's hyper-connections) in two launches a block instead of ~50 small ones.

mhc_pre: a program owns BLOCK_T tokens. Pass 1 streams their [BLOCK_T, n D] rows once,
accumulating the sum of squares and x @ fn^T (fp32, tl.dot in IEEE precision; the RMS factor
is a per-row scalar, applied after); then pre, post and comb - the softmax and every Sinkhorn
round - are register math on [BLOCK_T, n, n] tiles; pass 2 reads the rows again for the
collapse sum_i pre_i streams_i. The mixes are never written to memory.
mhc_post: a program owns BLOCK_T tokens x BLOCK_D columns of all n streams and writes the n
new streams, post[k] out + sum_j comb[j, k] streams[j], accumulated in fp32.
"""

import torch
import triton
import triton.language as tl

# Fixed tiles, not tuned yet: the work is a few MFLOP a layer, bound by reading the streams.
_BLOCK_T = 16   # tl.dot's smallest M
_BLOCK_K = 64
_BLOCK_D = 128
_WARPS = 4
# mhc_post holds all n streams of its tile: [16, 4, 128] fp32 spilled 404 bytes at 255
# registers in an sm_90 build (tests/test_kernel_sources.py), [8, 4, 64] does not.
_POST_BLOCK_T = 8
_POST_BLOCK_D = 64


@triton.jit
def _column(z, m, j):
    """z[:, j] of a [BLOCK_T, MP] tile, as [BLOCK_T] (a masked reduction: no register gather)."""
    return tl.sum(tl.where(m[None, :] == j, z, 0.0), axis=1)


@triton.jit
def _mhc_pre_kernel(
    streams_ptr, fn_ptr, base_ptr, scale_ptr, collapsed_ptr, post_ptr, comb_ptr,
    T, D, stride_st, stride_sn, stride_sd, stride_fm, stride_fk, stride_ct, stride_cd,
    norm_eps, hc_eps,
    N: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr, ITERS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """streams [T, N, D] (strides stride_st, stride_sn, stride_sd); fn [(2+N) N, N D] (strides
    stride_fm, stride_fk); base [(2+N) N] and scale [3] contiguous; collapsed [T, D] out
    (strides stride_ct, stride_cd); post [T, N], comb [T, N, N] fp32 out, contiguous. NP: the
    next power of two of N; MP: of (2+N) N, at least 16 (tl.dot)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)                 # [BT]
    row_ok = rows < T
    row_base = streams_ptr + rows.to(tl.int64)[:, None] * stride_st
    m = tl.arange(0, MP)                                          # [MP]
    m_ok = m < (2 + N) * N
    K = N * D

    mixes = tl.zeros((BLOCK_T, MP), dtype=tl.float32)
    sumsq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)                            # [BK] flat column
        k_ok = k < K
        i, d = k // D, k % D
        x = tl.load(row_base + i[None, :].to(tl.int64) * stride_sn + d[None, :] * stride_sd,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        sumsq += tl.sum(x * x, axis=1)
        f = tl.load(fn_ptr + m[None, :] * stride_fm + k[:, None].to(tl.int64) * stride_fk,
                    mask=k_ok[:, None] & m_ok[None, :], other=0.0).to(tl.float32)  # [BK, MP]
        mixes = tl.dot(x, f, mixes, input_precision="ieee")
    mixes = mixes * (1.0 / tl.sqrt(sumsq / K + norm_eps))[:, None]

    # z = mixes * scale[segment] + base, one segment each for pre, post and comb.
    segment = tl.where(m < N, 0, tl.where(m < 2 * N, 1, 2))
    z = (mixes * tl.load(scale_ptr + segment).to(tl.float32)[None, :]
         + tl.load(base_ptr + m, mask=m_ok, other=0.0).to(tl.float32)[None, :])

    jj = tl.arange(0, NP)
    pair_ok = (jj[:, None] < N) & (jj[None, :] < N)               # [NP, NP]
    # Padding columns score -inf (softmax weight 0); padding rows 0 (no NaN from -inf - -inf).
    logits = tl.where((jj[:, None] < N) & (jj[None, :] >= 0), float("-inf"), 0.0)
    logits = tl.broadcast_to(logits[None, :, :], (BLOCK_T, NP, NP))
    for j in tl.static_range(N):
        for kk in tl.static_range(N):
            at = (jj[:, None] == j) & (jj[None, :] == kk)
            logits = tl.where(at[None, :, :], _column(z, m, 2 * N + j * N + kk)[:, None, None],
                              logits)
    e = tl.exp(logits - tl.max(logits, axis=2)[:, :, None])
    comb = e / tl.sum(e, axis=2)[:, :, None] + hc_eps
    comb = tl.where(pair_ok[None, :, :], comb, 0.0)
    comb = comb / (tl.sum(comb, axis=1)[:, None, :] + hc_eps)
    for _ in tl.static_range(ITERS - 1):
        comb = comb / (tl.sum(comb, axis=2)[:, :, None] + hc_eps)
        comb = comb / (tl.sum(comb, axis=1)[:, None, :] + hc_eps)

    out_rows = rows.to(tl.int64)
    tl.store(comb_ptr + out_rows[:, None, None] * N * N + jj[None, :, None] * N
             + jj[None, None, :], comb, mask=row_ok[:, None, None] & pair_ok[None, :, :])
    post = 2.0 * tl.sigmoid(z)                                    # [BT, MP], columns N..2N-1
    tl.store(post_ptr + out_rows[:, None] * N + (m[None, :] - N), post,
             mask=row_ok[:, None] & (m[None, :] >= N) & (m[None, :] < 2 * N))

    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)                            # [BD]
        ok = row_ok[:, None] & (d[None, :] < D)
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for i in tl.static_range(N):
            pre = tl.sigmoid(_column(z, m, i)) + hc_eps           # [BT]
            s = tl.load(row_base + i * stride_sn + d[None, :] * stride_sd, mask=ok, other=0.0)
            acc += pre[:, None] * s.to(tl.float32)
        tl.store(collapsed_ptr + out_rows[:, None] * stride_ct + d[None, :] * stride_cd,
                 acc.to(collapsed_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _mhc_post_kernel(
    streams_ptr, out_ptr, post_ptr, comb_ptr, mixed_ptr,
    T, D, stride_st, stride_sn, stride_sd, stride_ot, stride_od, stride_pt, stride_pn,
    stride_ct, stride_cj, stride_ck,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """streams [T, N, D], out [T, D], post [T, N], comb [T, N, N]: any strides; mixed
    [T, N, D] out, contiguous, in streams' dtype."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)    # [BT]
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)       # [BD]
    j = tl.arange(0, NP)                                          # [NP] input stream
    row_ok, d_ok, j_ok = rows < T, d < D, j < N
    rows64 = rows.to(tl.int64)
    s = tl.load(streams_ptr + rows64[:, None, None] * stride_st + j[None, :, None] * stride_sn
                + d[None, None, :] * stride_sd,
                mask=row_ok[:, None, None] & j_ok[None, :, None] & d_ok[None, None, :],
                other=0.0).to(tl.float32)                         # [BT, NP, BD]
    o = tl.load(out_ptr + rows64[:, None] * stride_ot + d[None, :] * stride_od,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [BT, BD]
    for k in tl.static_range(N):
        c = tl.load(comb_ptr + rows64[:, None] * stride_ct + j[None, :] * stride_cj
                    + k * stride_ck, mask=row_ok[:, None] & j_ok[None, :],
                    other=0.0).to(tl.float32)                     # [BT, NP]
        p = tl.load(post_ptr + rows64 * stride_pt + k * stride_pn, mask=row_ok,
                    other=0.0).to(tl.float32)                     # [BT]
        mixed = p[:, None] * o + tl.sum(c[:, :, None] * s, axis=1)
        tl.store(mixed_ptr + (rows64[:, None] * N + k) * D + d[None, :],
                 mixed.to(mixed_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def mhc_pre(streams, fn, base, scale, norm_eps, hc_eps, sinkhorn_iters):
    T, N, D = streams.shape
    collapsed = streams.new_empty(T, D)
    post = torch.empty(T, N, dtype=torch.float32, device=streams.device)
    comb = torch.empty(T, N, N, dtype=torch.float32, device=streams.device)
    if T == 0:
        return collapsed, post, comb
    _mhc_pre_kernel[(triton.cdiv(T, _BLOCK_T),)](
        streams, fn, base.contiguous(), scale.contiguous(), collapsed, post, comb,
        T, D, *streams.stride(), *fn.stride(), *collapsed.stride(),
        float(norm_eps), float(hc_eps),
        N=N, NP=triton.next_power_of_2(N), MP=max(16, triton.next_power_of_2((2 + N) * N)),
        ITERS=sinkhorn_iters, BLOCK_T=_BLOCK_T, BLOCK_K=_BLOCK_K, BLOCK_D=_BLOCK_D,
        num_warps=_WARPS)
    return collapsed, post, comb


def mhc_post(streams, out, post, comb):
    T, N, D = streams.shape
    mixed = streams.new_empty(T, N, D)
    if T == 0 or D == 0:
        return mixed
    grid = (triton.cdiv(T, _POST_BLOCK_T), triton.cdiv(D, _POST_BLOCK_D))
    _mhc_post_kernel[grid](
        streams, out, post, comb, mixed, T, D, *streams.stride(), *out.stride(),
        *post.stride(), *comb.stride(), N=N, NP=triton.next_power_of_2(N),
        BLOCK_T=_POST_BLOCK_T, BLOCK_D=_POST_BLOCK_D, num_warps=_WARPS)
    return mixed
