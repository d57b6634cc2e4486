"""ds_kernels.grouped_mm: torch._grouped_mm's 2-D x 3-D product, as ``torch.ops.ds_kernels.grouped_mm``,
differentiable in a and b (backward: ``torch.ops.ds_kernels.grouped_mm_backward``); on a
quantised b, ``torch.ops.ds_kernels.grouped_mm_quant``, differentiable in a only.

The quantised ops take b's code bytes (uint8) and e8m0 scales as uint8, with the format named,
as quant_linear's do: opcheck copies and compares arguments, which torch implements for no
float8/float4 dtype.
"""

import torch

from ds_kernels import dispatch
from ds_kernels.ops.checks import (GEMM_DTYPES, check_frozen, check_same_device,
                                   check_same_dtype, check_tensor, device_checks_allowed)
from ds_kernels.ops.quantize import as_bytes, check_quantized, from_bytes, w8a8_of
from ds_kernels.quant_formats import format_of, in_features


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, *,
               b_scale: torch.Tensor | None = None, act_quant: str | None = None) -> torch.Tensor:
    """out [M, N]: rows offs[e-1]:offs[e] of a [M, K] times b[e] ([E, K, N], any strides).

    offs: int32 [E], non-decreasing cumulative row ends (offs[-1] <= M). Rows past offs[-1]
    come out 0. Accumulates in fp32; output in a's dtype.

    Quantised b (b_scale given): b is the transpose of a weight W [E, N, K] quantised along K,
    its in-features, as DeepSeek's checkpoints store every weight - with (w_q, scale) =
    quantize_fp8_block(W) or quantize_mxfp4(W), pass b = w_q.transpose(1, 2) and b_scale =
    scale.transpose(1, 2) (views, no copies):
      FP8:   b float8_e4m3fn [E, K, N], b_scale fp32 or float8_e8m0fnu [E, ceil(K/128),
             ceil(N/128)] (square blocks: the same as quantising b in its own layout);
      MXFP4: b float4_e2m1fn_x2 [E, K/2, N] (two K a byte, the even K in the low nibble),
             b_scale float8_e8m0fnu [E, K/32, N].
    Meaning: grouped_mm(a, dequantize(b.mT, b_scale.mT).mT, offs), a in any float dtype.
    Weight-only (a stays unquantised) and frozen: differentiable in a only.

    ``act_quant="fp8"`` (FP8 b; inference): w8a8, a's rows quantised to e4m3 per 128 columns as
    they are read and multiplied on FP8 tensor cores; see ds_kernels.fused_moe. Its result is
    the reference's on the quantised a to the dtype's tolerance.
    """
    fmt = None if act_quant is None else (
        _check_quantized(a, b, b_scale, offs) if b_scale is not None else _check(a, b, offs))
    w8a8 = w8a8_of("grouped_mm", act_quant, "b", b, fmt, a)
    if b_scale is None:
        if dispatch.direct_call_allowed(a, b):
            return _grouped_mm(a, b, offs)  # checks the arguments itself
        _check(a, b, offs)  # before torch.ops, whose own type errors name no argument
        return torch.ops.ds_kernels.grouped_mm(a, b, offs)
    if dispatch.direct_call_allowed(a, b, b_scale, offs):  # no tensor requires grad
        return _run_quantized(a, b, b_scale, offs, w8a8)  # checks the arguments itself
    fmt = _check_quantized(a, b, b_scale, offs)
    check_frozen("grouped_mm", b=b, b_scale=b_scale)
    return torch.ops.ds_kernels.grouped_mm_quant(a, *as_bytes(b, b_scale), offs, fmt, w8a8)



def _check(a, b, offs):
    check_tensor("a", a, dim=2, dtypes=GEMM_DTYPES)
    check_tensor("b", b, dim=3)
    if format_of(b) is not None:
        raise TypeError(f"b is {b.dtype}, a quantised weight: pass its scales as b_scale")
    check_tensor("b", b, dim=3, dtypes=GEMM_DTYPES)
    check_tensor("offs", offs, dim=1, dtypes=(torch.int32,))
    check_same_dtype("a", a, b=b)
    _check_sizes(a, b.shape[0], b.shape[1], offs)
    check_same_device("a", a, b=b, offs=offs)


def _check_quantized(a, b, b_scale, offs) -> str:
    check_tensor("a", a, dim=2, dtypes=GEMM_DTYPES)
    check_tensor("b", b, dim=3)
    check_tensor("b_scale", b_scale)
    if format_of(b) is None:
        raise TypeError(f"b_scale is given, so b must be quantised (float8_e4m3fn or "
                        f"float4_e2m1fn_x2, the transpose of a quantised [E, N, K] weight), "
                        f"got {b.dtype}")
    # The scale grid follows the weight W = b.mT: the messages name that view.
    fmt = check_quantized("b.mT", b.mT, "b_scale.mT", b_scale.mT, dim=3)
    check_tensor("offs", offs, dim=1, dtypes=(torch.int32,))
    _check_sizes(a, b.shape[0], in_features(b.mT, fmt), offs)
    check_same_device("a", a, b=b, b_scale=b_scale, offs=offs)
    return fmt


