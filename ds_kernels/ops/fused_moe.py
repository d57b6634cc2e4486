"""ds_kernels.fused_moe: the routed experts of a DeepSeek MoE layer in one op,
``torch.ops.ds_kernels.fused_moe``, differentiable in hidden, w13, w2 and topk_weights
(backward: ``torch.ops.ds_kernels.fused_moe_backward``); on quantised experts,
``torch.ops.ds_kernels.fused_moe_quant``, differentiable in hidden and topk_weights (the
weights' code bytes and e8m0 scales travel as uint8, as in ds_kernels/ops/grouped_mm.py)."""

import torch

from ds_kernels import dispatch
from ds_kernels.ops.checks import (GEMM_DTYPES, INDEX_DTYPES, check_finite_float, check_frozen,
                                   check_ids_in_range, check_same_device, check_same_dtype,
                                   check_tensor)
from ds_kernels.ops.quantize import as_bytes, check_quantized, from_bytes, w8a8_of
from ds_kernels.quant_formats import format_of, in_features

ACTIVATIONS = ("silu",)


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
              activation: str = "silu", w13_scale: torch.Tensor | None = None,
              w2_scale: torch.Tensor | None = None, act_quant: str | None = None,
              swiglu_limit: float | None = None) -> torch.Tensor:
    """out [T, H] = sum_j topk_weights[t, j] * w2[e] @ (silu(g) * u), e = topk_ids[t, j],
    [g, u] = w13[e] @ hidden[t] (gate rows first, as transformers' DeepseekV3Experts and vLLM).
    swiglu_limit (DeepSeek-V4, a float > 0): silu(min(g, limit)) * clamp(u, -limit, limit),
    the clamp in the first GEMM's epilogue; its gradient is torch.clamp's (none where an input
    was clamped).

    hidden [T, H]; w13 [E, 2I, H]; w2 [E, H, I] (same dtype as hidden, any strides);
    topk_weights [T, k] (any float dtype); topk_ids [T, k] int32/int64 in [0, E).
    Accumulates in fp32; output in hidden's dtype. Index and weight tensors may be any strided
    or expanded views.

    Quantised experts, as DeepSeek's checkpoints ship them (ds_kernels.quantize_fp8_block,
    quantize_mxfp4): w13, w2 both FP8 - float8_e4m3fn [E, 2I, H] / [E, H, I] with w13_scale /
    w2_scale fp32 or float8_e8m0fnu [E, ceil(2I/128), ceil(H/128)] / [E, ceil(H/128),
    ceil(I/128)] - or both MXFP4 - float4_e2m1fn_x2 [E, 2I, H/2] / [E, H, I/2] with
    float8_e8m0fnu [E, 2I, H/32] / [E, H, I/32]. Meaning: fused_moe on the dequantised weights
    (ds_kernels.dequantize), hidden in any float dtype. Weight-only: activations stay
    unquantised, each weight tile is dequantised inside the GEMMs (never the whole stack),
    accumulating in fp32. The experts are frozen: differentiable in hidden and topk_weights.

    ``act_quant="fp8"`` (FP8 experts; inference): w8a8, DeepSeek-V3's fp8 GEMMs and DeepGEMM's
    recipe - each GEMM's input rows (hidden, then silu(g) * u held in hidden's dtype) are
    quantised to e4m3 per token and 128 columns (scale max(amax, 1e-4) / 448) as they are
    gathered, and multiplied by the e4m3 weights on FP8 tensor cores (sm_89+; RuntimeError on
    older GPUs; on CPU the same numerics, no faster). Its result is the reference's on those
    quantised activations, to the dtype's tolerance plus one e4m3 step of an act element
    wherever accumulation order moves it across a rounding boundary; against the unquantised
    activations, each element carries e4m3's rounding (up to 2^-4 relative). A 128-group with
    NaN or inf makes its token's outputs NaN. No gradient: RuntimeError if one is needed.
    grouped_mm(..., act_quant="fp8") is the same GEMM alone.

    fp16 limit: the intermediate silu(g) * u and each expert's output are held in fp16 between
    the GEMMs, as transformers and vLLM hold them; beyond +-65504 they become inf, and that
    token's output is then inf or NaN - never a finite wrong value. bf16 and fp32 have the
    range of fp32 (the reference computes in fp64 and has no such limit).
    """
    if activation not in ACTIVATIONS:  # not an argument of the op: checked here
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    args = (hidden, w13, w2, topk_weights, topk_ids)
    if swiglu_limit is not None:
        _check_limit(swiglu_limit)
        swiglu_limit = float(swiglu_limit)
    fmt = None if act_quant is None else _check(*args, w13_scale, w2_scale)
    w8a8 = w8a8_of("fused_moe", act_quant, "w13 and w2", w13, fmt, hidden, topk_weights)
    if w13_scale is None and w2_scale is None:
        if dispatch.direct_call_allowed(*args):
            return _fused_moe(*args, swiglu_limit)  # checks the arguments itself
        _check(*args)  # before torch.ops, whose errors name nothing
        return torch.ops.ds_kernels.fused_moe(*args, swiglu_limit)
    if dispatch.direct_call_allowed(*args, w13_scale, w2_scale):  # no tensor requires grad
        return _run_quantized(*args, w13_scale, w2_scale, w8a8, swiglu_limit)  # checks them
    fmt = _check(*args, w13_scale, w2_scale)
    check_frozen("fused_moe", w13=w13, w2=w2, w13_scale=w13_scale, w2_scale=w2_scale)
    return torch.ops.ds_kernels.fused_moe_quant(hidden, *as_bytes(w13, w13_scale),
                                                *as_bytes(w2, w2_scale), topk_weights,
                                                topk_ids, fmt, w8a8, swiglu_limit)


