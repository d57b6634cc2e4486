"""Reference quantisation recipes, one block at a time: the specification that the vectorised
implementation (ds_kernels/cpu/quantize.py) is tested against.

FP8 blocks (DeepSeek-V3's published checkpoints; README_WEIGHTS.md of deepseek-ai/DeepSeek-V3,
DeepGEMM's per_block_cast_to_fp8, and act_quant in DeepSeek-V3's inference/kernel.py):
  1. cut w [N, K] into 128x128 blocks; an edge block is zero-padded to 128x128 (padding never
     raises an amax, so this is the amax over the block's real entries);
  2. amax = max |w| over the block, at least 1e-4 (an all-zero block gets a finite scale);
  3. scale = amax / 448 in fp32; "ue8m0" (V3.1+, V4) rounds it up to a power of two;
  4. w_q = e4m3(clamp(w / scale, -448, 448)), rounded to nearest even. The checkpoints'
     ``weight_scale_inv`` is this scale: w ~ w_q * scale.

MXFP4 (DeepSeek-V4's experts; fp4_act_quant of DeepSeek-V4's inference/kernel.py, and DeepGEMM's
per_token_cast_to_fp4 with use_ue8m0 and gran_k=32): the OCP MX format - groups of 32 along K
share one e8m0 scale (a power of two, 2^(byte - 127)) - with DeepSeek's choice of the scale:
  1. amax = max |w| over the group, at least 6 * 2^-126 (the scale stays a normal power of two);
  2. scale = amax / 6 rounded up to a power of two, so that no element clips;
  3. each w / scale, clamped to [-6, 6], rounds to the nearest of 0, 0.5, 1, 1.5, 2, 3, 4, 6,
     ties to the even code (what the GPU's cvt.rn.satfinite e2m1 conversion does), keeping its
     sign (-0 included);
  4. two codes a byte, the even column in the low nibble.

Everything is computed in fp32, as DeepSeek's kernels do. Non-finite weights (no published
checkpoint has them; our policy): they are left out of the amax. In FP8 they become NaN (e4m3fn
has no infinity; a plain cast would saturate +-inf to +-448); in MXFP4, whose e2m1 has neither,
their group's scale becomes NaN (e8m0 0xFF), so the whole group dequantises to NaN, and their
own codes are 0.

Dequantisation multiplies in fp32 (as DeepSeek's weight_dequant does), then rounds to the
asked dtype.

FP8 activations (w8a8: DeepSeek's act_quant, DeepGEMM's per_token_cast_to_fp8): each token's
row in groups of 128 columns, each group one 1x128 block of the FP8 recipe (float scales; a
partial last group's amax is over its real columns). A group holding NaN or inf gets a NaN
scale and zero codes: it dequantises to NaN, so that token's outputs become NaN.
"""

import math

import torch

from ds_kernels.quant_formats import (E2M1_GRID, E2M1_MAX, E4M3_MAX, E8M0_DTYPE, E8M0_NAN,
                                      FP4_AMAX_FLOOR, FP4_DTYPE, FP8_AMAX_FLOOR, FP8_BLOCK,
                                      FP8_DTYPE, MXFP4_GROUP)


def _fp32(value: float) -> float:
    """``value`` rounded to fp32."""
    return float(torch.tensor(value, dtype=torch.float32))


def ceil_pow2(x: float) -> float:
    """The smallest power of two >= x > 0 (x a normal fp32)."""
    mantissa, exponent = math.frexp(x)  # x = mantissa * 2^exponent, 0.5 <= mantissa < 1
    return 2.0 ** (exponent - 1) if mantissa == 0.5 else 2.0 ** exponent


def finite_amax(values: torch.Tensor) -> float:
    finite = values[values.isfinite()]
    return float(finite.abs().max()) if finite.numel() else 0.0


def _block(i: int) -> slice:
    return slice(i * FP8_BLOCK, (i + 1) * FP8_BLOCK)


def fp8_block_scale(block: torch.Tensor, scale_fmt: str) -> float:
    """The fp32 scale of one zero-padded 128x128 block."""
    scale = _fp32(max(finite_amax(block), FP8_AMAX_FLOOR) / E4M3_MAX)
    return ceil_pow2(scale) if scale_fmt == "ue8m0" else scale


