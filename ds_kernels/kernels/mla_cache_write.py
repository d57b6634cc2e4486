"""Paged MLA cache write, plain or fused with the latent's RMSNorm and k_pe's rotary embedding
(semantics: ds_kernels/reference/mla_cache_write.py).

A program owns BLOCK_T tokens and writes each one's cache row [latent (Dc) | k_pe (Dr)] at
block slot // block_size, offset slot % block_size. The fused variant (what torch_npu's
npu_kv_rmsnorm_rope_cache does on Ascend) normalises the whole latent row in registers (Dc =
512 in DeepSeek-V3, one tile), rotates k_pe's pairs, and also stores both results for the
prefill path: one read of the inputs instead of three passes. The plain variant is the same
kernel with FUSED off: a copy, without any arithmetic on the values. With FP8 on, the row goes
into an FP8 cache (ds_kernels/mla_cache_format.py) instead: the latent tile, already in
registers, is quantised there (kernels/fp8_mla_cache.py), 128 columns per scale.

Slots outside [0, num_slots) - -1 for padding tokens, or a bad slot the host check could not
see (under CUDA graph capture) - are masked: they never write.
"""

import torch
import triton
import triton.language as tl

from ds_kernels.kernels.apply_rope import pair_columns, rotate
from ds_kernels.kernels.fp8_mla_cache import store_latent, store_rope
from ds_kernels.kernels.rms_norm import apply_norm, inv_rms, load_tile
from ds_kernels.mla_cache_format import is_fp8

# Latent elements a program holds: BLOCK_T = this // Dc rounded up to a power of two (4 tokens
# of DeepSeek-V3's 512-wide latent): 88 registers for the fused kernel (ptxas, sm_90, 4 warps)
# against 122 with 8 tokens. Register counts only: not yet timed on a GPU.
_TILE_ELEMENTS = 2048


