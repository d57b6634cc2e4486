"""Reference FP8 latent cache rows (layout: ds_kernels/mla_cache_format.py), one token and one
128-column tile at a time: the specification the torch path and the Triton kernels are tested
against.

Quantising a token's [latent (Dc) | k_pe (Dr)], as FlashMLA's tests/quant.py does for
DeepSeek-V3.2 (quantize_k_cache, V32_FP8Sparse):
  1. for each tile of 128 latent columns, amax = max |x| over the tile, in fp32;
  2. scale = the smallest power of two >= max(amax / 448, 1e-4) (FlashMLA clamps the scale,
     not the amax, then rounds its log2 up: "ue8m0" scales stored as fp32);
  3. codes = e4m3(x / scale), rounded to nearest even; |x / scale| <= 448 by step 2, and the
     division by a power of two is exact;
  4. k_pe is rounded to bf16 (from any input dtype) and stored as it is.
Non-finite latents (our policy; FlashMLA's recipe would make the whole tile NaN through the
amax): they are left out of the amax and their own codes are NaN (e4m3fn has no infinity), so
exactly the rows that hold them poison the heads that read them, as in a float cache. k_pe
keeps its infinities and NaNs in bf16.

Dequantising: code * scale in fp32 (exact for power-of-two scales), k_pe from bf16, then the
whole row rounded to the asked dtype (the query's: mla_decode on an FP8 cache means mla_decode
on this dequantised cache).
"""

import torch

from ds_kernels.mla_cache_format import (FP8_CACHE_DTYPE, FP8_TILE, ROPE_DTYPE, SCALE_DTYPE,
                                         SCALE_FLOOR, fp8_row_bytes, rope_offset,
                                         scales_offset)
from ds_kernels.quant_formats import E4M3_MAX, FP8_DTYPE
from ds_kernels.reference.quantize import ceil_pow2, finite_amax


def tile_scale(tile: torch.Tensor) -> float:
    """The power-of-two fp32 scale of one tile of 128 latent values."""
    return ceil_pow2(max(finite_amax(tile.float()) / E4M3_MAX, SCALE_FLOOR))


def quantize_row(latent: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
    """uint8 [fp8_row_bytes(Dc, Dr)] of one token: latent [Dc] (Dc % 128 == 0), k_pe [Dr]."""
    Dc, Dr = latent.shape[0], k_pe.shape[0]
    row = torch.empty(fp8_row_bytes(Dc, Dr), dtype=FP8_CACHE_DTYPE)
    for i in range(Dc // FP8_TILE):
        columns = slice(i * FP8_TILE, (i + 1) * FP8_TILE)
        tile = latent[columns].float().cpu()
        s = tile_scale(tile)
        q = (tile / s).clamp(-E4M3_MAX, E4M3_MAX)
        q = torch.where(tile.isfinite(), q, torch.nan)
        row[columns] = q.to(FP8_DTYPE).view(FP8_CACHE_DTYPE)
        at = scales_offset(Dc) + i * SCALE_DTYPE.itemsize
        row[at:at + SCALE_DTYPE.itemsize] = torch.tensor([s], dtype=SCALE_DTYPE).view(
            FP8_CACHE_DTYPE)
    row[rope_offset(Dc):] = k_pe.cpu().to(ROPE_DTYPE).view(FP8_CACHE_DTYPE)
    return row.to(latent.device)


def dequantize(rows: torch.Tensor, Dc: int, dtype=torch.float32) -> torch.Tensor:
    """[..., Dc + Dr] in ``dtype`` of FP8 rows uint8 [..., fp8_row_bytes(Dc, Dr)]."""
    rows = rows.contiguous()
    scales = rows[..., scales_offset(Dc):rope_offset(Dc)].contiguous().view(SCALE_DTYPE)
    parts = []
    for i in range(Dc // FP8_TILE):
        codes = rows[..., i * FP8_TILE:(i + 1) * FP8_TILE].contiguous().view(FP8_DTYPE)
        parts.append(codes.float() * scales[..., i, None])           # [..., 128]
    parts.append(rows[..., rope_offset(Dc):].contiguous().view(ROPE_DTYPE).float())  # [..., Dr]
    return torch.cat(parts, dim=-1).to(dtype)
