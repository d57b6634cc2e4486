"""MLA cache write on the torch path: one indexed copy per part of the row, for all tokens at
once (an FP8 cache: the tokens' rows quantised first, then copied whole; write_rows is shared
with the index-key cache). The fused variant
composes the torch paths of rms_norm and apply_rope with that write (on a CPU there is no
launch to save by fusing)."""

import torch

from ds_kernels.cpu.apply_rope import apply_rope
from ds_kernels.cpu.quantize import ceil_pow2
from ds_kernels.cpu.rms_norm import rms_norm
from ds_kernels.mla_cache_format import (FP8_CACHE_DTYPE, FP8_TILE, ROPE_DTYPE, SCALE_FLOOR,
                                         is_fp8)
from ds_kernels.quant_formats import E4M3_MAX, FP8_DTYPE


def quantize_rows(latent, k_pe):
    """FP8 rows uint8 [T, width] of latent [T, Dc] and k_pe [T, Dr]: the recipe of
    ds_kernels/reference/fp8_mla_cache.py, all tokens and tiles at once."""
    T, Dc = latent.shape
    tiles = latent.float().unflatten(1, (Dc // FP8_TILE, FP8_TILE))         # [T, Dc/128, 128]
    finite = tiles.isfinite()
    amax = torch.where(finite, tiles.abs(), 0.0).amax(dim=-1, keepdim=True)
    scale = ceil_pow2((amax / E4M3_MAX).clamp_min(SCALE_FLOOR))            # [T, Dc/128, 1]
    q = torch.where(finite, (tiles / scale).clamp(-E4M3_MAX, E4M3_MAX), torch.nan)
    return torch.cat([q.to(FP8_DTYPE).view(FP8_CACHE_DTYPE).view(T, Dc),
                      scale.view(T, Dc // FP8_TILE).view(FP8_CACHE_DTYPE),
                      k_pe.to(ROPE_DTYPE).contiguous().view(FP8_CACHE_DTYPE)], dim=1)


def mla_cache_write(latent, k_pe, kv_cache, slot_mapping):
    Dc = latent.shape[1]
    if is_fp8(kv_cache):
        parts = [(slice(None), quantize_rows(latent, k_pe))]        # [T, width]
    else:
        parts = [(slice(None, Dc), latent), (slice(Dc, None), k_pe)]
    write_rows(kv_cache, slot_mapping, parts)


def write_rows(cache, slot_mapping, parts):
    """cache[slot // block_size, slot % block_size, columns] = values[t] for each (columns,
    values [T, n]) of parts and each token t whose slot is in [0, num_slots)."""
    num_blocks, block_size, width = cache.shape
    slots = slot_mapping.long()                                   # [T]
    # -1 (padding) skips; a bad slot the host check could not see must not write either.
    keep = (slots >= 0) & (slots < num_blocks * block_size)
    keep = slice(None) if bool(keep.all()) else keep
    slots = slots[keep]
    parts = [(columns, values[keep]) for columns, values in parts]
    if cache.stride(0) == block_size * cache.stride(1):
        # Blocks evenly spaced (a cache allocated as one tensor): one row per slot, and
        # index_copy_ (~2x faster than indexed assignment for a decode step's token).
        rows = cache.view(num_blocks * block_size, width)        # [num_slots, width]
        for columns, values in parts:
            rows[:, columns].index_copy_(0, slots, values)
    else:
        block, offset = slots // block_size, slots % block_size
        for columns, values in parts:
            cache[block, offset, columns] = values


def mla_cache_write_fused(kv_latent, k_pe, norm_weight, eps, cos, sin, kv_cache, slot_mapping,
                          interleaved):
    latent = rms_norm(kv_latent, norm_weight, eps)
    k_pe = apply_rope(k_pe, cos, sin, interleaved)
    mla_cache_write(latent, k_pe, kv_cache, slot_mapping)
    return latent, k_pe