@triton.jit
def _mla_cache_write_kernel(
    latent_ptr, k_pe_ptr, w_ptr, cos_ptr, sin_ptr, slot_ptr, cache_ptr,
    latent_out_ptr, k_pe_out_ptr,
    T, DC, HALF, num_slots, block_size, eps,
    stride_lt, stride_ld, stride_kt, stride_kd, stride_ct, stride_cd, stride_st, stride_sd,
    stride_slot, stride_cache_b, stride_cache_o, stride_cache_d,
    FUSED: tl.constexpr, INTERLEAVED: tl.constexpr, FP8: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_DC: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Write tokens pid * BLOCK_T ... into the cache; with FUSED, normalise and rotate first.

    latent_ptr: [T, DC], strides (stride_lt, stride_ld). k_pe_ptr: [T, 2 * HALF], strides
    (stride_kt, stride_kd). slot_ptr: [T] int32/int64, stride stride_slot (a column of a
    larger index tensor, or 0 for an expanded one). cache_ptr: [num_blocks, block_size,
    DC + 2 * HALF] in latent's dtype, strides (stride_cache_b, stride_cache_o, stride_cache_d);
    with FP8, the bytes (uint8) of FP8 rows [num_blocks, block_size, width], the same strides in
    bytes (stride_cache_d 1). num_slots = num_blocks * block_size. FUSED only: w_ptr [DC]
    contiguous norm weight, eps; cos_ptr, sin_ptr [T, HALF] (strides (stride_ct, stride_cd),
    (stride_st, stride_sd)); latent_out_ptr [T, DC] and k_pe_out_ptr [T, 2 * HALF] contiguous
    outputs. INTERLEAVED: k_pe's pair layout.
    FP8: the cache holds FP8 rows. BLOCK_DC: a power of two >= DC.
    """
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)       # [BT]
    token_ok = tokens < T
    slot = tl.load(slot_ptr + tokens.to(tl.int64) * stride_slot, mask=token_ok, other=-1).to(tl.int64)
    write = token_ok & (slot >= 0) & (slot < num_slots)
    slot = tl.where(write, slot, 0)
    cache_row = cache_ptr + ((slot // block_size) * stride_cache_b
                             + (slot % block_size) * stride_cache_o)[:, None]  # [BT, 1]

    d = tl.arange(0, BLOCK_DC)                                          # [BDC]
    d_ok = d < DC
    if FUSED:
        latent = load_tile(latent_ptr, tokens, token_ok, d, DC, stride_lt, stride_ld, tl.float32)
        w = tl.load(w_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        inv = inv_rms(tl.sum(latent * latent, axis=1), DC, eps)
        latent = apply_norm(latent, inv, w, latent_ptr.dtype.element_ty)
        tl.store(latent_out_ptr + tokens.to(tl.int64)[:, None] * DC + d[None, :],
                 latent.to(latent_out_ptr.dtype.element_ty),
                 mask=token_ok[:, None] & d_ok[None, :])
    else:
        latent = tl.load(latent_ptr + tokens.to(tl.int64)[:, None] * stride_lt
                         + d[None, :] * stride_ld, mask=token_ok[:, None] & d_ok[None, :])
    if FP8:  # the values returned (rounded to the input dtype) are the ones quantised
        store_latent(cache_row, write, latent.to(latent_ptr.dtype.element_ty).to(tl.float32), d,
                     DC, BLOCK_T, BLOCK_DC)
    else:
        tl.store(cache_row + d[None, :] * stride_cache_d, latent.to(cache_ptr.dtype.element_ty),
                 mask=write[:, None] & d_ok[None, :])

    i = tl.arange(0, BLOCK_HALF)                                        # [BH]
    ok = token_ok[:, None] & (i < HALF)[None, :]
    c1, c2 = pair_columns(i, HALF, INTERLEAVED)
    k_row = k_pe_ptr + tokens.to(tl.int64)[:, None] * stride_kt
    x1 = tl.load(k_row + c1[None, :] * stride_kd, mask=ok)
    x2 = tl.load(k_row + c2[None, :] * stride_kd, mask=ok)
    if FUSED:
        token = tokens.to(tl.int64)[:, None]
        cos = tl.load(cos_ptr + token * stride_ct + i[None, :] * stride_cd, mask=ok, other=0.0)
        sin = tl.load(sin_ptr + token * stride_st + i[None, :] * stride_sd, mask=ok, other=0.0)
        x1, x2 = rotate(x1.to(tl.float32), x2.to(tl.float32), cos.to(tl.float32),
                        sin.to(tl.float32))
        out_row = k_pe_out_ptr + token * (2 * HALF)
        tl.store(out_row + c1[None, :], x1.to(k_pe_out_ptr.dtype.element_ty), mask=ok)
        tl.store(out_row + c2[None, :], x2.to(k_pe_out_ptr.dtype.element_ty), mask=ok)
    write_pe = write[:, None] & (i < HALF)[None, :]
    if FP8:
        store_rope(cache_row, write_pe, x1.to(k_pe_ptr.dtype.element_ty), c1[None, :], DC)
        store_rope(cache_row, write_pe, x2.to(k_pe_ptr.dtype.element_ty), c2[None, :], DC)
    else:
        tl.store(cache_row + (DC + c1[None, :]) * stride_cache_d,
                 x1.to(cache_ptr.dtype.element_ty), mask=write_pe)
        tl.store(cache_row + (DC + c2[None, :]) * stride_cache_d,
                 x2.to(cache_ptr.dtype.element_ty), mask=write_pe)


def _launch(latent, k_pe, kv_cache, slot_mapping, fused, interleaved=False, norm_weight=None,
            eps=0.0, cos=None, sin=None, latent_out=None, k_pe_out=None):
    T, Dc = latent.shape
    Dr = k_pe.shape[1]
    num_blocks, block_size, _ = kv_cache.shape
    if T == 0:
        return
    block_dc = triton.next_power_of_2(Dc)
    block_t = max(1, min(_TILE_ELEMENTS // block_dc, triton.next_power_of_2(T)))
    # Unused pointers (plain write) point at the latent; FUSED=False never reads them.
    cos = latent if cos is None else cos
    sin = latent if sin is None else sin
    _mla_cache_write_kernel[(triton.cdiv(T, block_t),)](
        latent, k_pe, latent if norm_weight is None else norm_weight.contiguous(), cos, sin,
        slot_mapping, kv_cache, latent if latent_out is None else latent_out,
        latent if k_pe_out is None else k_pe_out,
        T, Dc, Dr // 2, num_blocks * block_size, block_size, float(eps),
        latent.stride(0), latent.stride(1), k_pe.stride(0), k_pe.stride(1),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), slot_mapping.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        FUSED=fused, INTERLEAVED=interleaved, FP8=is_fp8(kv_cache), BLOCK_T=block_t,
        BLOCK_DC=block_dc,
        BLOCK_HALF=triton.next_power_of_2(Dr // 2))


def mla_cache_write(latent, k_pe, kv_cache, slot_mapping):
    _launch(latent, k_pe, kv_cache, slot_mapping, fused=False)


def mla_cache_write_fused(kv_latent, k_pe, norm_weight, eps, cos, sin, kv_cache, slot_mapping,
                          interleaved):
    latent_out = torch.empty(kv_latent.shape, dtype=kv_latent.dtype, device=kv_latent.device)
    k_pe_out = torch.empty(k_pe.shape, dtype=k_pe.dtype, device=k_pe.device)
    _launch(kv_latent, k_pe, kv_cache, slot_mapping, fused=True, interleaved=interleaved,
            norm_weight=norm_weight, eps=eps, cos=cos, sin=sin, latent_out=latent_out,
            k_pe_out=k_pe_out)
    return latent_out, k_pe_out