def _check_limit(swiglu_limit):
    check_finite_float("swiglu_limit", swiglu_limit)
    if not swiglu_limit > 0:
        raise ValueError(f"swiglu_limit must be > 0 (or None), got {swiglu_limit}")


def _check(hidden, w13, w2, topk_weights, topk_ids, w13_scale=None, w2_scale=None):
    """The experts' format: None (unquantised), "fp8" or "mxfp4"."""
    check_tensor("hidden", hidden, dim=2, dtypes=GEMM_DTYPES)
    fmt = _experts_format(w13, w2, w13_scale, w2_scale)
    check_tensor("topk_weights", topk_weights, dim=2, dtypes=GEMM_DTYPES)
    check_tensor("topk_ids", topk_ids, dim=2, dtypes=INDEX_DTYPES)
    if fmt is None:
        check_same_dtype("hidden", hidden, w13=w13, w2=w2)
    packed = "" if fmt is None else f" ({fmt} codes: {tuple(w13.shape)}, {tuple(w2.shape)})"
    T, H = hidden.shape
    E, two_i, h13 = (*w13.shape[:2], in_features(w13, fmt))
    if h13 != H or two_i % 2:
        raise ValueError(f"w13 must be [E, 2I, H={H}], got {(E, two_i, h13)}{packed}")
    w2_shape = (*w2.shape[:2], in_features(w2, fmt))
    if w2_shape != (E, H, two_i // 2):
        raise ValueError(f"w2 must be [E={E}, H={H}, I={two_i // 2}], got {w2_shape}{packed}")
    if topk_ids.shape[0] != T or topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids must be [T={T}, k>=1], got {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} and topk_ids "
                         f"{tuple(topk_ids.shape)} must have the same shape [T, k]")
    check_same_device("hidden", hidden, w13=w13, w2=w2, topk_weights=topk_weights,
                      topk_ids=topk_ids, w13_scale=w13_scale, w2_scale=w2_scale)
    return fmt


def _experts_format(w13, w2, w13_scale, w2_scale):
    """The common format of w13 and w2 (None: unquantised); raises, naming the tensor, if a
    weight and its scale do not fit or the two weights differ."""
    formats = []
    for name, w, scale in (("w13", w13, w13_scale), ("w2", w2, w2_scale)):
        check_tensor(name, w, dim=3)
        if scale is None:
            if format_of(w) is not None:
                raise TypeError(f"{name} is {w.dtype}, a quantised weight: pass its scales as "
                                f"{name}_scale")
            check_tensor(name, w, dim=3, dtypes=GEMM_DTYPES)
            formats.append(None)
        else:
            if format_of(w) is None:
                raise TypeError(f"{name}_scale is given, so {name} must be quantised "
                                f"(float8_e4m3fn or float4_e2m1fn_x2), got {w.dtype}")
            formats.append(check_quantized(name, w, f"{name}_scale", scale, dim=3))
    if formats[0] != formats[1]:
        kinds = [fmt or f"unquantised {w.dtype}" for fmt, w in zip(formats, (w13, w2))]
        raise ValueError(f"w13 and w2 must be quantised alike (both unquantised, both fp8 or "
                         f"both mxfp4), got w13 {kinds[0]} and w2 {kinds[1]}")
    return formats[0]


# swiglu_limit last, with its default, so that the op's earlier positional form stays valid.
def _fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
               topk_weights: torch.Tensor, topk_ids: torch.Tensor,
               swiglu_limit: float | None = None) -> torch.Tensor:
    _check(hidden, w13, w2, topk_weights, topk_ids)
    if swiglu_limit is not None:
        _check_limit(swiglu_limit)
    check_ids_in_range("topk_ids", topk_ids, w13.shape[0])
    return dispatch.implementation("fused_moe", hidden.device)(
        hidden, w13, w2, topk_weights, topk_ids, swiglu_limit=swiglu_limit)


_fused_moe_op = torch.library.custom_op("ds_kernels::fused_moe", _fused_moe, mutates_args=())


@_fused_moe_op.register_fake
def _(hidden, w13, w2, topk_weights, topk_ids, swiglu_limit=None):
    _check(hidden, w13, w2, topk_weights, topk_ids)
    return hidden.new_empty(hidden.shape)


