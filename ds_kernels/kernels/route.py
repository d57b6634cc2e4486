"""Fused DeepSeek routing: one launch from logits to (weights, ids).

A program owns BLOCK_T tokens and holds each token's whole row of E scores in registers,
laid out as [BLOCK_T, groups, experts per group] so that group scores are a reduction over the
last axis, for any E (n_group=1 is one group of E). Top-k is k rounds of "take the maximum,
lowest index first"; k <= 16 and topk_group <= 32 keep the rounds few. All math is fp32.
"""

import torch
import triton
import triton.language as tl

from ds_kernels import tuning
from ds_kernels.reference import route as reference

# Globals a kernel reads must be constexprs (triton 3.9 refuses plain Python globals on GPU).
_NAN_CHOICE_SCORE = tl.constexpr(reference.NAN_CHOICE_SCORE)
_RENORM_EPS = tl.constexpr(reference.RENORM_EPS)

# Scores held per program: BLOCK_T * E_pow2. 4096 fp32 values over 4 warps is 32 per thread
# for each of the few live [BLOCK_T, E] tiles, which stays in registers on every GPU.
_ROW_ELEMENTS = 4096
_MAX_BLOCK_T = 16
_WARPS = 4


@triton.jit
def _nan_last(x, ok):
    """x where ok (NaN ranked below every real value, as the reference's nan_last), else -inf."""
    return tl.where(ok, tl.where(x != x, _NAN_CHOICE_SCORE, x), float("-inf"))


@triton.jit
def _sqrt_softplus(x):
    """sqrt(softplus(x)) as torch computes softplus: max(x, 0) + log1p(exp(-|x|)), log1p
    by Goldberg's correction (tl has no log1p; log(1 + y) alone loses tiny y), which equals
    x itself above 20 in fp32 as torch's threshold does."""
    y = tl.exp(-tl.abs(x))
    u = 1.0 + y
    log1p = tl.where(u == 1.0, y, tl.log(u) * (y / (u - 1.0)))
    return tl.sqrt(tl.maximum(x, 0.0) + log1p)


