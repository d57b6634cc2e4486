"""The two row formats of the paged MLA latent cache [num_blocks, block_size, width] that
mla_cache_write / mla_cache_write_fused fill and mla_decode reads; the cache's dtype says which.

  float rows  fp16 / bf16 / fp32, width Dc + Dr: [latent | k_pe] in the model's dtype
              (DeepSeek-V3: 576 values, 1,152 bytes a token in bf16).
  FP8 rows    uint8, width Dc + 4 * Dc/128 + 2 * Dr bytes (656 for DeepSeek-V3's Dc=512, Dr=64),
              FlashMLA's "FP8 with scale" layout for DeepSeek-V3.2 (its README and
              flash_mla_interface.py; vLLM's "fp8_ds_mla" cache):
                bytes [0, Dc)                  the latent as e4m3 (float8_e4m3fn) codes;
                bytes [Dc, Dc + 4 * Dc/128)    one fp32 scale per 128 latent columns, the
                                               first for columns 0-127 (latent ~ code * scale);
                bytes [.., width)              k_pe as Dr bf16 values, not quantised (the
                                               rope part is sensitive to precision loss).
              Each token's bytes are contiguous and every field is naturally aligned (width is
              a multiple of 4), so the rows are read in place. Any Dc that is a multiple of
              128 and any even Dr fit the layout; FlashMLA ships it for 512 and 64 only.

DeepSeek-V3.2's FP8 index-key cache (index_cache_write, lightning_indexer) uses the same rows
with Dr = 0: Di e4m3 codes then Di/128 fp32 scales, 132 bytes a token for Di = 128 (DeepSeek's
inference keeps one fp32 scale per 128 key columns too, in a tensor of its own).

The FP8 recipe (ds_kernels/reference/fp8_mla_cache.py spells it out) is the one of FlashMLA's
tests/quant.py: scale = the smallest power of two >= max(amax / 448, 1e-4) over the tile, so
code * scale is exact in bf16 and fp16 too. Readers take any positive fp32 scale: caches that
vLLM writes (scale = amax / 448, not rounded) decode the same way.
"""

import torch

FP8_CACHE_DTYPE = torch.uint8   # the bytes; torch.library ops take no float8 arguments
FP8_TILE = 128                  # latent columns sharing one scale
SCALE_DTYPE = torch.float32
ROPE_DTYPE = torch.bfloat16
# FlashMLA clamps the scale itself (amax / 448) to at least 1e-4 before rounding it up to a
# power of two: no tile gets a scale below 2^-13 (tests/quant.py, "_cast_scale_inv_to_ue8m0").
SCALE_FLOOR = 1e-4


def is_fp8(kv_cache: torch.Tensor) -> bool:
    """Whether ``kv_cache`` holds FP8 rows (its dtype is the format)."""
    return kv_cache.dtype == FP8_CACHE_DTYPE


def scales_offset(Dc: int) -> int:
    """Byte offset of an FP8 row's scales (right after the Dc codes)."""
    return Dc


def rope_offset(Dc: int) -> int:
    """Byte offset of an FP8 row's bf16 k_pe (after the codes and the Dc/128 fp32 scales)."""
    return Dc + SCALE_DTYPE.itemsize * (Dc // FP8_TILE)


def fp8_row_bytes(Dc: int, Dr: int) -> int:
    """Bytes of one token's FP8 row: 656 for Dc=512, Dr=64."""
    return rope_offset(Dc) + ROPE_DTYPE.itemsize * Dr


def row_width(Dc: int, Dr: int, dtype: torch.dtype) -> int:
    """The cache's last dim for this dtype: fp8_row_bytes for FP8 rows (uint8), else Dc + Dr.
    A token takes row_width * dtype.itemsize bytes a layer (656 in FP8, 1,152 in bf16)."""
    if dtype == FP8_CACHE_DTYPE:
        return fp8_row_bytes(Dc, Dr)
    return Dc + Dr
