"""ds_kernels.mla_prefill: variable-length (causal) attention with qk dim != v dim, as
``torch.ops.ds_kernels.mla_prefill``, differentiable in q, k, v and through both outputs
(backward: ``torch.ops.ds_kernels.mla_prefill_backward``)."""

import torch

from ds_kernels import dispatch
from ds_kernels.ops.checks import (GEMM_DTYPES, check_finite_float, check_same_device,
                                   check_same_dtype, check_tensor, device_checks_allowed)

MAX_HEAD_DIM = 256


def mla_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *,
                causal: bool = True, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [T, Hq, Dv] in q's dtype, lse fp32 [T, Hq]): attention within each sequence.

    q, k [T, Hq, Dqk]; v [T, Hq, Dv] (one dtype, any strides; Dqk, Dv <= 256, e.g. 192 = 128
    no-rope + 64 rope and 128 in DeepSeek-V3). cu_seqlens int32 [B + 1]: sequence b is tokens
    cu_seqlens[b]:cu_seqlens[b + 1] (0 = cu_seqlens[0] <= ... <= cu_seqlens[B] = T; empty
    sequences allowed). Scores are softmax_scale * q.k over the keys of the query's own
    sequence, with ``causal`` only keys at or before the query's position. lse is the
    natural-log logsumexp of those scores. Accumulates in fp32. Gradients flow to q, k and v
    from both out and lse.
    """
    if dispatch.direct_call_allowed(q, k, v, cu_seqlens):
        return _mla_prefill(q, k, v, cu_seqlens, causal, softmax_scale)  # checks its arguments
    # Before torch.ops, whose own type errors name no argument.
    _check(q, k, v, cu_seqlens, causal, softmax_scale)
    return torch.ops.ds_kernels.mla_prefill(q, k, v, cu_seqlens, causal, float(softmax_scale))


def _check(q, k, v, cu_seqlens, causal, softmax_scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, dim=3, dtypes=GEMM_DTYPES)
    check_same_dtype("q", q, k=k, v=v)
    T, Hq, Dqk = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape [T, Hq, Dqk] = {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must be [T={T}, Hq={Hq}, Dv], got {tuple(v.shape)}")
    for name, dim in (("Dqk", Dqk), ("Dv", v.shape[2])):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"{name} must be in [1, {MAX_HEAD_DIM}], got {dim}")
    check_tensor("cu_seqlens", cu_seqlens, dim=1, dtypes=(torch.int32,))
    if cu_seqlens.shape[0] == 0 or (cu_seqlens.shape[0] == 1 and T > 0):
        raise ValueError(f"cu_seqlens must be [B + 1] with B >= 1 for T={T} tokens, "
                         f"got shape {tuple(cu_seqlens.shape)}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    check_finite_float("softmax_scale", softmax_scale)
    check_same_device("q", q, k=k, v=v, cu_seqlens=cu_seqlens)


def _check_seqlens(cu_seqlens, T):
    if not device_checks_allowed(cu_seqlens):
        return
    ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == T) & (torch.diff(cu_seqlens) >= 0).all()
    if not bool(ok):  # one device read
        raise ValueError(f"cu_seqlens must be non-decreasing from 0 to T={T}, "
                         f"got {cu_seqlens.tolist()[:16]}")


def _mla_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                 causal: bool, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q, k, v, cu_seqlens, causal, softmax_scale)
    _check_seqlens(cu_seqlens, q.shape[0])
    return dispatch.implementation("mla_prefill", q.device)(
        q, k, v, cu_seqlens, causal, float(softmax_scale))


_mla_prefill_op = torch.library.custom_op("ds_kernels::mla_prefill", _mla_prefill,
                                          mutates_args=())


@_mla_prefill_op.register_fake
def _(q, k, v, cu_seqlens, causal, softmax_scale):
    _check(q, k, v, cu_seqlens, causal, softmax_scale)
    T, Hq, _ = q.shape
    return q.new_empty(T, Hq, v.shape[2]), q.new_empty(T, Hq, dtype=torch.float32)


@torch.library.custom_op("ds_kernels::mla_prefill_backward", mutates_args=())
def _mla_prefill_backward_op(grad_out: torch.Tensor, grad_lse: torch.Tensor, q: torch.Tensor,
                             k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                             lse: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool,
                             softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor,
                                                            torch.Tensor]:
    return dispatch.implementation("mla_prefill_backward", q.device)(
        grad_out, grad_lse, q, k, v, out, lse, cu_seqlens, causal, softmax_scale)


@_mla_prefill_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens, causal, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, causal, softmax_scale = inputs
    ctx.save_for_backward(q, k, v, *output, cu_seqlens)
    ctx.causal, ctx.softmax_scale = causal, softmax_scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    grads = torch.ops.ds_kernels.mla_prefill_backward(
        grad_out, grad_lse, q, k, v, out, lse, cu_seqlens, ctx.causal, float(ctx.softmax_scale))
    return (*grads, None, None, None)


_mla_prefill_op.register_autograd(_backward, setup_context=_setup_context)