@torch.library.custom_op("ds_kernels::fused_moe_backward", mutates_args=())
def _fused_moe_backward_op(grad_out: torch.Tensor, hidden: torch.Tensor, w13: torch.Tensor,
                           w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                           swiglu_limit: float | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return dispatch.implementation("fused_moe_backward", hidden.device)(
        grad_out.contiguous(), hidden, w13, w2, topk_weights, topk_ids,
        swiglu_limit=swiglu_limit)


@_fused_moe_backward_op.register_fake
def _(grad_out, hidden, w13, w2, topk_weights, topk_ids, swiglu_limit=None):
    return (hidden.new_empty(hidden.shape), w13.new_empty(w13.shape), w2.new_empty(w2.shape),
            topk_weights.new_empty(topk_weights.shape))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.swiglu_limit = inputs[5] if len(inputs) > 5 else None


def _backward(ctx, grad_out):
    grads = torch.ops.ds_kernels.fused_moe_backward(grad_out, *ctx.saved_tensors,
                                                    ctx.swiglu_limit)
    return (*grads, None, None)


_fused_moe_op.register_autograd(_backward, setup_context=_setup_context)


def _run_quantized(hidden, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, w8a8,
                   swiglu_limit):
    _check(hidden, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)
    if swiglu_limit is not None:
        _check_limit(swiglu_limit)
    check_ids_in_range("topk_ids", topk_ids, w13.shape[0])
    return dispatch.implementation("fused_moe", hidden.device)(
        hidden, w13, w2, topk_weights, topk_ids, w13_scale=w13_scale, w2_scale=w2_scale,
        w8a8=w8a8, swiglu_limit=swiglu_limit)


@torch.library.custom_op("ds_kernels::fused_moe_quant", mutates_args=())
def _fused_moe_quant_op(hidden: torch.Tensor, w13_codes: torch.Tensor,
                        w13_scales: torch.Tensor, w2_codes: torch.Tensor,
                        w2_scales: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor, fmt: str, w8a8: bool,
                        swiglu_limit: float | None = None) -> torch.Tensor:
    w13, w13_scale = from_bytes(w13_codes, w13_scales, fmt)
    w2, w2_scale = from_bytes(w2_codes, w2_scales, fmt)
    return _run_quantized(hidden, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, w8a8,
                          swiglu_limit)


@_fused_moe_quant_op.register_fake
def _(hidden, w13_codes, w13_scales, w2_codes, w2_scales, topk_weights, topk_ids, fmt, w8a8,
      swiglu_limit=None):
    w13, w13_scale = from_bytes(w13_codes, w13_scales, fmt)
    w2, w2_scale = from_bytes(w2_codes, w2_scales, fmt)
    _check(hidden, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)
    return hidden.new_empty(hidden.shape)


@torch.library.custom_op("ds_kernels::fused_moe_quant_backward", mutates_args=())
def _fused_moe_quant_backward_op(grad_out: torch.Tensor, hidden: torch.Tensor,
                                 w13_codes: torch.Tensor, w13_scales: torch.Tensor,
                                 w2_codes: torch.Tensor, w2_scales: torch.Tensor,
                                 topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                                 fmt: str, swiglu_limit: float | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(d hidden, d topk_weights): the experts are frozen."""
    w13, w13_scale = from_bytes(w13_codes, w13_scales, fmt)
    w2, w2_scale = from_bytes(w2_codes, w2_scales, fmt)
    d_hidden, _, _, d_topk_weights = dispatch.implementation("fused_moe_backward",
                                                             hidden.device)(
        grad_out.contiguous(), hidden, w13, w2, topk_weights, topk_ids, w13_scale=w13_scale,
        w2_scale=w2_scale, swiglu_limit=swiglu_limit)
    return d_hidden, d_topk_weights


@_fused_moe_quant_backward_op.register_fake
def _(grad_out, hidden, w13_codes, w13_scales, w2_codes, w2_scales, topk_weights, topk_ids,
      fmt, swiglu_limit=None):
    return hidden.new_empty(hidden.shape), topk_weights.new_empty(topk_weights.shape)


def _setup_quantized_context(ctx, inputs, output):
    tensors, (ctx.fmt, w8a8) = inputs[:7], inputs[7:9]
    ctx.swiglu_limit = inputs[9] if len(inputs) > 9 else None
    if w8a8:  # fused_moe refuses this before the op; the op's own callers get it here
        raise RuntimeError("fused_moe_quant with w8a8 has no gradient (act_quant='fp8' is "
                           "for inference)")
    ctx.save_for_backward(*tensors)


def _quantized_backward(ctx, grad_out):
    d_hidden, d_topk_weights = torch.ops.ds_kernels.fused_moe_quant_backward(
        grad_out, *ctx.saved_tensors, ctx.fmt, ctx.swiglu_limit)
    return d_hidden, None, None, None, None, d_topk_weights, None, None, None, None


_fused_moe_quant_op.register_autograd(_quantized_backward,
                                      setup_context=_setup_quantized_context)