def quantize_fp8_block(w: torch.Tensor, scale_fmt: str = "float"):
    """(w_q float8_e4m3fn [..., N, K], scale fp32 [..., ceil(N/128), ceil(K/128)])."""
    N, K = w.shape[-2:]
    rows, cols = math.ceil(N / FP8_BLOCK), math.ceil(K / FP8_BLOCK)
    matrices = w.reshape(-1, N, K).float().cpu()
    w_q = torch.empty(matrices.shape, dtype=FP8_DTYPE)
    scale = torch.empty(matrices.shape[0], rows, cols)
    for m, matrix in enumerate(matrices):
        for i in range(rows):
            for j in range(cols):
                block = matrix[_block(i), _block(j)]
                padded = torch.zeros(FP8_BLOCK, FP8_BLOCK)
                padded[:block.shape[0], :block.shape[1]] = block
                s = fp8_block_scale(padded, scale_fmt)
                q = (block / torch.tensor(s)).clamp(-E4M3_MAX, E4M3_MAX)
                q = torch.where(block.isfinite(), q, torch.nan)
                w_q[m, _block(i), _block(j)] = q.to(FP8_DTYPE)
                scale[m, i, j] = s
    return (w_q.reshape(w.shape).to(w.device),
            scale.reshape(*w.shape[:-2], rows, cols).to(w.device))


def quantize_fp8_activations(x: torch.Tensor):
    """(x_q float8_e4m3fn [M, K], scale fp32 [M, ceil(K/128)]) of activations x [M, K]."""
    M, K = x.shape
    rows = x.float().cpu()
    x_q = torch.zeros(M, K, dtype=FP8_DTYPE)
    scale = torch.empty(M, math.ceil(K / FP8_BLOCK))
    for m in range(M):
        for j in range(scale.shape[1]):
            group = rows[m, _block(j)]
            s = fp8_block_scale(group, "float")
            q = torch.where(group.isfinite(), group / torch.tensor(s), 0.0)
            x_q[m, _block(j)] = q.clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
            scale[m, j] = s if group.isfinite().all() else math.nan
    return x_q.to(x.device), scale.to(x.device)


def fake_quantize_fp8_activations(x: torch.Tensor) -> torch.Tensor:
    """fp32 [M, K]: x through quantize_fp8_activations and back (each code times its scale)."""
    x_q, scale = quantize_fp8_activations(x)
    return x_q.float() * scale.repeat_interleave(FP8_BLOCK, dim=1)[:, :x.shape[1]]


def e2m1_code(v: float) -> int:
    """The 4-bit code of v (|v| <= 6): nearest grid magnitude, ties to the even code; the sign
    bit (8) set for negative v and -0."""
    distances = [abs(abs(v) - g) for g in E2M1_GRID]
    ties = [code for code, d in enumerate(distances) if d == min(distances)]
    magnitude = next((code for code in ties if code % 2 == 0), ties[0])
    return magnitude | (8 if math.copysign(1.0, v) < 0 else 0)


def quantize_mxfp4(w: torch.Tensor):
    """(w_q float4_e2m1fn_x2 [..., N, K/2], scale float8_e8m0fnu [..., N, K/32]); K % 32 == 0."""
    K = w.shape[-1]
    rows = w.reshape(-1, K).float().cpu()
    codes = torch.zeros(rows.shape, dtype=torch.uint8)
    exponents = torch.zeros(rows.shape[0], K // MXFP4_GROUP, dtype=torch.uint8)
    for n, row in enumerate(rows):
        for g in range(K // MXFP4_GROUP):
            group = row[g * MXFP4_GROUP:(g + 1) * MXFP4_GROUP]
            s = ceil_pow2(_fp32(max(finite_amax(group), FP4_AMAX_FLOOR) / E2M1_MAX))
            exponents[n, g] = round(math.log2(s)) + 127 if group.isfinite().all() else E8M0_NAN
            for i, v in enumerate(group.tolist()):
                if math.isfinite(v):
                    codes[n, g * MXFP4_GROUP + i] = e2m1_code(max(-E2M1_MAX, min(E2M1_MAX, v / s)))
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)  # the even column in the low nibble
    return (packed.view(FP4_DTYPE).reshape(*w.shape[:-1], K // 2).to(w.device),
            exponents.view(E8M0_DTYPE).reshape(*w.shape[:-1], K // MXFP4_GROUP).to(w.device))


def dequantize(w_q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """w [..., N, K] in ``dtype``: each code times its block's (FP8) or group's (MXFP4) scale,
    multiplied in fp32. FP8 scales may be fp32 or float8_e8m0fnu."""
    s = scale.float().cpu()
    if w_q.dtype == FP8_DTYPE:
        N, K = w_q.shape[-2:]
        q = w_q.float().cpu().reshape(-1, N, K)
        s = s.reshape(q.shape[0], *s.shape[-2:])
        w = torch.empty(q.shape)
        for i in range(math.ceil(N / FP8_BLOCK)):
            for j in range(math.ceil(K / FP8_BLOCK)):
                w[:, _block(i), _block(j)] = q[:, _block(i), _block(j)] * s[:, i, j, None, None]
        return w.reshape(w_q.shape).to(w_q.device, dtype)
    packed = w_q.view(torch.uint8).cpu()
    grid = torch.tensor(E2M1_GRID + tuple(-g for g in E2M1_GRID))  # codes 0..15
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)  # [..., N, K]
    w = grid[codes.long()] * s.repeat_interleave(MXFP4_GROUP, dim=-1)
    return w.to(w_q.device, dtype)
