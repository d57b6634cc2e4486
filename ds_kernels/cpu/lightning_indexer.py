"""Lightning indexer on the torch path: each sequence's queries against its keys, a chunk of
queries and a chunk of key positions at a time.

A chunk's scores [Q, H, C] are one GEMM of the queries' heads against the gathered key rows
(relu'd in place), then a batched head sum with the weights; they never grow past
``chunk_elements`` values, so memory stays bounded at any context length (128K and more).
Each chunk folds into a running top-k [Q, top_k] by torch.topk over packed int64 keys: the
score's order-preserving bits high, the complement of the position low. Packed keys are
unique, so ties go to the lower position and topk's order among equals never matters. FP8
keys are dequantised a chunk at a time.
"""

import torch

from ds_kernels import tuning
from ds_kernels.cpu.mla_decode import dequantize_rows
from ds_kernels.mla_cache_format import is_fp8

# Scores of one chunk ([Q, H, C] fp32 values, plus the chunk's gathered keys): 16 MB.
CHUNK_ELEMENTS = 1 << 22
# Queries of a sequence scored together (prefill): enough rows for a GEMM that runs at speed.
QUERY_ROWS = 256
_LOW = (1 << 32) - 1
NONE = -(1 << 63)  # the packed key of no key: below every packed score


def pack(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """int64 keys that order as (score descending, position ascending): fp32 scores [..., C]
    (NaN ranking as -inf, -0 as +0) at int64 positions [C] (< 2^32)."""
    s = torch.where(scores.isnan(), float("-inf"), scores)
    s = torch.where(s == 0, 0.0, s)
    bits = s.view(torch.int32).long()
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)      # monotonic in the score
    return ordered * (1 << 32) + (_LOW - positions)


def positions_of(packed: torch.Tensor) -> torch.Tensor:
    return _LOW - (packed & _LOW)


def lightning_indexer(q, weights, k_cache, block_table, query_seq, query_pos, top_k):
    T, H, D = q.shape
    block_size = k_cache.shape[1]
    key = tuning.shape_key("lightning_indexer", H=H, D=D, page=block_size)
    chunk = tuning.config("lightning_indexer", "torch", key, T, q.dtype, q.device,
                          dict(chunk_elements=CHUNK_ELEMENTS))["chunk_elements"]
    best = torch.full((T, top_k), NONE, dtype=torch.long, device=q.device)   # [T, top_k]
    seqs, last = query_seq.long(), query_pos.long()
    for b in torch.unique(seqs).tolist():
        rows = (seqs == b).nonzero().squeeze(1)                   # [Tb] queries of b
        for first in range(0, rows.numel(), QUERY_ROWS):
            idx = rows[first:first + QUERY_ROWS]                  # [Q]
            best[idx] = _top_keys(q[idx], weights[idx], last[idx], k_cache, block_table[b],
                                  best[idx], chunk)
    pos = positions_of(best)                                      # [T, top_k]
    found = best != NONE
    pos = torch.where(found, pos, 0)
    pages = block_table[seqs[:, None], pos // block_size].long()
    slots = torch.where(found, pages * block_size + pos % block_size, -1)
    return slots.to(torch.int32)


def _top_keys(q, weights, last, k_cache, table, best, chunk):
    """best [Q, top_k] merged with every key of one sequence (page table ``table``) that each
    query sees (positions 0..last[i])."""
    Q, H, D = q.shape
    block_size = k_cache.shape[1]
    top_k = best.shape[1]
    qs = q.float().reshape(Q * H, D)                              # [Q * H, D]
    w = weights.float().unsqueeze(1)                              # [Q, 1, H]
    C = max(1, chunk // (Q * H + D))                              # key positions a chunk
    seen = int(last.max()) + 1                                    # one sync, not one a chunk
    for start in range(0, seen, C):
        positions = torch.arange(start, min(start + C, seen), device=q.device)  # [C]
        keys = k_cache[table[positions // block_size].long(), positions % block_size]  # [C, D]
        if is_fp8(k_cache):                                       # [C, width] bytes
            keys = dequantize_rows(keys, D, 0, torch.float32)
        scores = (qs @ keys.float().T).view(Q, H, -1).relu_()     # [Q, H, C]
        scores = torch.bmm(w, scores).squeeze(1)                  # [Q, C]
        packed = pack(scores, positions).masked_fill(positions[None, :] > last[:, None], NONE)
        best = torch.cat([best, packed], dim=1).topk(top_k, dim=1).values
    return best