def _check_sizes(a, E, K, offs):
    if K != a.shape[1]:
        raise ValueError(f"a is [M, K] = {tuple(a.shape)} but b is [E, K, N] with K = {K}: "
                         "K differs")
    if E == 0 or offs.shape[0] != E:
        raise ValueError(f"offs must have one entry per group of b (E={E} >= 1), "
                         f"got shape {tuple(offs.shape)}")


def _check_offsets(offs, M):
    if not device_checks_allowed(offs):
        return
    previous = torch.cat([offs.new_zeros(1), offs[:-1]])
    if bool((offs < previous).any()) or int(offs[-1]) > M:
        raise ValueError(f"offs must be non-decreasing cumulative row ends in [0, M={M}], "
                         f"got {offs.tolist()[:16]}")


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    _check(a, b, offs)
    _check_offsets(offs, a.shape[0])
    return dispatch.implementation("grouped_mm", a.device)(a, b, offs)


_grouped_mm_op = torch.library.custom_op("ds_kernels::grouped_mm", _grouped_mm, mutates_args=())


@_grouped_mm_op.register_fake
def _(a, b, offs):
    _check(a, b, offs)
    return a.new_empty(a.shape[0], b.shape[2])


@torch.library.custom_op("ds_kernels::grouped_mm_backward", mutates_args=())
def _grouped_mm_backward_op(grad_out: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                            offs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad_a, grad_b = dispatch.implementation("grouped_mm_backward", a.device)(
        grad_out.contiguous(), a, b, offs)
    return grad_a, grad_b


@_grouped_mm_backward_op.register_fake
def _(grad_out, a, b, offs):
    return a.new_empty(a.shape), b.new_empty(b.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    a, b, offs = ctx.saved_tensors
    grad_a, grad_b = torch.ops.ds_kernels.grouped_mm_backward(grad_out, a, b, offs)
    return grad_a, grad_b, None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)


def _run_quantized(a, b, b_scale, offs, w8a8):
    _check_quantized(a, b, b_scale, offs)
    _check_offsets(offs, a.shape[0])
    return dispatch.implementation("grouped_mm", a.device)(a, b, offs, b_scale=b_scale,
                                                           w8a8=w8a8)


@torch.library.custom_op("ds_kernels::grouped_mm_quant", mutates_args=())
def _grouped_mm_quant_op(a: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                         offs: torch.Tensor, fmt: str, w8a8: bool) -> torch.Tensor:
    return _run_quantized(a, *from_bytes(codes, scales, fmt), offs, w8a8)


@_grouped_mm_quant_op.register_fake
def _(a, codes, scales, offs, fmt, w8a8):
    b, b_scale = from_bytes(codes, scales, fmt)
    _check_quantized(a, b, b_scale, offs)
    return a.new_empty(a.shape[0], b.shape[2])


@torch.library.custom_op("ds_kernels::grouped_mm_quant_backward", mutates_args=())
def _grouped_mm_quant_backward_op(grad_out: torch.Tensor, codes: torch.Tensor,
                                  scales: torch.Tensor, offs: torch.Tensor,
                                  fmt: str) -> torch.Tensor:
    """d a [M, K] = d out @ b^T (a itself is not needed)."""
    b, b_scale = from_bytes(codes, scales, fmt)
    grad_a, _ = dispatch.implementation("grouped_mm_backward", grad_out.device)(
        grad_out.contiguous(), None, b, offs, b_scale=b_scale)
    return grad_a


@_grouped_mm_quant_backward_op.register_fake
def _(grad_out, codes, scales, offs, fmt):
    b, _ = from_bytes(codes, scales, fmt)
    return grad_out.new_empty(grad_out.shape[0], in_features(b.mT, fmt))


def _setup_quantized_context(ctx, inputs, output):
    _, codes, scales, offs, ctx.fmt, w8a8 = inputs
    if w8a8:  # grouped_mm refuses this before the op; the op's own callers get it here
        raise RuntimeError("grouped_mm_quant with w8a8 has no gradient (act_quant='fp8' is "
                           "for inference)")
    ctx.save_for_backward(codes, scales, offs)


def _quantized_backward(ctx, grad_out):
    codes, scales, offs = ctx.saved_tensors
    grad_a = torch.ops.ds_kernels.grouped_mm_quant_backward(grad_out, codes, scales, offs,
                                                           ctx.fmt)
    return grad_a, None, None, None, None, None


_grouped_mm_quant_op.register_autograd(_quantized_backward,
                                       setup_context=_setup_quantized_context)
