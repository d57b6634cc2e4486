"""Reference MoE experts: for each expert, the tokens routed to it, in plain torch.

out[t] = sum_j topk_weights[t, j] * w2[e] @ (silu(g) * u), e = topk_ids[t, j],
g, u = (w13[e] @ hidden[t]).chunk(2): gate first, as transformers' DeepseekV3Experts and vLLM.
Math in fp64 (the exact answer the kernels approach), output in hidden's dtype.
"""

import torch
import torch.nn.functional as F

from ds_kernels.reference.autograd import grads_through


def fused_moe(hidden, w13, w2, topk_weights, topk_ids):
    T, H = hidden.shape
    E = w13.shape[0]
    out = torch.zeros(T, H, dtype=torch.float64, device=hidden.device)
    for e in range(E):
        token, slot = (topk_ids == e).nonzero(as_tuple=True)     # assignments to e
        if token.numel() == 0:
            continue
        gate_up = hidden[token].double() @ w13[e].double().t()       # [n, 2I]
        gate, up = gate_up.chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ w2[e].double().t()                 # [n, H]
        weight = topk_weights[token, slot].double().unsqueeze(-1)
        out.index_add_(0, token, weight * y)
    return out.to(hidden.dtype)


def fused_moe_backward(grad_out, hidden, w13, w2, topk_weights, topk_ids):
    """(d hidden, d w13, d w2, d topk_weights) by autograd through the reference."""
    return grads_through(fused_moe, (hidden, w13, w2, topk_weights), grad_out, topk_ids)
