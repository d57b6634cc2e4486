"""Paged index-key cache write of DeepSeek-V3.2's lightning indexer, fused: LayerNorm of the
key wk(x), RoPE on its first Dr columns, store (semantics: ds_kernels/reference/
index_cache_write.py).

A program owns BLOCK_T tokens. Each row is read once, in three pieces held in registers: the
two members of every rotated pair (columns c1, c2: non-interleaved in V3.2) and the columns
past Dr that pass through. The LayerNorm's mean and variance sum over the three, each piece is
normalised, rounded to the key's dtype (nn.LayerNorm's output), the pairs rotated, and all three
stored into the cache row: one read and one write instead of LayerNorm, RoPE and a copy.
Slots outside [0, num_slots) (-1 padding, or a bad slot a captured graph could not check) are
masked: they never write.
"""

import triton
import triton.language as tl

from ds_kernels.kernels.apply_rope import pair_columns, rotate

# Key elements a program holds: BLOCK_T = this // next_pow2(Di), 8 tokens of V3.2's Di = 128:
# 86 registers, no spills (ptxas, sm_90, bf16, 4 warps) against 136 with 16 tokens, 54 with 4.
# Register counts only: not yet timed on a GPU.
_TILE_ELEMENTS = 1024


@triton.jit
def _load_piece(k_ptr, w_ptr, b_ptr, tokens, token_ok, cols, cols_ok, stride_kt, stride_kd):
    """(key columns [BT, n] in fp32, 0 where masked; their weight and bias [n] in fp32)."""
    ok = token_ok[:, None] & cols_ok[None, :]
    x = tl.load(k_ptr + tokens.to(tl.int64)[:, None] * stride_kt + cols[None, :] * stride_kd,
                mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cols_ok, other=0.0).to(tl.float32)
    return x, w, b


@triton.jit
def _normalise(x, ok, mean, rstd, w, b, K_DTYPE: tl.constexpr):
    """LayerNorm of one piece, rounded to K_DTYPE and back to fp32; 0 where not ok."""
    y = (x - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
    return tl.where(ok, y.to(K_DTYPE).to(tl.float32), 0.0)


@triton.jit
def _index_cache_write_kernel(
    k_ptr, w_ptr, b_ptr, cos_ptr, sin_ptr, slot_ptr, cache_ptr,
    T, D, HALF, num_slots, block_size, eps,
    stride_kt, stride_kd, stride_ct, stride_cd, stride_st, stride_sd, stride_slot,
    stride_cache_b, stride_cache_o, stride_cache_d,
    INTERLEAVED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    """Write tokens pid * BLOCK_T ... into the cache.

    k_ptr: [T, D] keys, strides (stride_kt, stride_kd). w_ptr, b_ptr: [D] contiguous LayerNorm
    weight and bias. cos_ptr, sin_ptr: [T, HALF] (strides (stride_ct, stride_cd), (stride_st,
    stride_sd)); the rope part is columns [0, 2 * HALF). slot_ptr: [T] int32/int64, stride
    stride_slot. cache_ptr: [num_blocks, block_size, D] in k's dtype, strides (stride_cache_b,
    stride_cache_o, stride_cache_d); num_slots = num_blocks * block_size. INTERLEAVED: the
    pairs' layout. BLOCK_HALF >= HALF, BLOCK_PASS >= D - 2 * HALF, powers of two.
    """
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)       # [BT]
    token_ok = tokens < T
    slot = tl.load(slot_ptr + tokens.to(tl.int64) * stride_slot, mask=token_ok,
                   other=-1).to(tl.int64)
    write = token_ok & (slot >= 0) & (slot < num_slots)
    slot = tl.where(write, slot, 0)
    cache_row = cache_ptr + ((slot // block_size) * stride_cache_b
                             + (slot % block_size) * stride_cache_o)[:, None]  # [BT, 1]

    i = tl.arange(0, BLOCK_HALF)                                        # [BH]
    pair_ok = i < HALF
    c1, c2 = pair_columns(i, HALF, INTERLEAVED)
    p = 2 * HALF + tl.arange(0, BLOCK_PASS)                             # [BP]
    pass_ok = p < D
    x1, w1, b1 = _load_piece(k_ptr, w_ptr, b_ptr, tokens, token_ok, c1, pair_ok, stride_kt,
                             stride_kd)
    x2, w2, b2 = _load_piece(k_ptr, w_ptr, b_ptr, tokens, token_ok, c2, pair_ok, stride_kt,
                             stride_kd)
    xp, wp, bp = _load_piece(k_ptr, w_ptr, b_ptr, tokens, token_ok, p, pass_ok, stride_kt,
                             stride_kd)
    ok_pair = token_ok[:, None] & pair_ok[None, :]
    ok_pass = token_ok[:, None] & pass_ok[None, :]
    mean = (tl.sum(x1, axis=1) + tl.sum(x2, axis=1) + tl.sum(xp, axis=1)) / D
    d1 = tl.where(ok_pair, x1 - mean[:, None], 0.0)
    d2 = tl.where(ok_pair, x2 - mean[:, None], 0.0)
    dp = tl.where(ok_pass, xp - mean[:, None], 0.0)
    var = (tl.sum(d1 * d1, axis=1) + tl.sum(d2 * d2, axis=1) + tl.sum(dp * dp, axis=1)) / D
    rstd = tl.rsqrt(var + eps)
    y1 = _normalise(x1, ok_pair, mean, rstd, w1, b1, k_ptr.dtype.element_ty)
    y2 = _normalise(x2, ok_pair, mean, rstd, w2, b2, k_ptr.dtype.element_ty)
    yp = _normalise(xp, ok_pass, mean, rstd, wp, bp, k_ptr.dtype.element_ty)

    token = tokens.to(tl.int64)[:, None]
    cos = tl.load(cos_ptr + token * stride_ct + i[None, :] * stride_cd, mask=ok_pair, other=0.0)
    sin = tl.load(sin_ptr + token * stride_st + i[None, :] * stride_sd, mask=ok_pair, other=0.0)
    y1, y2 = rotate(y1, y2, cos.to(tl.float32), sin.to(tl.float32))
    out = cache_ptr.dtype.element_ty
    write_pair = write[:, None] & pair_ok[None, :]
    tl.store(cache_row + c1[None, :] * stride_cache_d, y1.to(out), mask=write_pair)
    tl.store(cache_row + c2[None, :] * stride_cache_d, y2.to(out), mask=write_pair)
    tl.store(cache_row + p[None, :] * stride_cache_d, yp.to(out),
             mask=write[:, None] & pass_ok[None, :])


def index_cache_write(k, norm_weight, norm_bias, eps, cos, sin, k_cache, slot_mapping,
                      interleaved):
    T, D = k.shape
    if T == 0:
        return
    half = cos.shape[1]
    num_blocks, block_size, _ = k_cache.shape
    block_t = max(1, min(_TILE_ELEMENTS // triton.next_power_of_2(D), triton.next_power_of_2(T)))
    _index_cache_write_kernel[(triton.cdiv(T, block_t),)](
        k, norm_weight.contiguous(), norm_bias.contiguous(), cos, sin, slot_mapping, k_cache,
        T, D, half, num_blocks * block_size, block_size, float(eps),
        k.stride(0), k.stride(1), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        slot_mapping.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        INTERLEAVED=interleaved, BLOCK_T=block_t, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_PASS=triton.next_power_of_2(max(D - 2 * half, 1)))
