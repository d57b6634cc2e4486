"""DeepSeek's FP8-block and MXFP4 recipes, vectorised, for tensors on any device (the steps and
the policy for non-finite weights: ds_kernels/reference/quantize.py); and dequantisation of a
weight's rows, which quant_linear's torch path shares.

Decoding: torch's own float8_e4m3fn -> fp32 conversion is not vectorised on CPU (~10 ns a weight
on the EPYC dev machine, ~6 ns on the Xeon one, one thread). Measured per weight, one thread,
chunks in cache:
  - e4m3 by bit arithmetic straight into fp32 (_e4m3_as_fp32: widen, x 2^20, mask) and the
    block scale: ~0.7-0.9 ns on the contended 2-core Xeon (AVX-512, AMX), where part 1's fp16
    route (shift into fp16, fp16 -> fp32, then the scale; NaN codes found by an aminmax of the
    fp16 values) took ~1.1 ns: torch vectorises integer mul_ but not the shift, and the NaN
    check now reads the code bytes (two byte-wide max) instead of the decoded values. Each
    torch pass costs ~0.06-0.12 ns a weight however simple: about what a bf16 GEMM with few
    rows spends on a weight there, which bounds what any torch-op decoder can save.
    Gathering from a 256-entry table (index_select on the code bytes): ~1.0 ns (EPYC).
  - e2m1 by a 256-entry table of each byte's two values (an int64 entry holding two fp32s, the
    even column first): ~0.6 ns (EPYC), ~0.9 ns (Xeon, contended), each gather yielding two
    weights. Splitting nibbles costs more (interleaving the halves back, torch.stack, alone
    takes ~0.9 ns).
"""

import functools
import math

import torch

from ds_kernels.quant_formats import (E2M1_GRID, E2M1_MAX, E4M3_MAX, E8M0_DTYPE, E8M0_NAN,
                                      FP4_AMAX_FLOOR, FP4_DTYPE, FP8, FP8_AMAX_FLOOR, FP8_BLOCK,
                                      FP8_DTYPE, MXFP4, MXFP4_GROUP, format_of, in_features)

# Weights quantised or dequantised at a time: bounds the temporaries (up to ~40 bytes a weight
# while quantising: fp32 copies, masks, int64 codes) to well under 100 MB whatever the size of
# the tensor (an [E, 2I, H] expert stack holds billions of weights).
QUANTIZE_CHUNK_ELEMENTS = 1 << 21
DEQUANTIZE_CHUNK_ELEMENTS = 1 << 21
# Activations (FP8 dispatch, w8a8) are quantised a few rows at a time: each of the ~10 torch
# passes then reads its input from cache. Chunks of 256K values: ~3 ns a value, against ~10
# for 8M values at once (one thread, 1024 columns; 16K-value chunks: ~8 ns, call overhead).
ACTIVATION_CHUNK_ELEMENTS = 1 << 18
# e2m1 rounding: the midpoints between neighbouring grid magnitudes; a tie rounds up where the
# lower neighbour's code is odd (0.75 -> 1, 1.75 -> 2, 3.5 -> 4), i.e. to the even code.
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E2M1_TIES_UP = (0.75, 1.75, 3.5)


