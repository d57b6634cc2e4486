"""ds_kernels.index_cache_write: DeepSeek-V3.2's index-key cache write (the lightning
indexer's keys, paged like the latent cache), LayerNorm and RoPE fused in, as
``torch.ops.ds_kernels.index_cache_write`` (mutates k_cache; not differentiable)."""

import torch

from ds_kernels import dispatch
from ds_kernels.mla_cache_format import FP8_CACHE_DTYPE, is_fp8
from ds_kernels.ops.checks import (FLOAT_DTYPES, GEMM_DTYPES, INDEX_DTYPES, check_same_device,
                                   check_same_dtype, check_tensor)
from ds_kernels.ops.mla_cache_write import check_fp8_cache, check_slots
from ds_kernels.ops.rms_norm import check_eps


def index_cache_write(k: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                      eps: float, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, *, interleaved: bool = False) -> None:
    """k_cache[slot // block_size, slot % block_size] = rope(layer_norm(k[t])) for each token t
    with slot = slot_mapping[t] != -1 (in place; -1 marks padding tokens, which are skipped).

    k [T, Di]: the indexer's keys wk(x) (fp16/bf16/fp32, any strides); norm_weight, norm_bias
    [Di]: its k_norm (a LayerNorm, eps 1e-6 in V3.2); cos, sin [T, Dr/2] at each token's
    position: the first Dr columns are rotated (interleaved=False: pairs (i, i + Dr/2), the
    indexer's RoPE in transformers' and DeepSeek's V3.2 code), the rest pass through.
    k_cache [num_blocks, block_size, Di] in k's dtype (any strides), paged by the latent
    cache's block table: the slots that lightning_indexer returns are this cache's and the
    latent cache's rows alike. Or FP8 rows: uint8 [num_blocks, block_size, Di + 4 * Di/128]
    (132 bytes for V3.2's Di = 128), the MLA FP8 cache's layout without a rope part
    (ds_kernels/mla_cache_format.py): e4m3 codes and a power-of-two fp32 scale per 128
    columns of the row as a float cache would hold it; Di % 128 == 0, rows contiguous and
    4-byte aligned. DeepSeek's own inference also rotates keys and queries by a Hadamard
    matrix before quantising them; this op quantises the keys as they are. slot_mapping [T] int64 (or int32) in [-1, num_blocks *
    block_size). Two tokens with the same slot: which one lands is undefined.
    """
    args = (k, norm_weight, norm_bias, eps, cos, sin, k_cache, slot_mapping, interleaved)
    if dispatch.direct_call_allowed(k, norm_weight, norm_bias, cos, sin, k_cache, slot_mapping):
        _index_cache_write(*args)  # checks the arguments itself
    else:
        _check(*args)  # before torch.ops, whose own type errors name no argument
        torch.ops.ds_kernels.index_cache_write(*args[:3], float(eps), *args[4:])


def _check(k, norm_weight, norm_bias, eps, cos, sin, k_cache, slot_mapping, interleaved):
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")
    check_tensor("k", k, dim=2, dtypes=FLOAT_DTYPES)
    check_tensor("norm_weight", norm_weight, dim=1, dtypes=GEMM_DTYPES)
    check_tensor("norm_bias", norm_bias, dim=1, dtypes=GEMM_DTYPES)
    check_tensor("cos", cos, dim=2, dtypes=GEMM_DTYPES)
    check_tensor("sin", sin, dim=2, dtypes=GEMM_DTYPES)
    check_tensor("k_cache", k_cache, dim=3, dtypes=FLOAT_DTYPES + (FP8_CACHE_DTYPE,))
    check_tensor("slot_mapping", slot_mapping, dim=1, dtypes=INDEX_DTYPES)
    check_eps(eps)
    T, D = k.shape
    if D < 2:
        raise ValueError(f"k must be [T, Di >= 2], got {tuple(k.shape)}")
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t.shape[0] != D:
            raise ValueError(f"{name} must be [Di={D}] (k's width), got {tuple(t.shape)}")
    half = cos.shape[1]
    for name, table in (("cos", cos), ("sin", sin)):
        if table.shape[0] != T or not 1 <= table.shape[1] <= D // 2 or table.shape[1] != half:
            raise ValueError(f"{name} must be [T={T}, Dr/2] with 2 <= Dr <= Di={D} (the rotated "
                             f"columns), one shape for cos and sin, got {tuple(table.shape)}")
    if is_fp8(k_cache):
        check_fp8_cache(k_cache, D, 0, name="k_cache")
    else:
        check_same_dtype("k", k, k_cache=k_cache)
    if not is_fp8(k_cache) and k_cache.shape[2] != D:
        raise ValueError(f"k_cache must be [num_blocks, block_size, Di={D}], got "
                         f"{tuple(k_cache.shape)}")
    if slot_mapping.shape[0] != T:
        raise ValueError(f"slot_mapping must have shape [T={T}], got {tuple(slot_mapping.shape)}")
    check_same_device("k", k, norm_weight=norm_weight, norm_bias=norm_bias, cos=cos, sin=sin,
                      k_cache=k_cache, slot_mapping=slot_mapping)


def _index_cache_write(k: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                       eps: float, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, interleaved: bool) -> None:
    _check(k, norm_weight, norm_bias, eps, cos, sin, k_cache, slot_mapping, interleaved)
    check_slots(slot_mapping, k_cache)
    dispatch.implementation("index_cache_write", k.device)(
        k, norm_weight, norm_bias, float(eps), cos, sin, k_cache, slot_mapping, interleaved)


_index_cache_write_op = torch.library.custom_op(
    "ds_kernels::index_cache_write", _index_cache_write, mutates_args=("k_cache",))


@_index_cache_write_op.register_fake
def _(k, norm_weight, norm_bias, eps, cos, sin, k_cache, slot_mapping, interleaved):
    _check(k, norm_weight, norm_bias, eps, cos, sin, k_cache, slot_mapping, interleaved)
