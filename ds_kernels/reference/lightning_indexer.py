"""Reference lightning indexer (DeepSeek-V3.2's DSA key selection): one query at a time.

Query t belongs to sequence query_seq[t] and sees that sequence's keys at positions
0..query_pos[t]; the key at position p is k_cache[block_table[b, p // block_size],
p % block_size], its slot page * block_size + p % block_size. Each key's score is
sum_h weights[t, h] * relu(q[t, h] . k), in fp64 (the answer the fast paths approach). The
top_k keys by score, descending, ties to the lower position, give the slots; -1 pads when
fewer than top_k keys are visible.

Non-finite input: relu keeps NaN, so a NaN anywhere in a key's dot products or the weights makes
its score NaN, which ranks as -inf: below every number, still above the padding. Keys past
query_pos[t] (and other sequences' keys) are never read, so nothing they hold can reach t.
An FP8 cache's keys (uint8 rows, ds_kernels/mla_cache_format.py with no rope part) are their
codes times their scales.
"""

import torch

from ds_kernels.mla_cache_format import is_fp8
from ds_kernels.reference.fp8_mla_cache import dequantize


def lightning_indexer(q, weights, k_cache, block_table, query_seq, query_pos, top_k):
    T, H, D = q.shape
    block_size = k_cache.shape[1]
    slots = torch.full((T, top_k), -1, dtype=torch.int32)
    for t in range(T):
        b, seen = int(query_seq[t]), int(query_pos[t]) + 1
        positions = torch.arange(seen, device=k_cache.device)    # [n]
        pages = block_table[b, positions // block_size].long()
        keys = k_cache[pages, positions % block_size]             # [n, D] (FP8: bytes)
        keys = (dequantize(keys, D) if is_fp8(k_cache) else keys).double()
        dots = q[t].double() @ keys.T                             # [H, n]
        scores = (weights[t].double()[:, None] * dots.clamp_min(0)).sum(0)  # [n]
        scores = scores.nan_to_num(nan=float("-inf"), posinf=float("inf"),
                                   neginf=float("-inf"))
        # Stable: among equal scores the lower position stays first.
        order = torch.sort(scores, descending=True, stable=True).indices[:top_k]
        slots[t, :order.numel()] = (pages[order] * block_size + order % block_size).int().cpu()
    return slots.to(q.device)
