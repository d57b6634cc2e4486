"""Fused MoE experts on the grouped GEMM kernels (ds_kernels/kernels/grouped_mm.py).

Forward, for the T*k assignments grouped by moe_align into BLOCK_M-row blocks per expert:
  1. act[slot]  = silu(g) * u, [g, u] = hidden[assignment // k] @ w13[e]^T (V4: g and u
     clamped by swiglu_limit first)
     (the token rows are gathered inside the GEMM: no permuted copy of the activations;
      SwiGLU in the epilogue: the [T*k, 2I] pre-activation is never written)
  2. y[assignment] = topk_weight[assignment] * act[slot] @ w2[e]^T   (weight in the epilogue)
  3. out[t] = sum_j y[t*k + j] in fp32
Step 3 is a plain sum in a fixed order instead of float atomics in step 2: the output is the
same bit for bit on every run, which training and debugging need, for one extra [T*k, H] read.

Backward recomputes step 1's pre-activation instead of saving [T*k, 2I] from the forward.

Quantised experts (w13_scale, w2_scale given: FP8 blocks or MXFP4) run the same GEMMs with
their weight tiles decoded in the K-loop (kernels/grouped_mm.py); they are frozen, so the
backward computes d hidden and d topk_weights only. With w8a8 (FP8 experts, inference) both
GEMMs quantise their input rows to e4m3 as they gather them and multiply on FP8 tensor cores;
act is held in hidden's dtype between the two, as in the weight-only path.
"""

import torch

from ds_kernels import tuning
from ds_kernels.kernels.grouped_mm import check_fp8_tensor_cores, grouped_gemm, grouped_wgrad
from ds_kernels.kernels.moe_align import moe_align
from ds_kernels.quant_formats import FP8_BLOCK, format_of
from ds_kernels.reference.fused_moe import swiglu_backward
from ds_kernels.tuning import gemm_config

def _plan(backward, hidden, w13, w13_scale, topk_ids, w8a8=False):
    T, H = hidden.shape
    E, two_i, _ = w13.shape
    k = topk_ids.shape[1]
    # Keyed like vLLM's tuned files (E, intermediate size; bucket = tokens) so they import.
    kernel = tuning.gemm_kernel(None if w13_scale is None else format_of(w13), backward, w8a8)
    config = gemm_config("fused_moe", kernel, dict(E=E, I=two_i // 2, H=H, k=k), T, T * k / E,
                         two_i, H, hidden.dtype, hidden.device)
    if w8a8:  # a K tile is one activation scale group
        config = tuning.with_block_k(config, FP8_BLOCK, hidden.dtype, 2, hidden.device)
    return config, moe_align(topk_ids, E, config["BLOCK_M"])


def _transposed(scale):
    return None if scale is None else scale.transpose(1, 2)


def fused_moe(hidden, w13, w2, topk_weights, topk_ids, w13_scale=None, w2_scale=None,
              w8a8=False, swiglu_limit=None):
    T, H = hidden.shape
    E, two_i, _ = w13.shape
    k = topk_ids.shape[1]
    N = T * k
    if w8a8:
        check_fp8_tensor_cores(hidden.device)
    config, layout = _plan(False, hidden, w13, w13_scale, topk_ids, w8a8)
    P = layout[0].shape[0]
    acc = torch.promote_types(hidden.dtype, torch.float32)
    weights = topk_weights.reshape(-1).to(acc).contiguous()       # [N], indexed densely
    act = hidden.new_empty(P, two_i // 2)                         # [P, I]
    grouped_gemm(hidden, w13.transpose(1, 2), act, layout, N, config, a_row_div=k,
                 c_by_slot=True, swiglu=True, swiglu_limit=swiglu_limit,
                 b_scale=_transposed(w13_scale), w8a8=w8a8)
    y = hidden.new_zeros(N, H)                                    # [N, H]
    grouped_gemm(act, w2.transpose(1, 2), y, layout, N, config, a_by_slot=True,
                 row_scale=weights, b_scale=_transposed(w2_scale), w8a8=w8a8)
    return y.view(T, k, H).sum(dim=1, dtype=acc).to(hidden.dtype)


def fused_moe_backward(grad_out, hidden, w13, w2, topk_weights, topk_ids, w13_scale=None,
                       w2_scale=None, swiglu_limit=None):
    """(d hidden, d w13, d w2, d topk_weights); d w13 and d w2 are None for quantised
    (frozen) weights."""
    T, H = hidden.shape
    E, two_i, _ = w13.shape
    I = two_i // 2
    k = topk_ids.shape[1]
    N = T * k
    config, layout = _plan(True, hidden, w13, w13_scale, topk_ids)
    slot_ids = layout[0].long()                                   # [P], N for padding
    P = slot_ids.shape[0]
    acc = torch.promote_types(hidden.dtype, torch.float32)
    weights = topk_weights.reshape(-1).to(acc).contiguous()       # [N], indexed densely
    slot_weight = torch.cat([weights, weights.new_zeros(1)])[slot_ids].unsqueeze(1)  # [P, 1]

    gate_up = hidden.new_empty(P, two_i)                          # [P, 2I] recomputed
    grouped_gemm(hidden, w13.transpose(1, 2), gate_up, layout, N, config, a_row_div=k,
                 c_by_slot=True, b_scale=_transposed(w13_scale))
    gate, up = gate_up.to(acc).chunk(2, dim=-1)                   # [P, I] each

    # The d(input) GEMMs multiply by the weights themselves (B = W, not W^T).
    d_act_unweighted = hidden.new_empty(P, I)                     # [P, I] = grad_out[t] @ w2[e]
    grouped_gemm(grad_out, w2, d_act_unweighted, layout, N, config, a_row_div=k,
                 c_by_slot=True, b_scale=w2_scale, b_transposed=False)
    d_act_unweighted = d_act_unweighted.to(acc)
    act, d_gate, d_up = swiglu_backward(gate, up, d_act_unweighted * slot_weight, swiglu_limit)
    act = act.to(hidden.dtype)                                    # [P, I], as the forward holds it
    # Padding slots hold garbage; they all land on the discarded entry N.
    d_weight = weights.new_zeros(N + 1).scatter_(
        0, slot_ids, (d_act_unweighted * act.to(acc)).sum(dim=1))[:N]
    d_gate_up = torch.cat([d_gate, d_up], dim=1).to(hidden.dtype)  # [P, 2I]

    d_x = hidden.new_zeros(N, H)                                  # [N, H] per assignment
    grouped_gemm(d_gate_up, w13, d_x, layout, N, config, a_by_slot=True, b_scale=w13_scale,
                 b_transposed=False)
    d_hidden = d_x.view(T, k, H).sum(dim=1, dtype=acc).to(hidden.dtype)
    d_topk_weights = d_weight.view(T, k).to(topk_weights.dtype)
    if w13_scale is not None:
        return d_hidden, None, None, d_topk_weights
    d_w13 = torch.empty_like(w13, memory_format=torch.contiguous_format)  # [E, 2I, H]
    grouped_wgrad(d_gate_up, hidden, d_w13, layout, N, config, a_by_slot=True, g_row_div=k)
    d_w2 = torch.empty_like(w2, memory_format=torch.contiguous_format)    # [E, H, I]
    grouped_wgrad(grad_out, act, d_w2, layout, N, config, a_row_div=k, g_by_slot=True,
                  row_scale=weights)
    return d_hidden, d_w13, d_w2, d_topk_weights
