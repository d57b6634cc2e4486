"""Reference MoE experts: for each expert, the tokens routed to it, in plain torch.

out[t] = sum_j topk_weights[t, j] * w2[e] @ (silu(g) * u), e = topk_ids[t, j],
g, u = (w13[e] @ hidden[t]).chunk(2): gate first, as transformers' DeepseekV3Experts and vLLM.
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


def fused_moe(hidden, w13, w2, topk_weights, topk_ids, w13_scale=None, w2_scale=None,
              w8a8=False):
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
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate) * up
        if w8a8:
            act = fake_quantize_fp8_activations(act.to(hidden.dtype)).double()
        y = act @ w2[e].double().t()                                 # [n, H]
        weight = topk_weights[token, slot].double().unsqueeze(-1)
        out.index_add_(0, token, weight * y)
    return out.to(hidden.dtype)


def fused_moe_backward(grad_out, hidden, w13, w2, topk_weights, topk_ids, w13_scale=None,
                       w2_scale=None):
    """(d hidden, d w13, d w2, d topk_weights) by autograd through the reference; d w13 and
    d w2 are None for quantised weights."""
    if w13_scale is None:
        return grads_through(fused_moe, (hidden, w13, w2, topk_weights), grad_out, topk_ids)
    w13, w2 = dequantize(w13, w13_scale), dequantize(w2, w2_scale)
    d_hidden, d_topk_weights = grads_through(
        lambda hidden, topk_weights: fused_moe(hidden, w13, w2, topk_weights, topk_ids),
        (hidden, topk_weights), grad_out)
    return d_hidden, None, None, d_topk_weights
