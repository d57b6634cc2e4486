"""ds_kernels.quantize_fp8_block, quantize_mxfp4 and dequantize: DeepSeek's quantised weight
formats (ds_kernels/quant_formats.py), made and undone by the recipes of
ds_kernels/reference/quantize.py.

Plain tensor code (ds_kernels/cpu/quantize.py), the same on every device: quantising runs once
per checkpoint and dequantising is one elementwise pass, so neither needs a kernel of its own,
a dispatch entry or a torch.library op.
"""

import math

import torch

from ds_kernels.cpu import quantize as vectorised
from ds_kernels.ops.checks import GEMM_DTYPES, check_same_device, check_tensor
from ds_kernels.quant_formats import (E8M0_DTYPE, FP4_DTYPE, FP8, FP8_BLOCK, FP8_DTYPE, MXFP4,
                                      MXFP4_GROUP, SCALE_BLOCK, SCALE_FMTS, format_of,
                                      in_features)

# The scale dtypes each format's checkpoints ship: fp32 (V3, R1, V3.1's ue8m0 as fp32) or
# e8m0 (V4) for FP8 blocks; e8m0 only for MXFP4.
_SCALE_DTYPES = {FP8: (torch.float32, E8M0_DTYPE), MXFP4: (E8M0_DTYPE,)}


