"""ds_kernels.sparse_mla: absorbed latent attention of each query over the cache rows it names
(FlashMLA's sparse semantics: DeepSeek-V3.2's DSA, V4's compressed attention), one op for
prefill and decode, as ``torch.ops.ds_kernels.sparse_mla``. Inference only: no autograd
formula."""

import torch

from ds_kernels import dispatch
from ds_kernels.mla_cache_format import FP8_CACHE_DTYPE, is_fp8
from ds_kernels.ops.checks import (FLOAT_DTYPES, check_finite_float, check_int,
                                   check_same_device, check_same_dtype, check_tensor,
                                   device_checks_allowed)
from ds_kernels.ops.mla_cache_write import check_fp8_cache

_MAX_SLOTS = 1 << 31


def sparse_mla(q: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor,
               softmax_scale: float, *, v_dim: int,
               sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [T, Hq, v_dim] in q's dtype, lse float32 [T, Hq]) of each query's attention over
    the rows its slots name.

    q [T, Hq, Dk]: absorbed queries (Dk = Dc + Dr = 576 in V3.2: q_nope times W_UK, then q_pe;
    V4: 512). kv_cache [num_blocks, block_size, Dk] in q's dtype, or FP8 rows (uint8,
    mla_cache_write's layout with Dc = v_dim) read dequantised to q's dtype. slots int32
    [T, top_k]: row s is kv_cache[s // block_size, s % block_size] (lightning_indexer's
    output), -1 names none, a slot named twice counts twice. score = softmax_scale * (q . row);
    K = the whole row, V = its first v_dim columns; out = softmax(scores) @ V, lse =
    logsumexp(scores) (natural log). sinks fp32 [Hq]: head h's denominator also counts
    exp(sinks[h]), and lse includes it. No row named: out 0, lse -inf (with sinks: sinks[h]).
    A NaN or infinity in a head's query or a row it reads makes that head's out and lse NaN;
    other heads and queries are unaffected. Accumulates in fp32. Index tensors may be any
    strided or expanded views.
    """
    args = (q, kv_cache, slots, softmax_scale, v_dim, sinks)
    if dispatch.direct_call_allowed(q, kv_cache, slots, sinks):
        return _sparse_mla(*args)  # checks the arguments itself
    _check(*args)  # before torch.ops, whose own type errors name no argument
    return torch.ops.ds_kernels.sparse_mla(q, kv_cache, slots, float(softmax_scale), v_dim,
                                           sinks)


def _check(q, kv_cache, slots, softmax_scale, v_dim, sinks):
    check_tensor("q", q, dim=3, dtypes=FLOAT_DTYPES)
    check_tensor("kv_cache", kv_cache, dim=3, dtypes=FLOAT_DTYPES + (FP8_CACHE_DTYPE,))
    check_tensor("slots", slots, dim=2, dtypes=(torch.int32,))
    T, Hq, Dk = q.shape
    if Hq < 1 or Dk < 1:
        raise ValueError(f"q must be [T, Hq >= 1, Dk >= 1], got {tuple(q.shape)}")
    check_int("v_dim", v_dim, low=1, high=Dk)
    if is_fp8(kv_cache):
        if Dk - v_dim < 2:
            raise ValueError(f"an FP8 kv_cache (uint8) holds [latent | k_pe] rows: q's width "
                             f"Dk={Dk} must exceed v_dim={v_dim} by an even rope dim >= 2")
        check_fp8_cache(kv_cache, v_dim, Dk - v_dim)
    else:
        check_same_dtype("q", q, kv_cache=kv_cache)
        if kv_cache.shape[2] != Dk:
            raise ValueError(f"kv_cache must be [num_blocks, block_size, Dk={Dk}] (q's width), "
                             f"got {tuple(kv_cache.shape)}")
    num_blocks, block_size = kv_cache.shape[:2]
    if block_size < 1 or num_blocks * block_size >= _MAX_SLOTS:
        raise ValueError(f"kv_cache must hold 1 to 2^31 - 1 rows (int32 slots) in pages of "
                         f">= 1, got {tuple(kv_cache.shape)}")
    if slots.shape[0] != T or slots.shape[1] < 1:
        raise ValueError(f"slots must be [T={T}, top_k >= 1], got {tuple(slots.shape)}")
    if sinks is not None:
        check_tensor("sinks", sinks, dim=1, dtypes=(torch.float32,))
        if sinks.shape[0] != Hq:
            raise ValueError(f"sinks must be [Hq={Hq}], got {tuple(sinks.shape)}")
    check_finite_float("softmax_scale", softmax_scale)
    check_same_device("q", q, kv_cache=kv_cache, slots=slots, sinks=sinks)


def _check_values(kv_cache, slots):
    """Slots within [-1, num_blocks * block_size) (one device sync)."""
    if slots.numel() == 0 or not device_checks_allowed(slots):
        return
    rows = kv_cache.shape[0] * kv_cache.shape[1]
    low, high = torch.stack([slots.min(), slots.max()]).tolist()
    if low < -1 or high >= rows:
        raise ValueError(f"slots must be -1 (none) or in [0, num_blocks * block_size = {rows}), "
                         f"got values in [{low}, {high}]")


def _sparse_mla(q: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor,
                softmax_scale: float, v_dim: int,
                sinks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q, kv_cache, slots, softmax_scale, v_dim, sinks)
    _check_values(kv_cache, slots)
    return dispatch.implementation("sparse_mla", q.device)(
        q, kv_cache, slots, float(softmax_scale), v_dim, sinks)


_sparse_mla_op = torch.library.custom_op("ds_kernels::sparse_mla", _sparse_mla, mutates_args=())


@_sparse_mla_op.register_fake
def _(q, kv_cache, slots, softmax_scale, v_dim, sinks):
    _check(q, kv_cache, slots, softmax_scale, v_dim, sinks)
    T, Hq, _ = q.shape
    return q.new_empty(T, Hq, v_dim), q.new_empty(T, Hq, dtype=torch.float32)
