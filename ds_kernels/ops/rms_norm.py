"""ds_kernels.rms_norm: transformers' DeepseekV3RMSNorm as ``torch.ops.ds_kernels.rms_norm``,
differentiable in x and weight (backward: ``torch.ops.ds_kernels.rms_norm_backward``)."""

import math

import torch

from ds_kernels import dispatch
from ds_kernels.ops.checks import GEMM_DTYPES, check_same_device, check_tensor


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y [..., D] = weight * x / sqrt(mean(x^2 over the last dim) + eps), in x's dtype.

    x [..., D] fp16/bf16/fp32 (fp64 too, for gradcheck); weight [D], any of those dtypes.
    Computed in fp32 in transformers' order of casts: the normalised row is rounded to x's
    dtype before the weight multiplies it (see ds_kernels/reference/rms_norm.py), so a patched
    transformers model keeps its logits.
    """
    if dispatch.direct_call_allowed(x, weight):
        return _rms_norm(x, weight, eps)  # checks the arguments itself
    _check(x, weight, eps)  # before torch.ops, whose own type errors name no argument
    return torch.ops.ds_kernels.rms_norm(x, weight, float(eps))


def check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")


def check_norm(x_name, x, weight_name, weight, eps):
    """x [..., D] and its norm weight [D]."""
    check_tensor(x_name, x, dtypes=GEMM_DTYPES)
    check_tensor(weight_name, weight, dim=1, dtypes=GEMM_DTYPES)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{x_name} must be [..., D] with D >= 1, got shape {tuple(x.shape)}")
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{weight_name} must have shape [{x.shape[-1]}] (the last dim of "
                         f"{x_name}), got {tuple(weight.shape)}")
    check_same_device(x_name, x, **{weight_name: weight})
    check_eps(eps)


def _check(x, weight, eps):
    check_norm("x", x, "weight", weight, eps)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check(x, weight, eps)
    return dispatch.implementation("rms_norm", x.device)(x, weight, float(eps))


_rms_norm_op = torch.library.custom_op("ds_kernels::rms_norm", _rms_norm, mutates_args=())


@_rms_norm_op.register_fake
def _(x, weight, eps):
    _check(x, weight, eps)
    return x.new_empty(x.shape)


@torch.library.custom_op("ds_kernels::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return dispatch.implementation("rms_norm_backward", x.device)(grad_out, x, weight, eps)


@_rms_norm_backward_op.register_fake
def _(grad_out, x, weight, eps):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    grad_x, grad_weight = torch.ops.ds_kernels.rms_norm_backward(grad_out, x, weight, ctx.eps)
    return grad_x, grad_weight, None


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)
