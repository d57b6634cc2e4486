"""Sparse latent attention on the torch path: a chunk of queries at a time, each query's named
rows gathered ([Q, top_k, Dk], never per head), scored by one batched GEMM against all heads,
softmax over them (the sinks as one more score whose value row is 0). Chunks bound the gathered
copy; an FP8 cache's rows are gathered as bytes and dequantised there (cpu/mla_decode.py)."""

import torch

from ds_kernels import tuning
from ds_kernels.cpu.mla_decode import dequantize_rows
from ds_kernels.mla_cache_format import is_fp8

# Gathered fp32 row elements per chunk (16 MB), at least one query.
CHUNK_ELEMENTS = 1 << 22


def sparse_mla(q, kv_cache, slots, softmax_scale, v_dim, sinks):
    T, Hq, Dk = q.shape
    block_size = kv_cache.shape[1]
    top_k = slots.shape[1]
    fp8 = is_fp8(kv_cache)
    key = tuning.shape_key("sparse_mla", "fp8_cache" if fp8 else None, Hq=Hq, Dc=v_dim,
                           Dr=Dk - v_dim, page=block_size)
    chunk = tuning.config("sparse_mla", "torch", key, T, q.dtype, q.device,
                          dict(chunk_elements=CHUNK_ELEMENTS),
                          kernel="fp8_cache" if fp8 else None)["chunk_elements"]
    out = q.new_empty(T, Hq, v_dim)
    lse = torch.empty(T, Hq, device=q.device)
    step = max(1, chunk // max(1, top_k * (Dk + Hq)))
    for first in range(0, T, step):
        rows_of = slots[first:first + step].long()                # [Q, K]
        named = rows_of >= 0
        safe = rows_of.clamp_min(0)
        if kv_cache.is_contiguous():  # index_select: ~20% faster than the 2-index gather
            rows = kv_cache.view(-1, kv_cache.shape[2]).index_select(0, safe.flatten())
            rows = rows.view(*safe.shape, -1)                     # [Q, K, width]
        else:
            rows = kv_cache[safe // block_size, safe % block_size]
        rows = dequantize_rows(rows, v_dim, Dk - v_dim, q.dtype) if fp8 else rows.float()
        if not named.all():
            rows = rows.masked_fill(~named[..., None], 0.0)       # unnamed: never counted
        scores = torch.bmm(q[first:first + step].float() * softmax_scale,
                           rows.transpose(1, 2))                  # [Q, Hq, K]
        bad = ~scores.isfinite().all(dim=-1)                      # [Q, Hq]
        scores = scores.masked_fill(~named[:, None, :], float("-inf"))
        top = scores.amax(dim=-1)                                 # [Q, Hq]
        if sinks is not None:
            top = torch.maximum(top, sinks.float())
        top = torch.where(top.isfinite(), top, 0.0)               # no score: anything finite
        p = torch.exp(scores - top[..., None])                    # [Q, Hq, K]
        total = p.sum(dim=-1)
        if sinks is not None:
            total = total + torch.exp(sinks.float() - top)
        o = torch.bmm(p, rows[..., :v_dim]) / total.clamp_min(1e-30)[..., None]
        out[first:first + step] = o.masked_fill(bad[..., None], float("nan"))
        lse[first:first + step] = (top + torch.log(total)).masked_fill(bad, float("nan"))
    return out, lse
