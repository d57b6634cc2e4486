"""ds_kernels.quant_linear: a linear layer on a quantised weight (FP8 blocks or MXFP4), as
``torch.ops.ds_kernels.quant_linear``, differentiable in x and bias (backward:
``torch.ops.ds_kernels.quant_linear_backward``). The weight is frozen: it gets no gradient.

The torch.library ops take the weight's code bytes (uint8) and e8m0 scales as uint8, with the
format named: opcheck's schema test copies and compares arguments, which torch implements for
no float8/float4 dtype. The public function passes views, never copies.
"""

import torch

from ds_kernels import dispatch
from ds_kernels.ops.checks import GEMM_DTYPES, check_frozen, check_same_device, check_tensor
from ds_kernels.ops.quantize import as_bytes, check_quantized, from_bytes
from ds_kernels.quant_formats import in_features



def quant_linear(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """out [..., N] = x @ dequantize(w_q, scale).T (+ bias), in x's dtype.

    x [..., K] fp16/bf16/fp32 (fp64 too); w_q [N, K] float8_e4m3fn with scale fp32 or
    float8_e8m0fnu [ceil(N/128), ceil(K/128)], or w_q [N, K/2] float4_e2m1fn_x2 with scale
    float8_e8m0fnu [N, K/32] (see ds_kernels.dequantize); bias [N] or None. Weight-only:
    x stays unquantised, each weight tile is dequantised inside the GEMM (never the whole
    weight), accumulating in fp32.
    """
    check_frozen("quant_linear", w_q=w_q, scale=scale)
    if dispatch.direct_call_allowed(x, w_q, scale, bias):
        return _run(x, w_q, scale, bias)  # checks the arguments itself
    fmt = _check(x, w_q, scale, bias)  # before torch.ops, whose own type errors name no argument
    codes, scales = as_bytes(w_q, scale)
    return torch.ops.ds_kernels.quant_linear(x, codes, scales, bias, fmt)


def _check(x, w_q, scale, bias) -> str:
    check_tensor("x", x, dtypes=GEMM_DTYPES)
    fmt = check_quantized("w_q", w_q, "scale", scale, dim=2)
    N, K = w_q.shape[0], in_features(w_q, fmt)
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must be [..., K] with K = {K} (the in-features of w_q, shape "
                         f"{tuple(w_q.shape)}, {fmt}), got shape {tuple(x.shape)}")
    if N < 1 or K < 1:
        raise ValueError(f"w_q must have N, K >= 1, got shape {tuple(w_q.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dim=1, dtypes=GEMM_DTYPES)
        if bias.shape[0] != N:
            raise ValueError(f"bias must have shape [{N}] (the rows of w_q), got "
                             f"{tuple(bias.shape)}")
    check_same_device("x", x, w_q=w_q, scale=scale, bias=bias)
    return fmt


def _run(x, w_q, scale, bias):
    _check(x, w_q, scale, bias)
    return dispatch.implementation("quant_linear", x.device)(x, w_q, scale, bias)


def _quant_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                  bias: torch.Tensor | None, fmt: str) -> torch.Tensor:
    return _run(x, *from_bytes(codes, scales, fmt), bias)


_quant_linear_op = torch.library.custom_op("ds_kernels::quant_linear", _quant_linear,
                                           mutates_args=())


@_quant_linear_op.register_fake
def _(x, codes, scales, bias, fmt):
    w_q, scale = from_bytes(codes, scales, fmt)
    _check(x, w_q, scale, bias)
    return x.new_empty(*x.shape[:-1], w_q.shape[0])


@torch.library.custom_op("ds_kernels::quant_linear_backward", mutates_args=())
def _quant_linear_backward_op(grad_out: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                              fmt: str) -> torch.Tensor:
    w_q, scale = from_bytes(codes, scales, fmt)
    return dispatch.implementation("quant_linear_backward", grad_out.device)(
        grad_out, w_q, scale)


@_quant_linear_backward_op.register_fake
def _(grad_out, codes, scales, fmt):
    w_q, _ = from_bytes(codes, scales, fmt)
    return grad_out.new_empty(*grad_out.shape[:-1], in_features(w_q, fmt))


def _setup_context(ctx, inputs, output):
    x, codes, scales, bias, fmt = inputs
    ctx.save_for_backward(codes, scales)
    ctx.fmt = fmt
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out):
    codes, scales = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.ds_kernels.quant_linear_backward(grad_out, codes, scales, ctx.fmt)
    if ctx.needs_input_grad[3]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0, dtype=torch.promote_types(
            grad_out.dtype, torch.float32)).to(ctx.bias_dtype)
    return grad_x, None, None, grad_bias, None


_quant_linear_op.register_autograd(_backward, setup_context=_setup_context)
