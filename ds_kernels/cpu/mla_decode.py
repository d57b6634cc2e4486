"""Absorbed-weight MLA decode on the torch path: every head reads the shared latent rows.

Sequences are sorted by length (longest first) and the context is cut into chunks of whole
pages. For each chunk, the sequences still running there are a prefix of the sorted batch:
their pages are gathered once into [n, C, Dc + Dr] (never expanded per head), scored by one
batched GEMM against all heads' [q_nope, q_pe], and folded into a running softmax (max, sum,
fp32 accumulator), as flash-decoding does. Short sequences drop out of later chunks, and
chunking bounds the gathered copy for long contexts. An FP8 cache's chunk is gathered as bytes
and dequantised to fp32 right there, so no dequantised copy of the whole cache ever exists.
"""

import bisect
import functools

import torch

from ds_kernels import tuning
from ds_kernels.mla_cache_format import (FP8_TILE, ROPE_DTYPE, SCALE_DTYPE, is_fp8, rope_offset,
                                         scales_offset)
from ds_kernels.quant_formats import FP8_DTYPE

# Gathered fp32 cache elements per chunk (4 MB): the copy stays in cache between the chunk's
# two GEMMs, and buffers this small are reused rather than page-faulted in anew each call
# (64 MB chunks ran 2-4x slower at B=4, Hq=16, 8K tokens, on one core). At least one page.
# `python -m autotune sweep --op mla_decode` tunes it per batch-size bucket.
CHUNK_ELEMENTS = 1 << 20


@functools.cache
def _e4m3_values(device: torch.device) -> torch.Tensor:
    """fp32 [256]: the value of each e4m3 code byte. Gathering from it (index_select) decodes
    ~6x faster than torch's float8_e4m3fn -> fp32 conversion, which is not vectorised on CPU."""
    return torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float().to(device)


def dequantize_rows(rows, Dc, Dr, dtype):
    """fp32 [..., Dc + Dr] of FP8 rows uint8 [..., width] (contiguous): codes times their
    tile's scale, k_pe from bf16, rounded through ``dtype`` (the query's) as the reference's
    dequantised cache is; exact for the power-of-two scales that mla_cache_write stores."""
    lead, tiles = rows.shape[:-1], Dc // FP8_TILE
    out = torch.empty(*lead, Dc + Dr, device=rows.device)                      # [..., Dc + Dr]
    codes = rows[..., :Dc].reshape(-1).int()
    latent = _e4m3_values(rows.device).index_select(0, codes).view(*lead, tiles, FP8_TILE)
    scales = rows[..., scales_offset(Dc):rope_offset(Dc)].contiguous().view(SCALE_DTYPE)
    # Straight into out's columns: no concatenated copy (~1/4 of this function's time).
    torch.mul(latent, scales[..., None], out=out[..., :Dc].unflatten(-1, (tiles, FP8_TILE)))
    out[..., Dc:] = rows[..., rope_offset(Dc):].view(ROPE_DTYPE)
    return out if dtype == torch.float32 else out.to(dtype).float()


def mla_decode(q_nope, q_pe, kv_cache, block_table, cache_seqlens, softmax_scale):
    B, Hq, Dc = q_nope.shape
    Dr = q_pe.shape[2]
    D = Dc + Dr
    block_size, width = kv_cache.shape[1], kv_cache.shape[2]
    fp8 = is_fp8(kv_cache)
    key = tuning.shape_key("mla_decode", "fp8_cache" if fp8 else None, Hq=Hq, Dc=Dc, Dr=Dr,
                           page=block_size)
    chunk_elements = tuning.config("mla_decode", "torch", key, B, q_nope.dtype, q_nope.device,
                                   dict(chunk_elements=CHUNK_ELEMENTS),
                                   kernel="fp8_cache" if fp8 else None)["chunk_elements"]
    lens, order = cache_seqlens.long().sort(descending=True)        # [B] longest first
    lengths = lens.tolist()
    m = torch.full((B, Hq), float("-inf"), device=q_nope.device)    # running max score
    l = torch.zeros(B, Hq, device=q_nope.device)                    # running sum of exp
    acc = torch.zeros(B, Hq, Dc, device=q_nope.device)              # running weighted V
    bad = torch.zeros(B, Hq, dtype=torch.bool, device=q_nope.device)  # a non-finite score seen
    q = torch.cat([q_nope, q_pe], dim=-1)[order].float() * softmax_scale   # [B, Hq, D]
    table = block_table[order]                                      # [B, max_blocks]
    chunk_pages = max(1, chunk_elements // (max(B, 1) * D * block_size))
    longest = lengths[0] if B else 0
    for first in range(0, -(-longest // block_size), chunk_pages):
        start = first * block_size
        n = bisect.bisect_left([-x for x in lengths], -start)       # sequences with len > start
        pages = table[:n, first:first + chunk_pages].long()         # [n, P]
        C = pages.shape[1] * block_size
        used = start + block_size * torch.arange(pages.shape[1]) < lens[:n, None]   # [n, P]
        # Past a sequence's end, table entries and cache rows may hold anything (garbage, NaN).
        pages = pages.masked_fill(~used.to(pages.device), 0)
        rows = kv_cache.index_select(0, pages.flatten()).view(n, C, width)   # [n, C, width]
        rows = dequantize_rows(rows, Dc, Dr, q_nope.dtype) if fp8 else rows.float()  # [n, C, D]
        # The sequences ending in this chunk (sorted, so the last ones): blank their rows past
        # the end, a few slices instead of a masked pass over the whole chunk.
        ending = range(bisect.bisect_left([-x for x in lengths[:n]], -(start + C)), n)
        for i in ending:
            rows[i, lengths[i] - start:] = 0
        scores = torch.bmm(q[:n], rows.transpose(1, 2))             # [n, Hq, C]
        # Blanked rows score 0 (or NaN, for a query that is bad anyway): the flag sees only
        # what the sequences really read.
        bad[:n] |= ~scores.isfinite().all(dim=-1)
        for i in ending:
            scores[i, :, lengths[i] - start:] = float("-inf")
        new_m = torch.maximum(m[:n], scores.amax(dim=-1))           # finite: each has a token
        p = torch.exp(scores - new_m[..., None])                    # [n, Hq, C]
        alpha = torch.exp(m[:n] - new_m)                            # [n, Hq], 0 on the first
        l[:n] = l[:n] * alpha + p.sum(dim=-1)
        acc[:n] = acc[:n] * alpha[..., None] + torch.bmm(p, rows[..., :Dc])
        m[:n] = new_m
    # l >= 1 wherever a token was seen (its maximum counts 1); empty sequences keep acc = 0,
    # l = 0 and m = -inf, so they come out 0 with lse -inf. Heads that saw a non-finite score
    # are NaN (reference/mla_decode.py's policy).
    out = torch.empty_like(acc)
    out[order] = (acc / l.clamp_min(1)[..., None]).masked_fill(bad[..., None], float("nan"))
    lse = torch.empty_like(l)
    lse[order] = (m + torch.log(l)).masked_fill(bad, float("nan"))
    return out.to(q_nope.dtype), lse
