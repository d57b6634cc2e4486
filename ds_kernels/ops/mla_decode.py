"""ds_kernels.mla_decode: absorbed-weight multi-head latent attention decode over a paged
latent cache (FlashMLA semantics), as ``torch.ops.ds_kernels.mla_decode``. Inference only: no
autograd formula."""

import torch

from ds_kernels import dispatch
from ds_kernels.mla_cache_format import FP8_CACHE_DTYPE, is_fp8
from ds_kernels.ops.mla_cache_write import check_fp8_cache
from ds_kernels.ops.checks import (FLOAT_DTYPES, check_finite_float, check_same_device,
                                   check_same_dtype, check_tensor, device_checks_allowed)


def mla_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
               block_table: torch.Tensor, cache_seqlens: torch.Tensor,
               softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, Dc] in q's dtype, lse float32 [B, Hq]) of one decode step.

    q_nope [B, Hq, Dc]: the no-rope query already multiplied by W_UK (absorbed); q_pe
    [B, Hq, Dr]: the rope query. kv_cache [num_blocks, block_size, width] (block_size a power
    of two >= 16), as ``mla_cache_write`` fills it: float rows [normalised latent, k_pe] of
    width Dc + Dr in q's dtype, or FP8 rows (uint8, width Dc + 4 * Dc/128 + 2 * Dr: FlashMLA's
    DeepSeek-V3.2 layout, ds_kernels/mla_cache_format.py), which mean the row dequantised -
    codes times their tile's fp32 scale, k_pe from bf16 - and rounded to q's dtype; each K/V
    tile is dequantised as it is read (no dequantised copy of the cache). block_table int32
    [B, max_blocks]: token t of sequence b is kv_cache[block_table[b, t // block_size],
    t % block_size]. cache_seqlens int32 [B]: tokens of each sequence, in
    [0, max_blocks * block_size]; entries of block_table past a sequence's last page are never
    read. Each head scores the first cache_seqlens[b] rows, score = softmax_scale * (q_nope .
    row[:Dc] + q_pe . row[Dc:]); out = softmax(scores) @ row[:Dc]; lse = logsumexp(scores)
    (natural log). cache_seqlens[b] = 0 gives out 0 and lse -inf. Accumulates in fp32.
    A NaN or infinity in a head's query or in a row its sequence uses makes that head's out and
    lse NaN; other heads and sequences are unaffected. Index tensors may be any strided or
    expanded views.
    """
    args = (q_nope, q_pe, kv_cache, block_table, cache_seqlens, softmax_scale)
    if dispatch.direct_call_allowed(q_nope, q_pe, kv_cache, block_table, cache_seqlens):
        return _mla_decode(*args)  # checks the arguments itself
    _check(*args)  # before torch.ops, whose own type errors name no argument
    return torch.ops.ds_kernels.mla_decode(*args[:5], float(softmax_scale))


def _check(q_nope, q_pe, kv_cache, block_table, cache_seqlens, softmax_scale):
    check_tensor("q_nope", q_nope, dim=3, dtypes=FLOAT_DTYPES)
    check_tensor("q_pe", q_pe, dim=3, dtypes=FLOAT_DTYPES)
    check_tensor("kv_cache", kv_cache, dim=3, dtypes=FLOAT_DTYPES + (FP8_CACHE_DTYPE,))
    check_tensor("block_table", block_table, dim=2, dtypes=(torch.int32,))
    check_tensor("cache_seqlens", cache_seqlens, dim=1, dtypes=(torch.int32,))
    check_same_dtype("q_nope", q_nope, q_pe=q_pe)
    B, Hq, Dc = q_nope.shape
    if Hq < 1 or Dc < 1:
        raise ValueError(f"q_nope must be [B, Hq >= 1, Dc >= 1], got {tuple(q_nope.shape)}")
    if q_pe.shape[:2] != (B, Hq):
        raise ValueError(f"q_pe must be [B={B}, Hq={Hq}, Dr] like q_nope, got {tuple(q_pe.shape)}")
    Dr = q_pe.shape[2]
    block_size = kv_cache.shape[1]
    if is_fp8(kv_cache):
        check_fp8_cache(kv_cache, Dc, Dr)
    else:
        check_same_dtype("q_nope", q_nope, kv_cache=kv_cache)
        if kv_cache.shape[2] != Dc + Dr:
            raise ValueError(f"kv_cache must be [num_blocks, block_size, Dc + Dr = {Dc + Dr}], "
                             f"got {tuple(kv_cache.shape)}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"kv_cache's block_size must be a power of two >= 16, got {block_size}")
    if block_table.shape[0] != B:
        raise ValueError(f"block_table must be [B={B}, max_blocks], got {tuple(block_table.shape)}")
    if cache_seqlens.shape[0] != B:
        raise ValueError(f"cache_seqlens must be [B={B}], got {tuple(cache_seqlens.shape)}")
    check_finite_float("softmax_scale", softmax_scale)
    check_same_device("q_nope", q_nope, q_pe=q_pe, kv_cache=kv_cache, block_table=block_table,
                      cache_seqlens=cache_seqlens)


def _check_values(kv_cache, block_table, cache_seqlens):
    """Lengths within the table and the pages they use within the cache (one device sync)."""
    if cache_seqlens.numel() == 0 or not device_checks_allowed(cache_seqlens):
        return
    num_blocks, block_size = kv_cache.shape[:2]
    max_blocks = block_table.shape[1]
    pages = (cache_seqlens[:, None] + block_size - 1) // block_size
    used = torch.arange(max_blocks, device=block_table.device) < pages    # [B, max_blocks]
    bad = used & ((block_table < 0) | (block_table >= num_blocks))
    shortest, longest, num_bad = torch.stack(
        [cache_seqlens.min(), cache_seqlens.max(), bad.sum().to(torch.int32)]).tolist()
    capacity = max_blocks * block_size
    if shortest < 0 or longest > capacity:
        raise ValueError(f"cache_seqlens must be in [0, max_blocks * block_size = {capacity}], "
                         f"got values in [{shortest}, {longest}]")
    if num_bad:
        raise ValueError(f"block_table entries of the pages in use must be in [0, num_blocks="
                         f"{num_blocks}), got {block_table[bad].tolist()[:8]}")


def _mla_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q_nope, q_pe, kv_cache, block_table, cache_seqlens, softmax_scale)
    _check_values(kv_cache, block_table, cache_seqlens)
    return dispatch.implementation("mla_decode", q_nope.device)(
        q_nope, q_pe, kv_cache, block_table, cache_seqlens, float(softmax_scale))


_mla_decode_op = torch.library.custom_op("ds_kernels::mla_decode", _mla_decode, mutates_args=())


@_mla_decode_op.register_fake
def _(q_nope, q_pe, kv_cache, block_table, cache_seqlens, softmax_scale):
    _check(q_nope, q_pe, kv_cache, block_table, cache_seqlens, softmax_scale)
    B, Hq, _ = q_nope.shape
    # The backends return contiguous tensors, whatever the layout of q_nope (empty_like would
    # keep a transposed one: compiled graphs check the real strides against these).
    return q_nope.new_empty(q_nope.shape), q_nope.new_empty(B, Hq, dtype=torch.float32)