@triton.jit
def _route_kernel(
    logits_ptr, bias_ptr, fixed_ptr, weights_ptr, ids_ptr,
    T, stride_lt, stride_le, stride_ft, stride_fk, scale,
    N_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr, TOPK_GROUP: tl.constexpr,
    TOP_K: tl.constexpr, G_POW2: tl.constexpr, GS_POW2: tl.constexpr, K_POW2: tl.constexpr,
    BLOCK_T: tl.constexpr, SCORING: tl.constexpr, HAS_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr, GROUP_TOP2: tl.constexpr, FIXED: tl.constexpr,
):
    """Route BLOCK_T tokens.

    logits_ptr: [T, E] router logits, any float dtype, strides (stride_lt, stride_le).
    SCORING: 0 sigmoid, 1 softmax, 2 sqrt(softplus).
    bias_ptr: [E] fp32 correction bias (read only if HAS_BIAS).
    fixed_ptr: [T, TOP_K] given expert ids, strides (stride_ft, stride_fk), read only if FIXED
    (hash routing: then the i-th id is taken instead of the i-th best).
    weights_ptr: [T, TOP_K] fp32 out, contiguous. ids_ptr: [T, TOP_K] int32 out, contiguous.
    scale: routed_scaling_factor. E = N_GROUP * GROUP_SIZE; G_POW2, GS_POW2, K_POW2 are the
    next powers of two of N_GROUP, GROUP_SIZE and TOP_K (tile extents). GROUP_TOP2: a group's
    score is the sum of its two best choice scores (else its best unbiased score).
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)                 # [BT]
    g = tl.arange(0, G_POW2)                                     # [G]
    j = tl.arange(0, GS_POW2)                                    # [GS]
    row_ok = rows < T
    expert = g[None, :, None] * GROUP_SIZE + j[None, None, :]    # [1, G, GS]
    expert_ok = (g[None, :, None] < N_GROUP) & (j[None, None, :] < GROUP_SIZE)
    ok = row_ok[:, None, None] & expert_ok                       # [BT, G, GS]

    offsets = rows.to(tl.int64)[:, None, None] * stride_lt + expert * stride_le
    x = tl.load(logits_ptr + offsets, mask=ok, other=float("-inf")).to(tl.float32)
    if SCORING == 1:
        row_max = tl.max(tl.max(x, axis=2), axis=1)              # [BT]
        e = tl.exp(x - row_max[:, None, None])
        e = tl.where(ok, e, 0.0)
        s = e / tl.sum(tl.sum(e, axis=2), axis=1)[:, None, None]
    elif SCORING == 2:
        s = _sqrt_softplus(x)
    else:
        s = tl.sigmoid(x)
    c = s
    if HAS_BIAS:
        c = c + tl.load(bias_ptr + expert, mask=expert_ok, other=0.0)
    c = _nan_last(c, ok)

    if N_GROUP > 1:
        if GROUP_TOP2:
            # The two largest choice scores of the group (a repeated maximum counts twice).
            best = tl.max(c, axis=2)                             # [BT, G]
            first = tl.min(tl.where(c == best[:, :, None], j[None, None, :], GS_POW2), axis=2)
            second = tl.max(tl.where(j[None, None, :] == first[:, :, None], float("-inf"), c),
                            axis=2)
            group_score = best + second                          # [BT, G]
        else:
            group_score = tl.max(_nan_last(s, ok), axis=2)       # [BT, G]
        group_ok = (g < N_GROUP)[None, :]
        # Loop-carried, so full-shaped from the start: a GPU build refuses a shape change.
        kept = tl.zeros((BLOCK_T, G_POW2), dtype=tl.int1)        # [BT, G]
        for _ in range(TOPK_GROUP):
            open_ = group_ok & (kept == 0)
            top = tl.max(tl.where(open_, group_score, float("-inf")), axis=1)
            pick = tl.min(tl.where(open_ & (group_score == top[:, None]), g[None, :], G_POW2), axis=1)
            kept = kept | (g[None, :] == pick[:, None])
        c = tl.where(kept[:, :, None], c, float("-inf"))

    kk = tl.arange(0, K_POW2)                                    # [K]
    ids = tl.zeros((BLOCK_T, K_POW2), dtype=tl.int32)
    weights = tl.zeros((BLOCK_T, K_POW2), dtype=tl.float32)
    taken = tl.zeros((BLOCK_T, G_POW2, GS_POW2), dtype=tl.int1)  # [BT, G, GS]
    for i in range(TOP_K):
        if FIXED:
            pick = tl.load(fixed_ptr + rows.to(tl.int64) * stride_ft + i * stride_fk,
                           mask=row_ok, other=0).to(tl.int32)    # [BT]
        else:
            open_ = expert_ok & (taken == 0)
            cand = tl.where(open_, c, float("-inf"))
            top = tl.max(tl.max(cand, axis=2), axis=1)           # [BT]
            hit = open_ & (cand == top[:, None, None])
            pick = tl.min(tl.min(tl.where(hit, expert, N_GROUP * GROUP_SIZE), axis=2), axis=1)
        chosen = expert == pick[:, None, None]                   # [BT, G, GS]
        taken = taken | chosen
        w = tl.sum(tl.sum(tl.where(chosen, s, 0.0), axis=2), axis=1)
        ids = tl.where(kk[None, :] == i, pick[:, None], ids)
        weights = tl.where(kk[None, :] == i, w[:, None], weights)

    if RENORMALIZE:
        weights = weights / (tl.sum(weights, axis=1)[:, None] + _RENORM_EPS)
    weights = weights * scale
    out = rows.to(tl.int64)[:, None] * TOP_K + kk[None, :]
    out_ok = row_ok[:, None] & (kk[None, :] < TOP_K)
    tl.store(weights_ptr + out, weights, mask=out_ok)
    tl.store(ids_ptr + out, ids, mask=out_ok)


SCORING = {"sigmoid": 0, "softmax": 1, "sqrtsoftplus": 2}


def route(logits, top_k, scoring, correction_bias, n_group, topk_group, renormalize,
          routed_scaling_factor, group_scoring, fixed_ids=None):
    T, E = logits.shape
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=logits.device)
    if T == 0:
        return weights, ids
    group_size = E // n_group
    g_pow2 = triton.next_power_of_2(n_group)
    gs_pow2 = triton.next_power_of_2(group_size)
    config = _config(T, E, g_pow2 * gs_pow2, logits.dtype, logits.device)
    block_t = config["BLOCK_T"]
    bias = correction_bias.float().contiguous() if correction_bias is not None else weights
    fixed = ids if fixed_ids is None else fixed_ids
    _route_kernel[(triton.cdiv(T, block_t),)](
        logits, bias, fixed, weights, ids,
        T, logits.stride(0), logits.stride(1), fixed.stride(0), fixed.stride(1),
        float(routed_scaling_factor),
        N_GROUP=n_group, GROUP_SIZE=group_size, TOPK_GROUP=topk_group, TOP_K=top_k,
        G_POW2=g_pow2, GS_POW2=gs_pow2, K_POW2=triton.next_power_of_2(top_k),
        BLOCK_T=block_t, SCORING=SCORING[scoring], HAS_BIAS=correction_bias is not None,
        RENORMALIZE=renormalize, GROUP_TOP2=group_scoring == "top2_sum",
        FIXED=fixed_ids is not None,
        num_warps=config["num_warps"],
    )
    return weights, ids


def fits(config, row_width) -> bool:
    """Whether a program's [BLOCK_T, row_width] score tiles stay within the per-thread share
    of _ROW_ELEMENTS over _WARPS warps (32 values a thread each)."""
    return config["BLOCK_T"] * row_width <= _ROW_ELEMENTS * config["num_warps"] // _WARPS


def _config(T, E, row_width, dtype, device) -> dict:
    """BLOCK_T and num_warps: tuned for this token bucket, else as many tokens as fit."""
    block_t = max(1, min(_MAX_BLOCK_T, _ROW_ELEMENTS // row_width, triton.next_power_of_2(T)))
    return tuning.config("route", "triton", tuning.shape_key("route", E=E), T, dtype, device,
                         dict(BLOCK_T=block_t, num_warps=_WARPS))