def quantize_fp8_block(w: torch.Tensor, block_size=(FP8_BLOCK, FP8_BLOCK), *,
                       scale_fmt: str = "float") -> tuple[torch.Tensor, torch.Tensor]:
    """(w_q float8_e4m3fn [..., N, K], scale fp32 [..., ceil(N/128), ceil(K/128)]), with
    w ~ w_q * scale blockwise: DeepSeek's recipe (edge blocks zero-padded, scale = amax / 448;
    ``scale_fmt="ue8m0"`` rounds each scale up to a power of two, as V3.1+ and V4 ship). The
    scale is what the checkpoints call ``weight_scale_inv``.

    w [..., N, K] fp16/bf16/fp32/fp64, computed in fp32. block_size: (128, 128), the only block
    of DeepSeek's checkpoints (dequantize and quant_linear take it from the dtype). NaN and
    +-inf weights become NaN (see ds_kernels/reference/quantize.py).
    """
    _check_weight("w", w)
    if (not isinstance(block_size, (tuple, list)) or len(block_size) != 2
            or any(isinstance(b, bool) or not isinstance(b, int) for b in block_size)):
        raise TypeError(f"block_size must be a pair of ints, got {block_size!r}")
    if tuple(block_size) != (FP8_BLOCK, FP8_BLOCK):
        raise ValueError(f"block_size must be ({FP8_BLOCK}, {FP8_BLOCK}), the weight_block_size "
                         f"of DeepSeek's FP8 checkpoints (dequantize and quant_linear derive it "
                         f"from the dtype), got {tuple(block_size)}")
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FMTS}, got {scale_fmt!r}")
    return vectorised.quantize_fp8_block(w, scale_fmt)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_q float4_e2m1fn_x2 [..., N, K/2], scale float8_e8m0fnu [..., N, K/32]): MXFP4 as
    DeepSeek-V4 ships its experts. Each 32 of K share a power-of-two scale, amax / 6 rounded up
    (so nothing clips); each weight / scale rounds to the nearest e2m1 value, ties to even; two
    codes a byte, the even column in the low nibble.

    w [..., N, K] fp16/bf16/fp32/fp64 with K a multiple of 32 (every V4 expert's is; a partial
    group has no scale in the format's [..., N, K/32] grid). A group holding NaN or +-inf gets a
    NaN scale: it dequantises to NaN.
    """
    if FP4_DTYPE is None or E8M0_DTYPE is None:
        raise RuntimeError(f"MXFP4 needs torch >= 2.8 (float4_e2m1fn_x2), got {torch.__version__}")
    _check_weight("w", w)
    if w.shape[-1] % MXFP4_GROUP:
        raise ValueError(f"MXFP4 needs K (the last dim of w) to be a multiple of {MXFP4_GROUP}, "
                         f"one e8m0 scale per {MXFP4_GROUP} weights; got shape {tuple(w.shape)}")
    return vectorised.quantize_mxfp4(w)


def dequantize(w_q: torch.Tensor, scale: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w [..., N, K] in ``dtype``: each code of w_q times its scale, multiplied in fp32 (as
    DeepSeek's weight_dequant does) and rounded to ``dtype``.

    w_q float8_e4m3fn [..., N, K] with scale fp32 or float8_e8m0fnu [..., ceil(N/128),
    ceil(K/128)] (an edge block's scale covers its partial rows and columns: DeepSeek-V3's
    576-row kv_a_proj_with_mqa has 5 scale rows), or w_q float4_e2m1fn_x2 [..., N, K/2] with
    scale float8_e8m0fnu [..., N, K/32]. The format follows from w_q's dtype.
    """
    check_quantized("w_q", w_q, "scale", scale)
    if dtype not in GEMM_DTYPES:
        raise TypeError(f"dtype must be one of {GEMM_DTYPES}, got {dtype}")
    return vectorised.dequantize(w_q, scale, dtype)


def _check_weight(name, w):
    check_tensor(name, w, dtypes=GEMM_DTYPES)
    if w.dim() < 2 or w.shape[-1] < 1 or w.shape[-2] < 1:
        raise ValueError(f"{name} must be [..., N, K] with N, K >= 1, got shape {tuple(w.shape)}")


def check_quantized(w_name: str, w_q, scale_name: str, scale, *, dim: int | None = None) -> str:
    """The format ("fp8" or "mxfp4") of the quantised weight w_q and its scale; raises, naming
    the tensor, if w_q's dtype is no format, or scale's dtype, shape or device does not fit."""
    check_tensor(w_name, w_q, dim=dim)
    check_tensor(scale_name, scale)
    fmt = format_of(w_q)
    if fmt is None:
        raise TypeError(f"{w_name} must be float8_e4m3fn (FP8, 128x128 block scales) or "
                        f"float4_e2m1fn_x2 (MXFP4), got {w_q.dtype}")
    if w_q.dim() < 2:
        raise ValueError(f"{w_name} must be [..., N, K], got shape {tuple(w_q.shape)}")
    if scale.dtype not in _SCALE_DTYPES[fmt]:
        names = ", ".join(str(d).replace("torch.", "") for d in _SCALE_DTYPES[fmt])
        raise TypeError(f"{scale_name} of the {fmt} weight {w_name} must have dtype in ({names}) "
                        f"(raw e8m0 bytes: .view(torch.float8_e8m0fnu)), got {scale.dtype}")
    N, K = w_q.shape[-2], in_features(w_q, fmt)
    rows, cols = SCALE_BLOCK[fmt]
    if fmt == MXFP4 and K % cols:
        raise ValueError(f"{w_name} is [..., N, K/2] = {tuple(w_q.shape)}: MXFP4 needs K = {K} "
                         f"to be a multiple of {cols}")
    grid = (*w_q.shape[:-2], math.ceil(N / rows), math.ceil(K / cols))
    if tuple(scale.shape) != grid:
        raise ValueError(f"{scale_name} must have shape {list(grid)} for {w_name} of shape "
                         f"{tuple(w_q.shape)} ({fmt}: one scale per {rows}x{cols} block of "
                         f"W [..., N={N}, K={K}]), got {list(scale.shape)}")
    check_same_device(w_name, w_q, **{scale_name: scale})
    return fmt


ACT_QUANTS = (None, "fp8")


def w8a8_of(op: str, act_quant, weights: str, weight, fmt, *inputs) -> bool:
    """Whether ``act_quant`` asks ``op`` for w8a8 (activations quantised to e4m3, FP8 tensor
    cores); raises if it is no choice, the weights (``weights``, ``weight`` of format ``fmt``)
    are not FP8, or one of ``inputs`` needs a gradient."""
    if act_quant not in ACT_QUANTS:
        raise ValueError(f"act_quant must be one of {ACT_QUANTS}, got {act_quant!r}")
    if act_quant is None:
        return False
    if fmt != FP8:
        raise ValueError(f"act_quant='fp8' multiplies FP8 weights by FP8 activations: {weights} "
                         f"must be float8_e4m3fn with their scales, got {fmt or weight.dtype}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        raise RuntimeError(f"{op}(act_quant='fp8') is an inference path (rounding the "
                           "activations to e4m3 has no gradient): run it under torch.no_grad(), "
                           "or train with act_quant=None (weight-only, frozen weights)")
    return True


# torch.library ops take no float8 / float4 arguments (opcheck: "copy_ / mul not implemented
# for Float8_e4m3fn"): the quantised ops pass codes and e8m0 scales as their bytes.
_CODE_DTYPES = {FP8: FP8_DTYPE, MXFP4: FP4_DTYPE}


def as_bytes(w_q, scale):
    """The op arguments for w_q and scale: their bytes, where they are fp8/fp4/e8m0."""
    return w_q.view(torch.uint8), scale.view(torch.uint8) if scale.dtype == E8M0_DTYPE else scale


def from_bytes(codes, scales, fmt):
    """as_bytes undone, for format ``fmt``."""
    return (codes.view(_CODE_DTYPES[fmt]),
            scales.view(E8M0_DTYPE) if scales.dtype == torch.uint8 else scales)
