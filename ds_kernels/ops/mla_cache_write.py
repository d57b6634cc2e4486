"""ds_kernels.mla_cache_write and mla_cache_write_fused: writes of tokens' [latent | k_pe] rows
into a paged MLA cache (float rows, or FP8 rows: ds_kernels/mla_cache_format.py), as
``torch.ops.ds_kernels.mla_cache_write`` and
``torch.ops.ds_kernels.mla_cache_write_fused`` (both mutate kv_cache; neither is
differentiable - training uses rms_norm and apply_rope, which are)."""

import torch

from ds_kernels import dispatch
from ds_kernels.mla_cache_format import (FP8_CACHE_DTYPE, FP8_TILE, SCALE_DTYPE, fp8_row_bytes,
                                         is_fp8)
from ds_kernels.ops.apply_rope import check_rope
from ds_kernels.ops.checks import (FLOAT_DTYPES, INDEX_DTYPES, check_same_device,
                                   check_same_dtype, check_tensor, device_checks_allowed)
from ds_kernels.ops.rms_norm import check_norm


def mla_cache_write(latent: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """kv_cache[slot // block_size, slot % block_size] = [latent[t] | k_pe[t]] for each token t
    with slot = slot_mapping[t] != -1 (in place; -1 marks padding tokens, which are skipped).

    latent [T, Dc], k_pe [T, Dr] (Dr even), of one dtype (fp16/bf16/fp32; any strides).
    kv_cache, either
      - float rows [num_blocks, block_size, Dc + Dr] in latent's dtype (any strides), or
      - FP8 rows: uint8 [num_blocks, block_size, Dc + 4 * Dc/128 + 2 * Dr] (656 bytes for
        DeepSeek-V3), FlashMLA's DeepSeek-V3.2 layout (ds_kernels/mla_cache_format.py): each
        token's latent quantised to e4m3 with one power-of-two fp32 scale per 128 columns,
        k_pe rounded to bf16. Needs Dc % 128 == 0; each row's bytes contiguous and 4-byte
        aligned (strides of dims 0 and 1 multiples of 4), as the fp32 scales are accessed in
        place. A non-finite latent value becomes a NaN code (the row then poisons the heads
        that read it, as in a float cache).
    slot_mapping [T] int64 (or int32) in [-1, num_blocks * block_size). Two tokens with the
    same slot: which one lands is undefined.
    """
    if dispatch.direct_call_allowed(latent, k_pe, kv_cache, slot_mapping):
        _mla_cache_write(latent, k_pe, kv_cache, slot_mapping)  # checks the arguments itself
    else:
        # Before torch.ops, whose own type errors name no argument.
        _check(latent, k_pe, kv_cache, slot_mapping)
        torch.ops.ds_kernels.mla_cache_write(latent, k_pe, kv_cache, slot_mapping)


def mla_cache_write_fused(kv_latent: torch.Tensor, k_pe: torch.Tensor,
                          norm_weight: torch.Tensor, eps: float, cos: torch.Tensor,
                          sin: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                          *, interleaved: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent [T, Dc], k_pe_rotated [T, Dr]) = (rms_norm(kv_latent, norm_weight, eps),
    apply_rope(k_pe, cos, sin, interleaved=interleaved)), also written into the cache as
    ``mla_cache_write`` does - in one pass on GPU (torch_npu's npu_kv_rmsnorm_rope_cache).

    kv_latent: the un-normalised latent (kv_a_proj's first Dc columns; any strides); k_pe: its
    un-rotated rope part; norm_weight [Dc] (kv_a_layernorm's weight); cos, sin [T, Dr/2] at each
    token's position. The returned tensors are what the prefill path attends with; they and
    a float cache's rows hold the same values (an FP8 cache: those values quantised). Shapes and
    dtypes otherwise as ``mla_cache_write``.
    """
    args = (kv_latent, k_pe, norm_weight, eps, cos, sin, kv_cache, slot_mapping, interleaved)
    if dispatch.direct_call_allowed(kv_latent, k_pe, norm_weight, cos, sin, kv_cache,
                                    slot_mapping):
        return _mla_cache_write_fused(*args)  # checks the arguments itself
    _check_fused(*args)  # before torch.ops, whose own type errors name no argument
    return torch.ops.ds_kernels.mla_cache_write_fused(*args[:3], float(eps), *args[4:])


def _check(latent, k_pe, kv_cache, slot_mapping, latent_name="latent"):
    check_tensor(latent_name, latent, dim=2, dtypes=FLOAT_DTYPES)
    check_tensor("k_pe", k_pe, dim=2, dtypes=FLOAT_DTYPES)
    check_tensor("kv_cache", kv_cache, dim=3, dtypes=FLOAT_DTYPES + (FP8_CACHE_DTYPE,))
    check_tensor("slot_mapping", slot_mapping, dim=1, dtypes=INDEX_DTYPES)
    check_same_dtype(latent_name, latent, k_pe=k_pe)
    T, Dc = latent.shape
    Dr = k_pe.shape[1]
    if k_pe.shape[0] != T or Dr < 2 or Dr % 2:
        raise ValueError(f"k_pe must be [T={T}, Dr] with Dr even (the rope dim), got "
                         f"{tuple(k_pe.shape)}")
    if is_fp8(kv_cache):
        check_fp8_cache(kv_cache, Dc, Dr)
    else:
        check_same_dtype(latent_name, latent, kv_cache=kv_cache)
        if Dc < 1 or kv_cache.shape[2] != Dc + Dr:
            raise ValueError(f"kv_cache must be [num_blocks, block_size, Dc + Dr = {Dc + Dr}] "
                             f"(Dc={Dc}, Dr={Dr}), got {tuple(kv_cache.shape)}")
    if slot_mapping.shape[0] != T:
        raise ValueError(f"slot_mapping must have shape [T={T}], got {tuple(slot_mapping.shape)}")
    check_same_device(latent_name, latent, k_pe=k_pe, kv_cache=kv_cache,
                      slot_mapping=slot_mapping)


def check_fp8_cache(kv_cache, Dc, Dr, name="kv_cache"):
    """An FP8 (uint8) cache ``name`` fits latents of Dc and a rope part of Dr (0: the index-key
    cache's rows): the width of its layout, and rows whose bytes are contiguous and whose fp32
    scales are aligned."""
    if Dc < FP8_TILE or Dc % FP8_TILE:
        what = "Di" if Dr == 0 else "Dc"
        raise ValueError(f"an FP8 {name} (uint8) needs {what} to be a multiple of {FP8_TILE} "
                         f"(one fp32 scale per {FP8_TILE} columns), got {what}={Dc}")
    if Dr < 0 or Dr % 2:
        raise ValueError(f"an FP8 {name} (uint8) needs an even rope dim Dr, got Dr={Dr}")
    width = fp8_row_bytes(Dc, Dr)
    if kv_cache.shape[2] != width and Dr == 0:
        raise ValueError(f"an FP8 {name} (uint8) must be [num_blocks, block_size, Di + "
                         f"4 * Di/128 = {width}] bytes (Di={Dc} e4m3 codes, {Dc // FP8_TILE} "
                         f"fp32 scales), got {tuple(kv_cache.shape)}")
    if kv_cache.shape[2] != width:
        raise ValueError(f"an FP8 {name} (uint8) must be [num_blocks, block_size, Dc + "
                         f"4 * Dc/128 + 2 * Dr = {width}] bytes (Dc={Dc} e4m3 codes, "
                         f"{Dc // FP8_TILE} fp32 scales, Dr={Dr} bf16 values), got "
                         f"{tuple(kv_cache.shape)}")
    align = SCALE_DTYPE.itemsize
    # torch.compile cannot trace storage_offset(); the op's own check (on the real or fake
    # tensor) still sees it.
    offset = 0 if torch.compiler.is_compiling() else kv_cache.storage_offset()
    if kv_cache.stride(2) != 1 or any(
            x % align for x in (kv_cache.stride(0), kv_cache.stride(1), offset)):
        raise ValueError(f"an FP8 {name}'s rows must be contiguous bytes and {align}-byte "
                         f"aligned (stride(2) == 1; strides of dims 0 and 1 and the storage "
                         f"offset multiples of {align}), got strides {kv_cache.stride()} and "
                         f"offset {offset}")


def _check_fused(kv_latent, k_pe, norm_weight, eps, cos, sin, kv_cache, slot_mapping,
                 interleaved):
    _check(kv_latent, k_pe, kv_cache, slot_mapping, latent_name="kv_latent")
    check_norm("kv_latent", kv_latent, "norm_weight", norm_weight, eps)
    check_rope("k_pe", k_pe, cos, sin, interleaved)


def check_slots(slot_mapping, kv_cache):
    """Slots in [-1, num_slots); a device sync, skipped under CUDA graph capture (where the
    kernels still mask bad slots: they never write)."""
    num_slots = kv_cache.shape[0] * kv_cache.shape[1]
    if slot_mapping.numel() and device_checks_allowed(slot_mapping):
        low, high = int(slot_mapping.min()), int(slot_mapping.max())
        if low < -1 or high >= num_slots:
            raise ValueError(f"slot_mapping must be in [-1, {num_slots}) (-1: skip the token; "
                             f"num_blocks * block_size = {num_slots}), got values in "
                             f"[{low}, {high}]")


def _mla_cache_write(latent: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> None:
    _check(latent, k_pe, kv_cache, slot_mapping)
    check_slots(slot_mapping, kv_cache)
    dispatch.implementation("mla_cache_write", latent.device)(latent, k_pe, kv_cache,
                                                              slot_mapping)


_mla_cache_write_op = torch.library.custom_op("ds_kernels::mla_cache_write", _mla_cache_write,
                                              mutates_args=("kv_cache",))


@_mla_cache_write_op.register_fake
def _(latent, k_pe, kv_cache, slot_mapping):
    _check(latent, k_pe, kv_cache, slot_mapping)


def _mla_cache_write_fused(kv_latent: torch.Tensor, k_pe: torch.Tensor,
                           norm_weight: torch.Tensor, eps: float, cos: torch.Tensor,
                           sin: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                           interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check_fused(kv_latent, k_pe, norm_weight, eps, cos, sin, kv_cache, slot_mapping, interleaved)
    check_slots(slot_mapping, kv_cache)
    return dispatch.implementation("mla_cache_write_fused", kv_latent.device)(
        kv_latent, k_pe, norm_weight, float(eps), cos, sin, kv_cache, slot_mapping, interleaved)


_mla_cache_write_fused_op = torch.library.custom_op(
    "ds_kernels::mla_cache_write_fused", _mla_cache_write_fused, mutates_args=("kv_cache",))


@_mla_cache_write_fused_op.register_fake
def _(kv_latent, k_pe, norm_weight, eps, cos, sin, kv_cache, slot_mapping, interleaved):
    _check_fused(kv_latent, k_pe, norm_weight, eps, cos, sin, kv_cache, slot_mapping, interleaved)
    return kv_latent.new_empty(kv_latent.shape), k_pe.new_empty(k_pe.shape)
