"""ds_kernels.mhc_pre, ds_kernels.mhc_post: DeepSeek-V4's manifold-constrained
hyper-connections (ds_kernels/reference/mhc.py) as ``torch.ops.ds_kernels.mhc_pre`` /
``mhc_post``, differentiable in every tensor (backward: ``..._backward``, torch code on every
backend). A V4 block runs mhc_pre on its n residual streams, its attention or MoE on the
collapsed row, then mhc_post to write the n new streams."""

import torch

from ds_kernels import dispatch
from ds_kernels.ops.checks import (FLOAT_DTYPES, check_finite_float, check_int,
                                   check_same_device, check_same_dtype, check_tensor)
from ds_kernels.ops.rms_norm import check_eps


def mhc_pre(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
            *, norm_eps: float, hc_eps: float, sinkhorn_iters: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(collapsed [T, D] in streams' dtype, post fp32 [T, n], comb fp32 [T, n, n]) of the n
    residual streams [T, n, D] entering a V4 block: transformers' DeepseekV4HyperConnection
    (fn [(2 + n) n, n D], base [(2 + n) n], scale [3]: its hc parameters, any float dtype; math
    in fp32). norm_eps: the streams' RMSNorm eps (config.rms_norm_eps); hc_eps: config.hc_eps;
    sinkhorn_iters: config.hc_sinkhorn_iters (>= 1). Formulas: ds_kernels/reference/mhc.py.
    """
    args = (streams, fn, base, scale, float(norm_eps), float(hc_eps), sinkhorn_iters)
    if dispatch.direct_call_allowed(streams, fn, base, scale):
        return _mhc_pre(*args)  # checks the arguments itself
    _check_pre(*args)  # before torch.ops, whose own type errors name no argument
    return torch.ops.ds_kernels.mhc_pre(*args)


def mhc_post(streams: torch.Tensor, out: torch.Tensor, post: torch.Tensor,
             comb: torch.Tensor) -> torch.Tensor:
    """The n new streams [T, n, D] (streams' dtype, fp32 accumulation) after a V4 block whose
    output is out [T, D] (streams' dtype): post[k] out + sum_j comb[j, k] streams[j], with
    post [T, n] and comb [T, n, n] from mhc_pre (any float dtype)."""
    args = (streams, out, post, comb)
    if dispatch.direct_call_allowed(*args):
        return _mhc_post(*args)
    _check_post(*args)
    return torch.ops.ds_kernels.mhc_post(*args)


def _check_streams(streams):
    check_tensor("streams", streams, dim=3, dtypes=FLOAT_DTYPES + (torch.float64,))
    T, n, D = streams.shape
    if n < 1 or D < 1:
        raise ValueError(f"streams must be [T, n >= 1, D >= 1], got {tuple(streams.shape)}")
    return T, n, D


def _check_pre(streams, fn, base, scale, norm_eps, hc_eps, sinkhorn_iters):
    T, n, D = _check_streams(streams)
    m = (2 + n) * n
    for name, t, shape in (("fn", fn, (m, n * D)), ("base", base, (m,)), ("scale", scale, (3,))):
        check_tensor(name, t, dim=len(shape), dtypes=FLOAT_DTYPES + (torch.float64,))
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)} for n={n} streams of D={D}, got "
                             f"{tuple(t.shape)}")
    check_eps(norm_eps)
    check_finite_float("hc_eps", hc_eps)
    if hc_eps < 0:
        raise ValueError(f"hc_eps must be >= 0, got {hc_eps}")
    check_int("sinkhorn_iters", sinkhorn_iters, low=1)
    check_same_device("streams", streams, fn=fn, base=base, scale=scale)


def _check_post(streams, out, post, comb):
    T, n, D = _check_streams(streams)
    check_tensor("out", out, dim=2)
    check_same_dtype("streams", streams, out=out)
    if tuple(out.shape) != (T, D):
        raise ValueError(f"out must be [T={T}, D={D}], got {tuple(out.shape)}")
    for name, t, shape in (("post", post, (T, n)), ("comb", comb, (T, n, n))):
        check_tensor(name, t, dim=len(shape), dtypes=FLOAT_DTYPES + (torch.float64,))
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)}, got {tuple(t.shape)}")
    check_same_device("streams", streams, out=out, post=post, comb=comb)


def _mhc_pre(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
             norm_eps: float, hc_eps: float, sinkhorn_iters: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_pre(streams, fn, base, scale, norm_eps, hc_eps, sinkhorn_iters)
    return dispatch.implementation("mhc_pre", streams.device)(
        streams, fn, base, scale, norm_eps, hc_eps, sinkhorn_iters)


def _mhc_post(streams: torch.Tensor, out: torch.Tensor, post: torch.Tensor,
              comb: torch.Tensor) -> torch.Tensor:
    _check_post(streams, out, post, comb)
    return dispatch.implementation("mhc_post", streams.device)(streams, out, post, comb)


_mhc_pre_op = torch.library.custom_op("ds_kernels::mhc_pre", _mhc_pre, mutates_args=())
_mhc_post_op = torch.library.custom_op("ds_kernels::mhc_post", _mhc_post, mutates_args=())


@_mhc_pre_op.register_fake
def _(streams, fn, base, scale, norm_eps, hc_eps, sinkhorn_iters):
    _check_pre(streams, fn, base, scale, norm_eps, hc_eps, sinkhorn_iters)
    T, n, D = streams.shape
    return (streams.new_empty(T, D), streams.new_empty(T, n, dtype=torch.float32),
            streams.new_empty(T, n, n, dtype=torch.float32))


@_mhc_post_op.register_fake
def _(streams, out, post, comb):
    _check_post(streams, out, post, comb)
    return streams.new_empty(streams.shape)


@torch.library.custom_op("ds_kernels::mhc_pre_backward", mutates_args=())
def _mhc_pre_backward_op(grad_collapsed: torch.Tensor, grad_post: torch.Tensor,
                         grad_comb: torch.Tensor, streams: torch.Tensor, fn: torch.Tensor,
                         base: torch.Tensor, scale: torch.Tensor, norm_eps: float,
                         hc_eps: float, sinkhorn_iters: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(g.contiguous() for g in dispatch.implementation(
        "mhc_pre_backward", streams.device)(grad_collapsed, grad_post, grad_comb, streams, fn,
                                            base, scale, norm_eps, hc_eps, sinkhorn_iters))


@_mhc_pre_backward_op.register_fake
def _(grad_collapsed, grad_post, grad_comb, streams, fn, base, scale, norm_eps, hc_eps,
      sinkhorn_iters):
    return tuple(t.new_empty(t.shape) for t in (streams, fn, base, scale))


@torch.library.custom_op("ds_kernels::mhc_post_backward", mutates_args=())
def _mhc_post_backward_op(grad_mixed: torch.Tensor, streams: torch.Tensor, out: torch.Tensor,
                          post: torch.Tensor, comb: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(g.contiguous() for g in dispatch.implementation(
        "mhc_post_backward", streams.device)(grad_mixed, streams, out, post, comb))


@_mhc_post_backward_op.register_fake
def _(grad_mixed, streams, out, post, comb):
    return tuple(t.new_empty(t.shape) for t in (streams, out, post, comb))


def _setup_pre(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.constants = inputs[4:]


def _backward_pre(ctx, grad_collapsed, grad_post, grad_comb):
    streams, fn, base, scale = ctx.saved_tensors
    T, n, D = streams.shape
    # Autograd passes None for an output whose gradient is never used (post after the last
    # block, say): zeros then.
    zeros = (streams.new_zeros(T, D), streams.new_zeros(T, n, dtype=torch.float32),
             streams.new_zeros(T, n, n, dtype=torch.float32))
    grads = [z if g is None else g for g, z in zip((grad_collapsed, grad_post, grad_comb), zeros)]
    return (*torch.ops.ds_kernels.mhc_pre_backward(*grads, streams, fn, base, scale,
                                                   *ctx.constants), None, None, None)


def _setup_post(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_post(ctx, grad_mixed):
    return torch.ops.ds_kernels.mhc_post_backward(grad_mixed, *ctx.saved_tensors)


_mhc_pre_op.register_autograd(_backward_pre, setup_context=_setup_pre)
_mhc_post_op.register_autograd(_backward_post, setup_context=_setup_post)
