"""The MoE experts on the torch path: sort the T*k assignments by expert once, then two grouped
GEMMs over contiguous runs (no Python loop over experts where torch's grouped_mm applies).

The backward recomputes the first GEMM rather than keeping [T*k, 2I] activations alive
between forward and backward (the same choice as the Triton path).
"""

import torch
import torch.nn.functional as F

from ds_kernels.cpu.grouped_mm import grouped_matmul, grouped_matmul_tn


def _sort_by_expert(topk_ids, num_experts):
    flat = topk_ids.reshape(-1)                                   # [N = T*k]
    order = torch.sort(flat, stable=True).indices                 # [N] assignment per slot
    offs = torch.bincount(flat, minlength=num_experts).cumsum(0)  # [E]
    return order, offs


def _up(hidden, w13, order, offs, k):
    x = hidden[order // k]                                        # [N, H] token of each slot
    gate_up = grouped_matmul(x, w13.transpose(1, 2), offs)        # [N, 2I]
    return x, gate_up


def fused_moe(hidden, w13, w2, topk_weights, topk_ids):
    T, H = hidden.shape
    k = topk_ids.shape[1]
    order, offs = _sort_by_expert(topk_ids, w13.shape[0])
    _, gate_up = _up(hidden, w13, order, offs, k)
    gate, up = gate_up.chunk(2, dim=-1)
    y = grouped_matmul(F.silu(gate) * up, w2.transpose(1, 2), offs)  # [N, H]
    acc = torch.promote_types(hidden.dtype, torch.float32)
    weighted = y.to(acc) * topk_weights.reshape(-1)[order].to(acc).unsqueeze(1)
    by_assignment = torch.empty_like(weighted)
    by_assignment[order] = weighted
    return by_assignment.view(T, k, H).sum(dim=1).to(hidden.dtype)


def fused_moe_backward(grad_out, hidden, w13, w2, topk_weights, topk_ids):
    T, H = hidden.shape
    k = topk_ids.shape[1]
    order, offs = _sort_by_expert(topk_ids, w13.shape[0])
    acc = torch.promote_types(hidden.dtype, torch.float32)
    x, gate_up = _up(hidden, w13, order, offs, k)
    gate, up = gate_up.to(acc).chunk(2, dim=-1)                   # [N, I] each
    silu = F.silu(gate)
    act = (silu * up).to(hidden.dtype)                            # [N, I]
    g = grad_out[order // k]                                      # [N, H] d out of each slot
    weight = topk_weights.reshape(-1)[order].to(acc).unsqueeze(1)  # [N, 1]

    d_act_unweighted = grouped_matmul(g, w2, offs).to(acc)        # [N, I] = g @ w2[e]
    d_weight = torch.empty(order.numel(), dtype=acc, device=hidden.device)
    d_weight[order] = (d_act_unweighted * act.to(acc)).sum(dim=1)
    d_act = d_act_unweighted * weight
    sig = torch.sigmoid(gate)
    d_gate = d_act * up * sig * (1 + gate * (1 - sig))            # silu'(g) = s (1 + g (1 - s))
    d_gate_up = torch.cat([d_gate, d_act * silu], dim=1).to(hidden.dtype)  # [N, 2I]

    d_x = grouped_matmul(d_gate_up, w13, offs)                    # [N, H]
    d_hidden = torch.zeros(T, H, dtype=acc, device=hidden.device)
    d_hidden.index_add_(0, order // k, d_x.to(acc))
    d_w13 = grouped_matmul_tn(d_gate_up, x, offs)                 # [E, 2I, H]
    d_w2 = grouped_matmul_tn((g.to(acc) * weight).to(hidden.dtype), act, offs)  # [E, H, I]
    return (d_hidden.to(hidden.dtype), d_w13.to(w13.dtype), d_w2.to(w2.dtype),
            d_weight.view(T, k).to(topk_weights.dtype))
