"""ds_kernels.apply_rope: rotary position embedding as ``torch.ops.ds_kernels.apply_rope``,
differentiable in x (the backward of a rotation is the opposite rotation: the same op with -sin).

How the two layouts map onto the models:
- interleaved=True rotates adjacent pairs (x[2i], x[2i+1]): DeepSeek-V3's inference/model.py
  (apply_rotary_emb: view_as_complex of adjacent pairs times freqs_cis), output interleaved.
- interleaved=False rotates (x[i], x[i + D/2]): transformers' apply_rotary_pos_emb
  (rotate_half), with its cos/sin = cat(cos, cos) / cat(sin, sin) of ours.
- transformers' DeepseekV3 with config.rope_interleave=True (the default) calls
  apply_rotary_pos_emb_interleave: it rotates the same adjacent pairs as interleaved=True but
  returns them de-interleaved, cat(all first members, all second members). So its output is
  ours (interleaved=True) permuted: theirs[..., :D/2] == ours[..., 0::2] and theirs[..., D/2:]
  == ours[..., 1::2]. q and k get the same permutation, so every q.k score is unchanged; only
  the order of k_pe's columns in a cache differs (transformers' holds the halves order).
- transformers rotates in x's dtype with cos/sin cast to it; we (like DeepSeek's model.py)
  rotate in fp32 and round once, so bf16 results may differ from transformers' by an ulp.
"""

import torch

from ds_kernels import dispatch
from ds_kernels.ops.checks import GEMM_DTYPES, check_same_device, check_tensor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
               interleaved: bool) -> torch.Tensor:
    """out [T, H, D] or [T, D] = x with each pair (x1, x2) of the last dim rotated:
    (x1 cos - x2 sin, x2 cos + x1 sin), pairs adjacent (interleaved) or D/2 apart.

    x [T, H, D] or [T, D] (fp16/bf16/fp32; fp64 for gradcheck; any strides, e.g. the rope part
    of q); cos, sin [T, D/2], already gathered at each token's position (fp32 from
    ds_kernels.rope.rope_cos_sin; any float dtype is read as fp32). Math in fp32; output in x's
    dtype, contiguous. Not differentiable in cos and sin (they get no gradient).
    """
    if dispatch.direct_call_allowed(x, cos, sin):
        return _apply_rope(x, cos, sin, interleaved)  # checks the arguments itself
    _check(x, cos, sin, interleaved)  # before torch.ops, whose own type errors name no argument
    return torch.ops.ds_kernels.apply_rope(x, cos, sin, interleaved)


def check_rope(x_name, x, cos, sin, interleaved):
    """x [T, D] (rows of 2-D x) or [T, H, D] with D even, and its tables cos, sin [T, D/2]."""
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")
    check_tensor("cos", cos, dim=2, dtypes=GEMM_DTYPES)
    check_tensor("sin", sin, dim=2, dtypes=GEMM_DTYPES)
    D = x.shape[-1]
    if D < 2 or D % 2:
        raise ValueError(f"the rope dim (last dim of {x_name}) must be even and >= 2, got {D}")
    for name, table in (("cos", cos), ("sin", sin)):
        if tuple(table.shape) != (x.shape[0], D // 2):
            raise ValueError(f"{name} must be [T={x.shape[0]}, D/2={D // 2}] (one row per token "
                             f"of {x_name}), got {tuple(table.shape)}")
    check_same_device(x_name, x, cos=cos, sin=sin)


def _check(x, cos, sin, interleaved):
    check_tensor("x", x, dtypes=GEMM_DTYPES)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be [T, D] or [T, H, D], got shape {tuple(x.shape)}")
    check_rope("x", x, cos, sin, interleaved)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                interleaved: bool) -> torch.Tensor:
    _check(x, cos, sin, interleaved)
    return dispatch.implementation("apply_rope", x.device)(x, cos, sin, interleaved)


_apply_rope_op = torch.library.custom_op("ds_kernels::apply_rope", _apply_rope, mutates_args=())


@_apply_rope_op.register_fake
def _(x, cos, sin, interleaved):
    _check(x, cos, sin, interleaved)
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    _, cos, sin, interleaved = inputs
    ctx.save_for_backward(cos, sin)
    ctx.interleaved = interleaved


def _backward(ctx, grad_out):
    cos, sin = ctx.saved_tensors
    grad_x = torch.ops.ds_kernels.apply_rope(grad_out, cos, -sin, ctx.interleaved)
    return grad_x, None, None, None


_apply_rope_op.register_autograd(_backward, setup_context=_setup_context)
