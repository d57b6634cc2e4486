"""The MoE experts on the torch path: sort the T*k assignments by expert once, then the two
GEMMs over each expert's run of rows.

Strategies (``python -m autotune sweep --op fused_moe`` picks per machine and token count):
  "grouped_mm": two torch grouped_mm calls over all experts, on a permuted copy of the
                tokens, then an un-permute and a sum over k;
  "mm_loop":    per expert with rows: gather its tokens, up-projection, SwiGLU,
                down-projection, routing weight, and index_add into the output - no [T*k, H]
                buffers at all: fresh 100 MB buffers cost more in page faults and memory passes
                than the GEMMs' own overhead (bench/bench_fused_moe.py, T=4096);
  "expert_threads": the same per-expert work with the experts shared out over one
                single-threaded worker per core (largest first, assigned by expert size, so
                the result does not depend on timing), each adding into its own output, summed
                at the end. Medium GEMMs lose much of their speed to synchronising cores, and a
                core taken by another process stalls every multi-threaded GEMM. torch's thread
                count is process-wide: other threads of the process run single-threaded for
                the duration of the call.
The backward recomputes the first GEMM rather than keeping [T*k, 2I] activations alive
between forward and backward (the same choice as the Triton path).

Quantised experts (w13_scale, w2_scale: FP8 blocks or MXFP4) stay quantised in memory: each
expert's GEMMs run through quant_linear's torch path, which dequantises one block of the
expert's rows at a time, multiplied while it is in cache (ds_kernels/cpu/quant_linear.py,
ds_kernels/cpu/quantize.py). Only the per-expert strategies apply (untuned default:
expert_threads, see QUANTIZED_DEFAULT): "grouped_mm" would need all hit experts dequantised at
once - for DeepSeek-V3's 256 experts, 22 GB of bf16 a layer, the memory the format saves - so a
quantised call tuned or forced to it runs "mm_loop". The experts are frozen: the backward
computes d hidden and d topk_weights only (each GEMM expert by expert). w8a8 (act_quant="fp8")
has the Triton kernels' numerics: each GEMM's input rows quantised to e4m3 per 128 columns and
back; it is for inference on FP8 tensor cores, so here it is only as fast as the weight-only path.

Speed: decoding costs ~0.7-0.9 ns a weight in torch ops (cpu/quantize.py), a pass over every
hit expert's weights each call, on top of the GEMMs. Where weights stream from memory at
~5-6 GB/s a core, FP8 halves the bytes of bf16; but on AVX-512/AMX CPUs a bf16 GEMM with few
rows per expert spends only ~0.2-0.4 ns a weight, so the decode alone costs more than the whole
bf16 product (bench/bench_fused_moe.py, mode "quantised").
"""

from concurrent.futures import ThreadPoolExecutor

import torch

from ds_kernels import tuning
from ds_kernels.cpu.grouped_mm import (grouped_matmul, grouped_matmul_quantized, grouped_matmul_tn,
                                       groups)
from ds_kernels.cpu.quant_linear import quant_linear
from ds_kernels.cpu.quantize import fake_quantize_fp8_activations
from ds_kernels.quant_formats import format_of
from ds_kernels.reference.fused_moe import swiglu, swiglu_backward

# Untuned default, measured on a quiet 2-core x86 CPU (fp32, H=1024, I=256, E=64, k=6), against
# transformers' eager experts: T=16 grouped_mm 1.19x, expert_threads 1.15x, mm_loop 1.06x;
# T=4096 mm_loop 1.07x, expert_threads 1.05x, grouped_mm 0.70x. Few rows per expert: one
# grouped_mm call; many: the per-expert loop.
GROUPED_BELOW_ROWS_PER_EXPERT = 16
# Quantised experts: each expert's work is mostly elementwise decoding passes (~10 torch calls
# per block of rows), which a multi-threaded mm_loop splits over the cores call by call, paying
# a fork-join each and stalling at every barrier while another process holds a core. On the
# 2-core Xeon dev machine (H=1024 I=256 E=64 k=6, FP8, bf16), quiet: mm_loop 43 ms and 219 ms
# at T=16 and 4096, expert_threads 49 ms and 200 ms; with another process on a core: mm_loop
# 9.7 s and 19 s, expert_threads 85 ms and 350 ms. One expert per core is the robust choice.
QUANTIZED_DEFAULT = "expert_threads"


