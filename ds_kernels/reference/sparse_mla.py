"""Reference sparse latent attention (FlashMLA's sparse semantics, DeepSeek-V3.2 / V4): each
query attends over the cache rows its slots name, one query at a time.

Slot s is row kv_cache[s // block_size, s % block_size]; -1 names no row, and a slot listed
twice counts twice. K = the whole row (Dk wide), V = its first v_dim columns. An FP8 cache
(uint8) is read as its rows dequantised to q's dtype (ds_kernels/reference/fp8_mla_cache.py).
Math in fp64; out in q's dtype, lse (natural log) in fp32. With ``sinks`` (fp32 [Hq]), head h's
softmax denominator also counts exp(sinks[h]) (a row that no value comes from), and lse
includes it. No row at all: out 0, lse -inf (with sinks: lse = sinks[h]).

Non-finite input: as mla_decode's - a NaN or infinity in a head's query or in a row it reads
makes that head's out and lse NaN. Rows no slot names are never read.
"""

import torch

from ds_kernels.mla_cache_format import is_fp8
from ds_kernels.reference.fp8_mla_cache import dequantize


def sparse_mla(q, kv_cache, slots, softmax_scale, v_dim, sinks=None):
    T, Hq, Dk = q.shape
    block_size = kv_cache.shape[1]
    out = torch.zeros(T, Hq, v_dim, dtype=torch.float64, device=q.device)
    lse = torch.full((T, Hq), float("-inf"), dtype=torch.float64, device=q.device)
    for t in range(T):
        named = slots[t][slots[t] >= 0].long()                    # [n]
        if named.numel():
            rows = kv_cache[named // block_size, named % block_size]  # [n, width]
            if is_fp8(kv_cache):
                rows = dequantize(rows, v_dim, q.dtype)            # [n, Dk]
            rows = rows.double()
            scores = softmax_scale * (q[t].double() @ rows.T)     # [Hq, n]
            bad = ~scores.isfinite().all(dim=-1)                  # [Hq]
            lse[t] = torch.logsumexp(scores, dim=-1).masked_fill(bad, float("nan"))
            out[t] = (scores.softmax(dim=-1) @ rows[:, :v_dim]).masked_fill(bad[:, None],
                                                                           float("nan"))
        if sinks is not None:  # the sink joins the denominator: rescale, then add it to lse
            with_sink = torch.logaddexp(lse[t], sinks.double())
            out[t] *= torch.exp(lse[t] - with_sink).nan_to_num(0.0)[:, None]
            lse[t] = torch.where(lse[t].isnan(), lse[t], with_sink)
    return out.to(q.dtype), lse.float()
