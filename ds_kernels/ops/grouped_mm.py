"""ds_kernels.grouped_mm: torch._grouped_mm's 2-D x 3-D product, as ``torch.ops.ds_kernels.grouped_mm``,
differentiable in a and b (backward: ``torch.ops.ds_kernels.grouped_mm_backward``)."""

import torch

from ds_kernels import dispatch
from ds_kernels.ops.checks import (GEMM_DTYPES, check_same_device, check_same_dtype,
                                   check_tensor, device_checks_allowed)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """out [M, N]: rows offs[e-1]:offs[e] of a [M, K] times b[e] ([E, K, N], any strides).

    offs: int32 [E], non-decreasing cumulative row ends (offs[-1] <= M). Rows past offs[-1]
    come out 0. Accumulates in fp32; output in a's dtype.
    """
    if dispatch.direct_call_allowed(a, b):
        return _grouped_mm(a, b, offs)  # checks the arguments itself
    _check(a, b, offs)  # before torch.ops, whose own type errors name no argument
    return torch.ops.ds_kernels.grouped_mm(a, b, offs)


def _check(a, b, offs):
    check_tensor("a", a, dim=2, dtypes=GEMM_DTYPES)
    check_tensor("b", b, dim=3, dtypes=GEMM_DTYPES)
    check_tensor("offs", offs, dim=1, dtypes=(torch.int32,))
    check_same_dtype("a", a, b=b)
    if b.shape[1] != a.shape[1]:
        raise ValueError(f"a is [M, K] = {tuple(a.shape)} but b is [E, K, N] = {tuple(b.shape)}: "
                         "K differs")
    if b.shape[0] == 0 or offs.shape[0] != b.shape[0]:
        raise ValueError(f"offs must have one entry per group of b (E={b.shape[0]} >= 1), "
                         f"got shape {tuple(offs.shape)}")
    check_same_device("a", a, b=b, offs=offs)


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
    return torch.empty_like(a), b.new_empty(b.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    a, b, offs = ctx.saved_tensors
    grad_a, grad_b = torch.ops.ds_kernels.grouped_mm_backward(grad_out, a, b, offs)
    return grad_a, grad_b, None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)