def _plan(hidden, w13, w13_scale, topk_ids, backward=False):
    T, H = hidden.shape
    E, two_i, _ = w13.shape
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)                                   # [N = T*k]
    order = torch.sort(flat, stable=True).indices                 # [N] assignment per slot
    offs = torch.bincount(flat, minlength=E).cumsum(0)            # [E]
    quantized = w13_scale is not None
    if quantized:
        default = QUANTIZED_DEFAULT
    else:
        default = "grouped_mm" if T * k / E < GROUPED_BELOW_ROWS_PER_EXPERT else "mm_loop"
    kernel = tuning.gemm_kernel(format_of(w13) if quantized else None, backward)
    key = tuning.shape_key("fused_moe", kernel, E=E, I=two_i // 2, H=H, k=k)
    strategy = tuning.config("fused_moe", "torch", key, T, hidden.dtype, hidden.device,
                             dict(strategy=default), kernel=kernel)["strategy"]
    if quantized and strategy == "grouped_mm":
        strategy = "mm_loop"
    return order, offs, strategy


def _times_weight(a, w, scale, offs, strategy, *, transposed):
    """[N, out]: each expert's rows of a times w[e]^T (``transposed``) or w[e]; a quantised w
    (scale given) dequantised a block of rows at a time."""
    if scale is not None:
        return grouped_matmul_quantized(a, w, scale, offs, transposed=transposed)
    return grouped_matmul(a, w.transpose(1, 2) if transposed else w, offs, strategy)


_workers: ThreadPoolExecutor | None = None


def _pool(size: int) -> ThreadPoolExecutor:
    global _workers
    if _workers is None or _workers._max_workers != size:
        _workers = ThreadPoolExecutor(size, thread_name_prefix="ds_kernels")
    return _workers


def _shares(work, workers: int):
    """Experts dealt to workers largest first, each to the least loaded: balanced, and the
    same split for the same routing."""
    shares, loads = [[] for _ in range(workers)], [0] * workers
    for group in sorted(work, key=lambda g: g[1] - g[2]):
        w = loads.index(min(loads))
        shares[w].append(group)
        loads[w] += group[2] - group[1]
    return shares


def _expert_mm(x, w, scale, e):
    """x @ w[e]^T; a quantised w[e] dequantised a block of rows at a time."""
    return torch.mm(x, w[e].t()) if scale is None else quant_linear(x, w[e], scale[e])


def fused_moe(hidden, w13, w2, topk_weights, topk_ids, w13_scale=None, w2_scale=None,
              w8a8=False, swiglu_limit=None):
    T, H = hidden.shape
    k = topk_ids.shape[1]
    I = w13.shape[1] // 2
    order, offs, strategy = _plan(hidden, w13, w13_scale, topk_ids)
    acc = torch.promote_types(hidden.dtype, torch.float32)
    weight = topk_weights.reshape(-1)[order].to(acc)              # [N] per slot
    token = order // k                                            # [N] per slot
    if strategy == "grouped_mm":
        gate, up = grouped_matmul(hidden[token], w13.transpose(1, 2), offs, strategy).chunk(2, -1)
        y = grouped_matmul(swiglu(gate, up, swiglu_limit), w2.transpose(1, 2), offs,
                           strategy)                              # [N, H]
        by_assignment = torch.empty_like(y, dtype=acc)
        by_assignment[order] = y.to(acc) * weight.unsqueeze(1)
        return by_assignment.view(T, k, H).sum(dim=1).to(hidden.dtype)

    # w8a8: each GEMM's input rows through e4m3 and back, in fp32 (the kernels apply the scales
    # in fp32 after an exact FP8 product); act rounded to hidden's dtype first, as they hold it.
    source = fake_quantize_fp8_activations(hidden) if w8a8 else hidden

    def act_of(gate_up):
        act = swiglu(gate_up[:, :I], gate_up[:, I:], swiglu_limit)
        return fake_quantize_fp8_activations(act.to(hidden.dtype)) if w8a8 else act

    def add_experts(share, out):
        # Worker threads start with autograd on; the op computes values only (its backward
        # is the fused_moe_backward op). Inference mode, not no_grad: a caller's inference
        # mode does not reach worker threads, and outside it they may not update the outputs
        # that it made (inference tensors); inside it, in-place updates of any tensor are fine.
        with torch.inference_mode():
            for e, s, t in share:
                rows = token[s:t]
                gate_up = _expert_mm(source[rows], w13, w13_scale, e)  # [rows, 2I]
                y = _expert_mm(act_of(gate_up), w2, w2_scale, e)
                out.index_add_(0, rows, y.to(acc) * weight[s:t].unsqueeze(1))
        return out

    work = groups(offs)
    threads = torch.get_num_threads()
    if strategy != "expert_threads" or threads == 1 or len(work) < 2:
        return add_experts(work, hidden.new_zeros(T, H, dtype=acc)).to(hidden.dtype)
    outs = [hidden.new_zeros(T, H, dtype=acc) for _ in range(threads)]
    torch.set_num_threads(1)
    try:
        list(_pool(threads).map(add_experts, _shares(work, threads), outs))
    finally:
        torch.set_num_threads(threads)
    return torch.stack(outs).sum(dim=0).to(hidden.dtype)


def fused_moe_backward(grad_out, hidden, w13, w2, topk_weights, topk_ids, w13_scale=None,
                       w2_scale=None, swiglu_limit=None):
    """(d hidden, d w13, d w2, d topk_weights); d w13 and d w2 are None for quantised
    (frozen) weights."""
    T, H = hidden.shape
    k = topk_ids.shape[1]
    order, offs, strategy = _plan(hidden, w13, w13_scale, topk_ids, backward=True)
    acc = torch.promote_types(hidden.dtype, torch.float32)
    x = hidden[order // k]                                        # [N, H] token of each slot
    gate_up = _times_weight(x, w13, w13_scale, offs, strategy, transposed=True)  # [N, 2I]
    gate, up = gate_up.to(acc).chunk(2, dim=-1)                   # [N, I] each
    g = grad_out[order // k]                                      # [N, H] d out of each slot
    weight = topk_weights.reshape(-1)[order].to(acc).unsqueeze(1)  # [N, 1]

    d_act_unweighted = _times_weight(g, w2, w2_scale, offs, strategy,
                                     transposed=False).to(acc)   # [N, I] = g @ w2[e]
    act, d_gate, d_up = swiglu_backward(gate, up, d_act_unweighted * weight, swiglu_limit)
    act = act.to(hidden.dtype)                                    # [N, I], as the forward holds it
    d_weight = torch.empty(order.numel(), dtype=acc, device=hidden.device)
    d_weight[order] = (d_act_unweighted * act.to(acc)).sum(dim=1)
    d_gate_up = torch.cat([d_gate, d_up], dim=1).to(hidden.dtype)  # [N, 2I]

    d_x = _times_weight(d_gate_up, w13, w13_scale, offs, strategy, transposed=False)  # [N, H]
    d_hidden = torch.zeros(T, H, dtype=acc, device=hidden.device)
    d_hidden.index_add_(0, order // k, d_x.to(acc))
    d_topk_weights = d_weight.view(T, k).to(topk_weights.dtype)
    if w13_scale is not None:
        return d_hidden.to(hidden.dtype), None, None, d_topk_weights
    d_w13 = grouped_matmul_tn(d_gate_up, x, offs, strategy)       # [E, 2I, H]
    d_w2 = grouped_matmul_tn((g.to(acc) * weight).to(hidden.dtype), act, offs, strategy)
    return (d_hidden.to(hidden.dtype), d_w13.to(w13.dtype), d_w2.to(w2.dtype),
            d_topk_weights)
