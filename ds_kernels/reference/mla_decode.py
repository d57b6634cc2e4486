"""Reference absorbed-weight MLA decode (FlashMLA semantics): one sequence at a time.

Token t of sequence b is row kv_cache[block_table[b, t // block_size], t % block_size]; the
whole Dc + Dr row is the key, its first Dc columns the value. An FP8 cache (uint8) is read as
its rows dequantised to q's dtype (ds_kernels/reference/fp8_mla_cache.py): this is the same
function of the dequantised cache. Math in fp64 (the exact answer the kernels approach); out in
q's dtype, lse (natural log) in fp32.

Non-finite input: if a head's query or any row its sequence uses holds a NaN or an infinity,
some score of that head is not finite, and then its out row and lse are NaN (every backend
alike, whatever the IEEE softmax would make of an infinity). Rows past a sequence's end are
never read, so whatever they hold cannot reach any output.
"""

import torch

from ds_kernels.mla_cache_format import is_fp8
from ds_kernels.reference.fp8_mla_cache import dequantize


def mla_decode(q_nope, q_pe, kv_cache, block_table, cache_seqlens, softmax_scale):
    B, Hq, Dc = q_nope.shape
    block_size = kv_cache.shape[1]
    out = torch.zeros(B, Hq, Dc, dtype=torch.float64, device=q_nope.device)
    lse = torch.full((B, Hq), float("-inf"), dtype=torch.float64, device=q_nope.device)
    for b in range(B):
        t = torch.arange(int(cache_seqlens[b]), device=kv_cache.device)   # [n] tokens
        if t.numel() == 0:
            continue  # nothing to attend to: out 0, lse -inf
        pages = block_table[b, t // block_size].long()
        rows = kv_cache[pages, t % block_size]                          # [n, width]
        if is_fp8(kv_cache):
            rows = dequantize(rows, Dc, q_nope.dtype)                   # [n, Dc + Dr]
        rows = rows.double()
        q = torch.cat([q_nope[b], q_pe[b]], dim=-1).double()            # [Hq, Dc + Dr]
        scores = softmax_scale * (q @ rows.t())                         # [Hq, n]
        bad = ~scores.isfinite().all(dim=-1)                            # [Hq]
        lse[b] = torch.logsumexp(scores, dim=-1).masked_fill(bad, float("nan"))
        out[b] = (scores.softmax(dim=-1) @ rows[:, :Dc]).masked_fill(bad[:, None], float("nan"))
    return out.to(q_nope.dtype), lse.float()
