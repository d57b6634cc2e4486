"""Reference MoE experts: for each expert, the tokens routed to it, in plain torch.

out[t] = sum_j topk_weights[t, j] * w2[e] @ (silu(g) * u), e = topk_ids[t, j],
g, u = (w13[e] @ hidden[t]).chunk(2): gate first, as transformers' DeepseekV3Experts and vLLM.
With DeepSeek-V4's swiglu_limit: silu(min(g, limit)) * clamp(u, -limit, limit), as
transformers' DeepseekV4Experts clamp them (swiglu; swiglu_backward is its gradient, shared by
the backends' backward passes).
Math in fp64 (the exact answer the kernels approach), output in hidden's dtype.

Quantised experts (w13_scale, w2_scale given): the same on the weights dequantised by the
reference recipe (ds_kernels/reference/quantize.py). They are frozen: no gradient for them.
w8a8 (FP8 experts, act_quant="fp8"; forward only): each GEMM's input rows are quantised to
e4m3 per 128 columns and back first - hidden, and act = silu(g) * u after rounding to hidden's
dtype, where the kernels hold it between the GEMMs.
"""

import torch
import torch.nn.functional as F

from ds_kernels.reference.autograd import grads_through
from ds_kernels.reference.quantize import dequantize, fake_quantize_fp8_activations


def swiglu(gate, up, limit=None):
    """silu(gate) * up; with a limit, of gate clamped to <= limit and up to [-limit, limit]."""
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return F.silu(gate) * up


def swiglu_backward(gate, up, d_act, limit=None):
    """(swiglu(gate, up, limit), d gate, d up) for d_act, the gradient of swiglu's output,
    as autograd takes it: the clamps pass the gradient where the input is within their
    (inclusive) bounds and nothing elsewhere, torch.clamp's rule."""
    g, u = (gate, up) if limit is None else (gate.clamp(max=limit), up.clamp(-limit, limit))
    sig = torch.sigmoid(g)
    silu = g * sig
    d_gate = d_act * u * sig * (1 + g * (1 - sig))               # silu'(g) = s (1 + g (1 - s))
    d_up = d_act * silu
    if limit is not None:
        d_gate = torch.where(gate <= limit, d_gate, 0.0)
        d_up = torch.where(up.abs() <= limit, d_up, 0.0)
    return silu * u, d_gate, d_up


def fused_moe(hidden, w13, w2, topk_weights, topk_ids, w13_scale=None, w2_scale=None,
              w8a8=False, swiglu_limit=None):
    if w13_scale is not None:
        w13, w2 = dequantize(w13, w13_scale), dequantize(w2, w2_scale)
    source = fake_quantize_fp8_activations(hidden) if w8a8 else hidden
    T, H = hidden.shape
    E = w13.shape[0]
    out = torch.zeros(T, H, dtype=torch.float64, device=hidden.device)
    for e in range(E):
        token, slot = (topk_ids == e).nonzero(as_tuple=True)     # assignments to e
        if token.numel() == 0:
            continue
        gate_up = source[token].double() @ w13[e].double().t()       # [n, 2I]
        act = swiglu(*gate_up.chunk(2, dim=-1), swiglu_limit)
        if w8a8:
            act = fake_quantize_fp8_activations(act.to(hidden.dtype)).double()
        y = act @ w2[e].double().t()                                 # [n, H]
        weight = topk_weights[token, slot].double().unsqueeze(-1)
        out.index_add_(0, token, weight * y)
    return out.to(hidden.dtype)


def fused_moe_backward(grad_out, hidden, w13, w2, topk_weights, topk_ids, w13_scale=None,
                       w2_scale=None, swiglu_limit=None):
    """(d hidden, d w13, d w2, d topk_weights) by autograd through the reference; d w13 and
    d w2 are None for quantised weights."""
    if w13_scale is None:
        return grads_through(
            lambda *inputs: fused_moe(*inputs, topk_ids, swiglu_limit=swiglu_limit),
            (hidden, w13, w2, topk_weights), grad_out)
    w13, w2 = dequantize(w13, w13_scale), dequantize(w2, w2_scale)
    d_hidden, d_topk_weights = grads_through(
        lambda hidden, topk_weights: fused_moe(hidden, w13, w2, topk_weights, topk_ids,
                                               swiglu_limit=swiglu_limit),
        (hidden, topk_weights), grad_out)
    return d_hidden, None, None, d_topk_weights
