"""ds_kernels.lightning_indexer: DeepSeek-V3.2's DSA key selection - for each query, the top_k
cached keys by the indexer's score - as ``torch.ops.ds_kernels.lightning_indexer``. Inference
only: the selection is not differentiable."""

import torch

from ds_kernels import dispatch
from ds_kernels.mla_cache_format import FP8_CACHE_DTYPE, is_fp8
from ds_kernels.ops.checks import (FLOAT_DTYPES, check_int, check_same_device, check_same_dtype,
                                   check_tensor, device_checks_allowed)
from ds_kernels.ops.mla_cache_write import check_fp8_cache

# Slots are int32: the cache's rows must be numbered below 2^31.
_MAX_SLOTS = 1 << 31


def lightning_indexer(q: torch.Tensor, weights: torch.Tensor, k_cache: torch.Tensor,
                      block_table: torch.Tensor, query_seq: torch.Tensor,
                      query_pos: torch.Tensor, top_k: int) -> torch.Tensor:
    """slots int32 [T, top_k]: for each query, the cache slots of its top_k keys by score.

    q [T, Hi, Di]: the indexer's queries (RoPE applied); weights [T, Hi]: each head's weight,
    the softmax scale and 1/sqrt(Hi) folded in by the caller; k_cache [num_blocks, block_size,
    Di] in q's dtype: the index keys, paged by the latent cache's block_table int32
    [B, max_blocks]. Query t belongs to sequence query_seq[t] (int32 [T], in [0, B)) and sees
    its keys at positions 0..query_pos[t] (int32 [T], in [0, max_blocks * block_size)); the
    key at position p is k_cache[block_table[b, p // block_size], p % block_size], its slot
    page * block_size + p % block_size. score = sum_h weights[t, h] * relu(q[t, h] . k),
    accumulated in fp32. The slots come by score, descending, ties to the lower position, -1
    padding when fewer than top_k keys are visible. A NaN score ranks as -inf (below every
    number, above the padding); keys a query does not see are never read, so nothing in them
    (NaN included) reaches it. Index tensors may be any strided or expanded views.

    k_cache may also hold FP8 rows, uint8 [num_blocks, block_size, Di + 4 * Di/128] as
    index_cache_write writes them (Di % 128 == 0): keys are their codes times their scales,
    scored against q as it is (DeepSeek's inference also quantises q; we do not).
    """
    args = (q, weights, k_cache, block_table, query_seq, query_pos, top_k)
    if dispatch.direct_call_allowed(q, weights, k_cache, block_table, query_seq, query_pos):
        return _lightning_indexer(*args)  # checks the arguments itself
    _check(*args)  # before torch.ops, whose own type errors name no argument
    return torch.ops.ds_kernels.lightning_indexer(*args)


def _check(q, weights, k_cache, block_table, query_seq, query_pos, top_k):
    check_tensor("q", q, dim=3, dtypes=FLOAT_DTYPES)
    check_tensor("weights", weights, dim=2, dtypes=FLOAT_DTYPES)
    check_tensor("k_cache", k_cache, dim=3, dtypes=FLOAT_DTYPES + (FP8_CACHE_DTYPE,))
    check_tensor("block_table", block_table, dim=2, dtypes=(torch.int32,))
    check_tensor("query_seq", query_seq, dim=1, dtypes=(torch.int32,))
    check_tensor("query_pos", query_pos, dim=1, dtypes=(torch.int32,))
    check_int("top_k", top_k, low=1)
    T, H, D = q.shape
    if H < 1 or D < 1:
        raise ValueError(f"q must be [T, Hi >= 1, Di >= 1], got {tuple(q.shape)}")
    if weights.shape != (T, H):
        raise ValueError(f"weights must be [T={T}, Hi={H}] like q, got {tuple(weights.shape)}")
    num_blocks, block_size, width = k_cache.shape
    if is_fp8(k_cache):
        check_fp8_cache(k_cache, D, 0, name="k_cache")
    else:
        check_same_dtype("q", q, k_cache=k_cache)
    if not is_fp8(k_cache) and width != D:
        raise ValueError(f"k_cache must be [num_blocks, block_size, Di={D}] (q's index head "
                         f"dim), got {tuple(k_cache.shape)}")
    if block_size < 1 or num_blocks * block_size >= _MAX_SLOTS:
        raise ValueError(f"k_cache must hold 1 to 2^31 - 1 rows (int32 slots) in pages of "
                         f">= 1, got {tuple(k_cache.shape)}")
    for name, t in (("query_seq", query_seq), ("query_pos", query_pos)):
        if t.shape[0] != T:
            raise ValueError(f"{name} must be [T={T}] like q, got {tuple(t.shape)}")
    check_same_device("q", q, weights=weights, k_cache=k_cache, block_table=block_table,
                      query_seq=query_seq, query_pos=query_pos)


def _check_values(k_cache, block_table, query_seq, query_pos):
    """Queries' sequences and positions within the table, and the pages they see within the
    cache (one device sync)."""
    if query_seq.numel() == 0 or not device_checks_allowed(query_seq):
        return
    num_blocks, block_size = k_cache.shape[:2]
    B, max_blocks = block_table.shape
    low_seq, high_seq, low_pos, high_pos = torch.stack(
        [query_seq.min(), query_seq.max(), query_pos.min(), query_pos.max()]).tolist()
    if low_seq < 0 or high_seq >= B:
        raise ValueError(f"query_seq must be in [0, B={B}) (block_table's rows), got values in "
                         f"[{low_seq}, {high_seq}]")
    capacity = max_blocks * block_size
    if low_pos < 0 or high_pos >= capacity:
        raise ValueError(f"query_pos must be in [0, max_blocks * block_size = {capacity}), got "
                         f"values in [{low_pos}, {high_pos}]")
    pages = torch.zeros(B, dtype=torch.long, device=query_pos.device)
    pages = pages.scatter_reduce(0, query_seq.long(), query_pos.long() // block_size + 1, "amax")
    used = torch.arange(max_blocks, device=block_table.device) < pages[:, None]  # [B, max_blocks]
    bad = used & ((block_table < 0) | (block_table >= num_blocks))
    if bad.any():
        raise ValueError(f"block_table entries of the pages the queries see must be in [0, "
                         f"num_blocks={num_blocks}), got {block_table[bad].tolist()[:8]}")


def _lightning_indexer(q: torch.Tensor, weights: torch.Tensor, k_cache: torch.Tensor,
                       block_table: torch.Tensor, query_seq: torch.Tensor,
                       query_pos: torch.Tensor, top_k: int) -> torch.Tensor:
    _check(q, weights, k_cache, block_table, query_seq, query_pos, top_k)
    _check_values(k_cache, block_table, query_seq, query_pos)
    return dispatch.implementation("lightning_indexer", q.device)(
        q, weights, k_cache, block_table, query_seq, query_pos, top_k)


_lightning_indexer_op = torch.library.custom_op("ds_kernels::lightning_indexer",
                                                _lightning_indexer, mutates_args=())


@_lightning_indexer_op.register_fake
def _(q, weights, k_cache, block_table, query_seq, query_pos, top_k):
    _check(q, weights, k_cache, block_table, query_seq, query_pos, top_k)
    return q.new_empty(q.shape[0], top_k, dtype=torch.int32)
