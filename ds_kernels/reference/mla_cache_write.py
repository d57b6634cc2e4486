"""Reference MLA cache write: one token at a time, plain indexing. Row ``slot`` of the paged
cache is kv_cache[slot // block_size, slot % block_size] = [latent | k_pe] (a float cache) or
that token's FP8 row (a uint8 cache: ds_kernels/reference/fp8_mla_cache.py); slot -1 is
skipped. The fused variant is the rms_norm and apply_rope references followed by that write."""

from ds_kernels.mla_cache_format import is_fp8
from ds_kernels.reference.apply_rope import apply_rope
from ds_kernels.reference.fp8_mla_cache import quantize_row
from ds_kernels.reference.rms_norm import rms_norm


def mla_cache_write(latent, k_pe, kv_cache, slot_mapping):
    block_size = kv_cache.shape[1]
    Dc = latent.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        row = kv_cache[slot // block_size, slot % block_size]     # [width]
        if is_fp8(kv_cache):
            row[:] = quantize_row(latent[t], k_pe[t])
        else:
            row[:Dc] = latent[t]
            row[Dc:] = k_pe[t]


def mla_cache_write_fused(kv_latent, k_pe, norm_weight, eps, cos, sin, kv_cache, slot_mapping,
                          interleaved):
    latent = rms_norm(kv_latent, norm_weight, eps)
    k_pe = apply_rope(k_pe, cos, sin, interleaved)
    mla_cache_write(latent, k_pe, kv_cache, slot_mapping)
    return latent, k_pe
