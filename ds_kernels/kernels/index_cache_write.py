"""Paged index-key cache write of DeepSeek-V3.2's lightning indexer, fused: LayerNorm of the
key wk(x), RoPE on its first Dr columns, store - into a float cache, or quantised into FP8 rows
(semantics: ds_kernels/reference/index_cache_write.py).

A program owns BLOCK_T tokens, each row one tile [BLOCK_T, BLOCK_D] in registers. RoPE mixes
column pairs, which a register tile cannot gather, so the row is also loaded in its partners'
order (column c holds c's pair member: c +- Dr/2, or c ^ 1 interleaved; itself past Dr): both
tiles are normalised alike (statistics from the first), rounded to the key's dtype
(nn.LayerNorm's output), and c becomes y[c] cos -+ y[partner(c)] sin. The second load reads
the bytes the first brought into cache. One launch instead of LayerNorm, RoPE and a copy; an
FP8 row is quantised from the tile where it is (kernels/fp8_mla_cache.py, 128 columns a
scale). Slots outside [0, num_slots) (-1 padding, or a bad slot a captured graph could not
check) are masked: they never write.
"""

import triton
import triton.language as tl

from ds_kernels.kernels.fp8_mla_cache import store_latent
from ds_kernels.mla_cache_format import is_fp8

# Key elements a program holds: BLOCK_T = this // next_pow2(Di), 8 tokens of V3.2's Di = 128:
# 88 registers into a bf16 cache, 116 into FP8 rows, no spills (ptxas, sm_90, 4 warps; 16
# tokens took 136 with the float cache). Register counts only: not yet timed on a GPU.
_TILE_ELEMENTS = 1024


@triton.jit
def _normalise(k_ptr, w_ptr, b_ptr, tokens, cols, ok, mean, rstd, stride_kt, stride_kd):
    """LayerNorm of the key columns cols [BT, BD] (0 where not ok), rounded to the key's dtype,
    back in fp32."""
    x = tl.load(k_ptr + tokens.to(tl.int64)[:, None] * stride_kt + cols * stride_kd, mask=ok,
                other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    y = (x - mean[:, None]) * rstd[:, None] * w + b
    return tl.where(ok, y.to(k_ptr.dtype.element_ty).to(tl.float32), 0.0)


@triton.jit
def _index_cache_write_kernel(
    k_ptr, w_ptr, b_ptr, cos_ptr, sin_ptr, slot_ptr, cache_ptr,
    T, D, HALF, num_slots, block_size, eps,
    stride_kt, stride_kd, stride_ct, stride_cd, stride_st, stride_sd, stride_slot,
    stride_cache_b, stride_cache_o, stride_cache_d,
    INTERLEAVED: tl.constexpr, FP8: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Write tokens pid * BLOCK_T ... into the cache.

    k_ptr: [T, D] keys, strides (stride_kt, stride_kd). w_ptr, b_ptr: [D] contiguous LayerNorm
    weight and bias. cos_ptr, sin_ptr: [T, HALF] (strides (stride_ct, stride_cd), (stride_st,
    stride_sd)); the rope part is columns [0, 2 * HALF). slot_ptr: [T] int32/int64, stride
    stride_slot. cache_ptr: [num_blocks, block_size, D] in k's dtype, strides (stride_cache_b,
    stride_cache_o, stride_cache_d); with FP8 the bytes (uint8) of FP8 rows [num_blocks,
    block_size, D + 4 * D/128], the same strides in bytes. num_slots = num_blocks * block_size.
    INTERLEAVED: the pairs' layout. BLOCK_D: D as a power of two.
    """
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)       # [BT]
    token_ok = tokens < T
    slot = tl.load(slot_ptr + tokens.to(tl.int64) * stride_slot, mask=token_ok,
                   other=-1).to(tl.int64)
    write = token_ok & (slot >= 0) & (slot < num_slots)
    slot = tl.where(write, slot, 0)
    cache_row = cache_ptr + ((slot // block_size) * stride_cache_b
                             + (slot % block_size) * stride_cache_o)[:, None]  # [BT, 1]

    d = tl.arange(0, BLOCK_D)                                           # [BD]
    rope = d < 2 * HALF
    if INTERLEAVED:
        pair, partner, first = d // 2, d ^ 1, d % 2 == 0
    else:
        pair = tl.where(d < HALF, d, d - HALF)
        partner = tl.where(d < HALF, d + HALF, d - HALF)
        first = d < HALF
    partner = tl.where(rope, partner, d)
    ok = token_ok[:, None] & (d < D)[None, :]                           # [BT, BD]

    x = tl.load(k_ptr + tokens.to(tl.int64)[:, None] * stride_kt + d[None, :] * stride_kd,
                mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    centred = tl.where(ok, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / D + eps)
    y = _normalise(k_ptr, w_ptr, b_ptr, tokens, d[None, :], ok, mean, rstd, stride_kt, stride_kd)
    y_partner = _normalise(k_ptr, w_ptr, b_ptr, tokens, partner[None, :], ok, mean, rstd,
                           stride_kt, stride_kd)

    token = tokens.to(tl.int64)[:, None]
    rope_ok = token_ok[:, None] & rope[None, :]
    cos = tl.load(cos_ptr + token * stride_ct + pair[None, :] * stride_cd, mask=rope_ok,
                  other=1.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * stride_st + pair[None, :] * stride_sd, mask=rope_ok,
                  other=0.0).to(tl.float32)
    # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), each column its own member.
    rotated = y * cos + tl.where(first, -1.0, 1.0)[None, :] * y_partner * sin
    y = tl.where(rope[None, :], rotated, y)
    if FP8:  # the row rounded to the key's dtype, as the float cache would hold it, quantised
        store_latent(cache_row, write, y.to(k_ptr.dtype.element_ty).to(tl.float32), d, D,
                     BLOCK_T, BLOCK_D)
    else:
        tl.store(cache_row + d[None, :] * stride_cache_d, y.to(cache_ptr.dtype.element_ty),
                 mask=write[:, None] & (d < D)[None, :])


def index_cache_write(k, norm_weight, norm_bias, eps, cos, sin, k_cache, slot_mapping,
                      interleaved):
    T, D = k.shape
    if T == 0:
        return
    num_blocks, block_size, _ = k_cache.shape
    block_d = triton.next_power_of_2(D)
    block_t = max(1, min(_TILE_ELEMENTS // block_d, triton.next_power_of_2(T)))
    _index_cache_write_kernel[(triton.cdiv(T, block_t),)](
        k, norm_weight.contiguous(), norm_bias.contiguous(), cos, sin, slot_mapping, k_cache,
        T, D, cos.shape[1], num_blocks * block_size, block_size, float(eps),
        k.stride(0), k.stride(1), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        slot_mapping.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        INTERLEAVED=interleaved, FP8=is_fp8(k_cache), BLOCK_T=block_t, BLOCK_D=block_d)
