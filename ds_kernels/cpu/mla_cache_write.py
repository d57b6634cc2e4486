"""MLA cache write on the torch path: one indexed copy per part of the row, for all tokens at
once. The fused variant composes the torch paths of rms_norm and apply_rope with that write (on
a CPU there is no launch to save by fusing)."""

from ds_kernels.cpu.apply_rope import apply_rope
from ds_kernels.cpu.rms_norm import rms_norm


def mla_cache_write(latent, k_pe, kv_cache, slot_mapping):
    num_blocks, block_size, width = kv_cache.shape
    Dc = latent.shape[1]
    slots = slot_mapping.long()                                   # [T]
    # -1 (padding) skips; a bad slot the host check could not see must not write either.
    keep = (slots >= 0) & (slots < num_blocks * block_size)
    if not bool(keep.all()):
        slots, latent, k_pe = slots[keep], latent[keep], k_pe[keep]
    if kv_cache.stride(0) == block_size * kv_cache.stride(1):
        # Blocks evenly spaced (a cache allocated as one tensor): one row per slot, and
        # index_copy_ (~2x faster than indexed assignment for a decode step's token).
        rows = kv_cache.view(num_blocks * block_size, width)     # [num_slots, Dc + Dr]
        rows[:, :Dc].index_copy_(0, slots, latent)
        rows[:, Dc:].index_copy_(0, slots, k_pe)
    else:
        block, offset = slots // block_size, slots % block_size
        kv_cache[block, offset, :Dc] = latent
        kv_cache[block, offset, Dc:] = k_pe


def mla_cache_write_fused(kv_latent, k_pe, norm_weight, eps, cos, sin, kv_cache, slot_mapping,
                          interleaved):
    latent = rms_norm(kv_latent, norm_weight, eps)
    k_pe = apply_rope(k_pe, cos, sin, interleaved)
    mla_cache_write(latent, k_pe, kv_cache, slot_mapping)
    return latent, k_pe