def ceil_pow2(x: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= x, for positive normal fp32 x: the exponent, plus one
    unless the mantissa is 0."""
    bits = x.view(torch.int32)
    exponent = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exponent << 23).view(torch.float32)


def _finite_abs(x):
    return torch.where(x.isfinite(), x.abs(), 0.0)


def _fp8_band(w: torch.Tensor, scale_fmt: str):
    """(w_q, scale [ceil(R/128), ceil(K/128)]) of a band w [R, K] of whole 128-row blocks (the
    last band may be shorter)."""
    R, K = w.shape
    rows, cols = math.ceil(R / FP8_BLOCK), math.ceil(K / FP8_BLOCK)
    padded = w.new_zeros(rows * FP8_BLOCK, cols * FP8_BLOCK, dtype=torch.float32)
    padded[:R, :K] = w
    blocks = padded.view(rows, FP8_BLOCK, cols, FP8_BLOCK)
    amax = _finite_abs(blocks).amax(dim=(1, 3), keepdim=True).clamp_min(FP8_AMAX_FLOOR)
    scale = amax / E4M3_MAX                                       # [rows, 1, cols, 1]
    if scale_fmt == "ue8m0":
        scale = ceil_pow2(scale)
    q = torch.where(blocks.isfinite(), (blocks / scale).clamp(-E4M3_MAX, E4M3_MAX), torch.nan)
    return q.to(FP8_DTYPE).view(padded.shape)[:R, :K], scale.view(rows, cols)


def quantize_fp8_block(w: torch.Tensor, scale_fmt: str):
    N, K = w.shape[-2:]
    matrices = w.reshape(-1, N, K)
    w_q = torch.empty(matrices.shape, dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty(matrices.shape[0], math.ceil(N / FP8_BLOCK), math.ceil(K / FP8_BLOCK),
                        device=w.device)
    rows = max(FP8_BLOCK, chunk_rows(FP8, K, QUANTIZE_CHUNK_ELEMENTS))
    for m in range(matrices.shape[0]):
        for start in range(0, N, rows):
            end = min(N, start + rows)
            w_q[m, start:end], scale[m, start // FP8_BLOCK:math.ceil(end / FP8_BLOCK)] = (
                _fp8_band(matrices[m, start:end], scale_fmt))
    return w_q.view(w.shape), scale.view(*w.shape[:-2], *scale.shape[1:])


@torch.no_grad()  # rounding: no gradient (FP8 dispatch passes it straight through)
def quantize_fp8_activations(x: torch.Tensor):
    """(x_q float8_e4m3fn [M, K], scale fp32 [M, ceil(K/128)]) of activations x [M, K],
    quantised per token and 128 columns (w8a8's activations, FP8 dispatch; the recipe and NaN
    policy: ds_kernels/reference/quantize.py). ~5 ns a value on one CPU thread of the dev VM
    (8192 x 1024; ~11 ns the whole tensor at once), decoding as much; the masking of
    non-finite values (isfinite and where: ~3 ns a value each there) runs only where a chunk
    holds one."""
    M, K = x.shape
    codes = torch.empty(M, K, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(M, math.ceil(K / FP8_BLOCK), device=x.device)
    for rows in _activation_chunks(x):
        codes[rows], scale[rows] = _quantize_activation_rows(x[rows])
    return codes, scale


def _activation_chunks(x: torch.Tensor) -> list[slice]:
    """Row ranges of x [M, K] of ~ACTIVATION_CHUNK_ELEMENTS values on the CPU (one on a GPU,
    where each would be a kernel launch)."""
    M, K = x.shape
    step = max(1, ACTIVATION_CHUNK_ELEMENTS // max(K, 1)) if x.device.type == "cpu" else M
    return [slice(start, start + step) for start in range(0, M, max(step, 1))]


def _quantize_activation_rows(x: torch.Tensor):
    M, K = x.shape
    cols = math.ceil(K / FP8_BLOCK)
    if K % FP8_BLOCK:
        padded = x.new_zeros(M, cols * FP8_BLOCK, dtype=torch.float32)
        padded[:, :K] = x
    else:
        padded = x.float().contiguous()
    groups = padded.view(M, cols, FP8_BLOCK)
    amax = groups.abs().amax(dim=-1, keepdim=True)                # [M, cols, 1], NaN/inf kept
    finite = amax.isfinite()
    if not finite.all():
        groups = torch.where(groups.isfinite(), groups, 0.0)
        amax = groups.abs().amax(dim=-1, keepdim=True)
    scale = amax.clamp_min(FP8_AMAX_FLOOR) / E4M3_MAX            # [M, cols, 1]
    codes = (groups / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    scale = scale.masked_fill(~finite, torch.nan)
    return codes.view(M, cols * FP8_BLOCK)[:, :K], scale.view(M, cols)


@torch.no_grad()
def dequantize_fp8_activations(x_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 [M, K]: each code of x_q [M, K] times its group's scale [M, ceil(K/128)]."""
    out = torch.empty(x_q.shape, device=x_q.device)
    for rows in _activation_chunks(x_q):
        values = _e4m3_as_fp32(x_q[rows].view(torch.int8)).mul_(_E4M3_AS_FP32)  # 2^-120 undone
        torch.mul(values, scale[rows].repeat_interleave(FP8_BLOCK, dim=1)[:, :x_q.shape[1]],
                  out=out[rows])
    return out


def fake_quantize_fp8_activations(x: torch.Tensor) -> torch.Tensor:
    """fp32 [M, K]: activations x [M, K] through quantize_fp8_activations and back."""
    return dequantize_fp8_activations(*quantize_fp8_activations(x))


def _e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """uint8 codes of v (|v| <= 6): round to nearest, ties to even; sign bit 8 (-0 included)."""
    a = v.abs()
    midpoints = torch.tensor(_E2M1_MIDPOINTS, device=v.device)
    magnitude = torch.bucketize(a, midpoints) + torch.isin(a, torch.tensor(_E2M1_TIES_UP,
                                                                        device=v.device))
    return (magnitude | (torch.signbit(v).to(magnitude.dtype) << 3)).to(torch.uint8)


def _mxfp4_rows(w: torch.Tensor):
    """(packed [R, K/2] uint8, e8m0 exponents [R, K/32] uint8) of rows w [R, K]."""
    groups = w.float().unflatten(-1, (w.shape[-1] // MXFP4_GROUP, MXFP4_GROUP))  # [R, K/32, 32]
    finite = groups.isfinite()
    amax = _finite_abs(groups).amax(dim=-1, keepdim=True).clamp_min(FP4_AMAX_FLOOR)
    scale = ceil_pow2(amax / E2M1_MAX)                             # [R, K/32, 1]
    codes = _e2m1_codes(torch.where(finite, (groups / scale).clamp(-E2M1_MAX, E2M1_MAX), 0.0))
    codes = codes.flatten(-2)                                      # [R, K]
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)                # the even column low
    exponent = (scale.squeeze(-1).view(torch.int32) >> 23).to(torch.uint8)
    return packed, torch.where(finite.all(dim=-1), exponent, E8M0_NAN)


def quantize_mxfp4(w: torch.Tensor):
    K = w.shape[-1]
    rows = w.reshape(-1, K)
    packed = torch.empty(rows.shape[0], K // 2, dtype=torch.uint8, device=w.device)
    exponent = torch.empty(rows.shape[0], K // MXFP4_GROUP, dtype=torch.uint8, device=w.device)
    step = chunk_rows(MXFP4, K, QUANTIZE_CHUNK_ELEMENTS)
    for start in range(0, rows.shape[0], step):
        packed[start:start + step], exponent[start:start + step] = _mxfp4_rows(
            rows[start:start + step])
    return (packed.view(FP4_DTYPE).view(*w.shape[:-1], K // 2),
            exponent.view(E8M0_DTYPE).view(*w.shape[:-1], K // MXFP4_GROUP))


# An e4m3 code's 7 magnitude bits shifted into fp32's exponent and mantissa (bits 26-20) read
# as the value times 2^-120 (e4m3's exponent bias is 7, fp32's 127), subnormal codes included
# (they become fp32 subnormals; exact unless torch.set_flush_denormal(True) flushes them, values
# below 2^-6 of a block's scale). The scale is multiplied by 2^120 to undo it.
_E4M3_AS_FP32 = 2.0 ** 120
# 2^120 is folded into scales below this; above, 2^120 x scale could overflow fp32 (largest
# finite ~2^128) where code x scale does not.
_FOLD_LIMIT = 2.0 ** 8
_SIGN_AND_E4M3_BITS = -0x78100000  # int32 0x87F00000: bits 31 and 26-20
# e4m3 NaN codes read as +-1.875 x 2^-112: the largest magnitude, past 448 x 2^-120.
_E4M3_NAN_AS_FP32 = 1.875 * 2.0 ** -112


def _e4m3_as_fp32(codes: torch.Tensor) -> torch.Tensor:
    """fp32 [R, K] = e4m3 value x 2^-120 of each code byte (int8 view [R, K]), exactly, NaN and
    subnormal codes included: three integer passes over the codes."""
    bits = codes.to(torch.int32)            # sign-extended: a negative code sets bits 31-7
    # x 2^20 is << 20 (int32 wraps alike): torch vectorises mul_ better than the shift.
    bits.mul_(1 << 20).bitwise_and_(_SIGN_AND_E4M3_BITS)  # clear the sign's copies (30-27)
    w = bits.view(torch.float32)
    if _has_nan_codes(codes):  # rare: checked on the bytes, a cheap read
        w.masked_fill_(w.abs() == _E4M3_NAN_AS_FP32, torch.nan)
    return w


def _has_nan_codes(codes: torch.Tensor) -> bool:
    """Whether int8 e4m3 codes hold a NaN: 0x7F, the largest int8, or 0xFF, the largest byte."""
    return codes.numel() > 0 and (int(codes.max()) == 0x7F
                                  or int(codes.view(torch.uint8).max()) == 0xFF)


@functools.cache
def _e2m1_pair_table(device: torch.device) -> torch.Tensor:
    """int64 [256]: the two fp32 values of each MXFP4 byte, the low nibble's first."""
    grid = torch.tensor(E2M1_GRID + tuple(-g for g in E2M1_GRID))  # codes 0..15
    byte = torch.arange(256)
    pairs = torch.stack([grid[byte & 0xF], grid[byte >> 4]], dim=-1)  # [256, 2]
    return pairs.contiguous().view(torch.int64).squeeze(-1).to(device)


def dequantize_rows(w_q: torch.Tensor, scale: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of a 2-D quantised weight, dequantised to fp32 [end - start, K].
    For FP8, start must be a multiple of 128 or [start, end) lie in one 128-row block."""
    fmt = format_of(w_q)
    K, rows = in_features(w_q, fmt), end - start
    if fmt == FP8:
        w = _e4m3_as_fp32(w_q[start:end].view(torch.int8))         # [rows, K]
        first = start // FP8_BLOCK
        block_scales = scale[first:math.ceil(end / FP8_BLOCK)].float()  # [row blocks, K/128]
        if bool((block_scales.abs() < _FOLD_LIMIT).all()):
            block_scales = block_scales * _E4M3_AS_FP32
        else:
            w.mul_(_E4M3_AS_FP32)
        columns = block_scales.repeat_interleave(FP8_BLOCK, dim=1)[:, :K]  # [row blocks, K]
        for b in range(0, rows, FP8_BLOCK):
            w[b:b + FP8_BLOCK].mul_(columns[(start + b) // FP8_BLOCK - first])
        return w
    codes = w_q[start:end].view(torch.uint8).reshape(-1).int()
    w = _e2m1_pair_table(w_q.device).index_select(0, codes).view(torch.float32)
    w = w.view(rows, K // MXFP4_GROUP, MXFP4_GROUP)
    return w.mul_(scale[start:end].float().unsqueeze(-1)).view(rows, K)


def chunk_rows(fmt: str, K: int, elements: int) -> int:
    """Rows per chunk of about ``elements`` weights; for FP8 a multiple of 128 or a power of
    two below it, so that a chunk never straddles two rows of scale blocks."""
    rows = max(1, elements // max(K, 1))
    if fmt != FP8:
        return rows
    if rows >= FP8_BLOCK:
        return rows // FP8_BLOCK * FP8_BLOCK
    return 1 << (rows.bit_length() - 1)


def dequantize(w_q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    fmt = format_of(w_q)
    N, K = w_q.shape[-2], in_features(w_q, fmt)
    matrices = w_q.reshape(-1, *w_q.shape[-2:])
    scales = scale.reshape(-1, *scale.shape[-2:])
    out = torch.empty(matrices.shape[0], N, K, dtype=dtype, device=w_q.device)
    rows = chunk_rows(fmt, K, DEQUANTIZE_CHUNK_ELEMENTS)
    for m in range(matrices.shape[0]):
        for start in range(0, N, rows):
            end = min(N, start + rows)
            out[m, start:end] = dequantize_rows(matrices[m], scales[m], start, end)
    return out.reshape(*w_q.shape[:-1], K)
