"""ds_kernels.fused_moe: the routed experts of a DeepSeek MoE layer in one op,
``torch.ops.ds_kernels.fused_moe``, differentiable in hidden, w13, w2 and topk_weights
(backward: ``torch.ops.ds_kernels.fused_moe_backward``)."""

import torch

from ds_kernels import dispatch
from ds_kernels.ops.checks import (GEMM_DTYPES, INDEX_DTYPES, check_ids_in_range,
                                   check_same_device, check_same_dtype, check_tensor)

ACTIVATIONS = ("silu",)


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
              activation: str = "silu") -> torch.Tensor:
    """out [T, H] = sum_j topk_weights[t, j] * w2[e] @ (silu(g) * u), e = topk_ids[t, j],
    [g, u] = w13[e] @ hidden[t] (gate rows first, as transformers' DeepseekV3Experts and vLLM).

    hidden [T, H]; w13 [E, 2I, H]; w2 [E, H, I] (same dtype as hidden, any strides);
    topk_weights [T, k] (any float dtype); topk_ids [T, k] int32/int64 in [0, E).
    Accumulates in fp32; output in hidden's dtype. Index and weight tensors may be any strided
    or expanded views.

    fp16 limit: the intermediate silu(g) * u and each expert's output are held in fp16 between
    the GEMMs, as transformers and vLLM hold them; beyond +-65504 they become inf, and that
    token's output is then inf or NaN - never a finite wrong value. bf16 and fp32 have the
    range of fp32 (the reference computes in fp64 and has no such limit).
    """
    if activation not in ACTIVATIONS:  # not an argument of the op: checked here
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if dispatch.direct_call_allowed(hidden, w13, w2, topk_weights, topk_ids):
        return _fused_moe(hidden, w13, w2, topk_weights, topk_ids)  # checks the arguments itself
    _check(hidden, w13, w2, topk_weights, topk_ids)  # before torch.ops, whose errors name nothing
    return torch.ops.ds_kernels.fused_moe(hidden, w13, w2, topk_weights, topk_ids)


def _check(hidden, w13, w2, topk_weights, topk_ids):
    check_tensor("hidden", hidden, dim=2, dtypes=GEMM_DTYPES)
    check_tensor("w13", w13, dim=3, dtypes=GEMM_DTYPES)
    check_tensor("w2", w2, dim=3, dtypes=GEMM_DTYPES)
    check_tensor("topk_weights", topk_weights, dim=2, dtypes=GEMM_DTYPES)
    check_tensor("topk_ids", topk_ids, dim=2, dtypes=INDEX_DTYPES)
    check_same_dtype("hidden", hidden, w13=w13, w2=w2)
    T, H = hidden.shape
    E, two_i, h13 = w13.shape
    if h13 != H or two_i % 2:
        raise ValueError(f"w13 must be [E, 2I, H={H}], got {tuple(w13.shape)}")
    if tuple(w2.shape) != (E, H, two_i // 2):
        raise ValueError(f"w2 must be [E={E}, H={H}, I={two_i // 2}], got {tuple(w2.shape)}")
    if topk_ids.shape[0] != T or topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids must be [T={T}, k>=1], got {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} and topk_ids "
                         f"{tuple(topk_ids.shape)} must have the same shape [T, k]")
    check_same_device("hidden", hidden, w13=w13, w2=w2, topk_weights=topk_weights,
                      topk_ids=topk_ids)


def _fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    _check(hidden, w13, w2, topk_weights, topk_ids)
    check_ids_in_range("topk_ids", topk_ids, w13.shape[0])
    return dispatch.implementation("fused_moe", hidden.device)(
        hidden, w13, w2, topk_weights, topk_ids)


_fused_moe_op = torch.library.custom_op("ds_kernels::fused_moe", _fused_moe, mutates_args=())


@_fused_moe_op.register_fake
def _(hidden, w13, w2, topk_weights, topk_ids):
    _check(hidden, w13, w2, topk_weights, topk_ids)
    return torch.empty_like(hidden)


@torch.library.custom_op("ds_kernels::fused_moe_backward", mutates_args=())
def _fused_moe_backward_op(grad_out: torch.Tensor, hidden: torch.Tensor, w13: torch.Tensor,
                           w2: torch.Tensor, topk_weights: torch.Tensor,
                           topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                            torch.Tensor, torch.Tensor]:
    return dispatch.implementation("fused_moe_backward", hidden.device)(
        grad_out.contiguous(), hidden, w13, w2, topk_weights, topk_ids)


@_fused_moe_backward_op.register_fake
def _(grad_out, hidden, w13, w2, topk_weights, topk_ids):
    return (torch.empty_like(hidden), w13.new_empty(w13.shape), w2.new_empty(w2.shape),
            torch.empty_like(topk_weights))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    grads = torch.ops.ds_kernels.fused_moe_backward(grad_out, *ctx.saved_tensors)
    return (*grads, None)


_fused_moe_op.register_autograd(_backward, setup_context=_setup_context)
