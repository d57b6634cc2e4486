"""Grouped GEMM on the torch path. Rows past offs[-1] come out 0, as in the reference.

Two strategies (``python -m autotune sweep --op grouped_mm`` picks per machine and size):
  "grouped_mm": torch's own grouped_mm, one C++ call, where its layout rules allow;
  "mm_loop":    one torch.mm per non-empty group - MKL's best kernel for each group's size,
                which beat torch's CPU grouped_mm at large groups (bench/bench_fused_moe.py).
A quantised b always runs per group, through quant_linear's torch path (each group's weight
dequantised one block of rows at a time, never the whole stack): torch's grouped_mm would need
every weight dequantised at once, the memory the format saves.
"""

import torch
import torch.nn.functional as F

from ds_kernels import tuning
from ds_kernels.cpu.quant_linear import quant_linear, quant_linear_backward
from ds_kernels.cpu.quantize import fake_quantize_fp8_activations
from ds_kernels.quant_formats import format_of, in_features

_ALIGN_BYTES = 16  # torch._grouped_mm wants every stride but the unit one 16-byte aligned


def _torch_grouped_mm_takes(*tensors) -> bool:
    if not hasattr(F, "grouped_mm"):
        return False
    for t in tensors:
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return False
        # One of the two matrix dims must be unit-stride; every other stride 16-byte aligned
        # and not 0 (it rejects expanded views).
        unit = t.dim() - 1 if t.stride(-1) == 1 else t.dim() - 2 if t.stride(-2) == 1 else None
        if unit is None or any(s == 0 or (s * t.itemsize) % _ALIGN_BYTES
                               for d, s in enumerate(t.stride()) if d != unit):
            return False
    return True


def groups(offs) -> list[tuple[int, int, int]]:
    """(group, first row, end row) of each non-empty group."""
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    return [(e, s, t) for e, (s, t) in enumerate(zip(starts, ends)) if t > s]


def grouped_matmul(a, b, offs, strategy):
    """[M, N]: rows offs[e-1]:offs[e] of a [M, K] times b[e] ([E, K, N], any strides)."""
    if strategy == "grouped_mm" and _torch_grouped_mm_takes(a, b):
        return F.grouped_mm(a, b, offs=offs.to(torch.int32))
    out = a.new_empty(a.shape[0], b.shape[2])
    for e, s, t in groups(offs):
        torch.mm(a[s:t], b[e], out=out[s:t])
    return out


def grouped_matmul_tn(a, g, offs, strategy):
    """[E, K, N]: for each group e, a[rows_e]^T @ g[rows_e] (the weight gradient)."""
    if strategy == "grouped_mm" and _torch_grouped_mm_takes(a.t(), g):
        return F.grouped_mm(a.t(), g, offs=offs.to(torch.int32))
    out = a.new_zeros(offs.shape[0], a.shape[1], g.shape[1])
    for e, s, t in groups(offs):
        torch.mm(a[s:t].t(), g[s:t], out=out[e])
    return out


def grouped_matmul_quantized(a, w_q, scale, offs, *, transposed: bool):
    """[M, N]: rows offs[e-1]:offs[e] of a times W[e]^T (``transposed``; W [E, N, K]) or W[e]
    (W [E, K, N]), W = dequantize(w_q, scale) a block of rows at a time. Rows past offs[-1]
    are left uninitialised, as by grouped_matmul."""
    N = w_q.shape[1] if transposed else in_features(w_q, format_of(w_q))
    out = a.new_empty(a.shape[0], N)
    for e, s, t in groups(offs):
        if transposed:
            out[s:t] = quant_linear(a[s:t], w_q[e], scale[e])
        else:
            out[s:t] = quant_linear_backward(a[s:t], w_q[e], scale[e])
    return out


def _strategy(kernel, a, b):
    """The tuned strategy of the forward (kernel None) or the backward, else grouped_mm."""
    key = tuning.shape_key("grouped_mm", kernel, E=b.shape[0], N=b.shape[2], K=b.shape[1])
    return tuning.config("grouped_mm", "torch", key, a.shape[0], a.dtype, a.device,
                         dict(strategy="grouped_mm"), kernel=kernel)["strategy"]


def grouped_mm(a, b, offs, b_scale=None, w8a8=False):
    if b_scale is None:
        out = grouped_matmul(a, b, offs, _strategy(None, a, b))
    else:  # b = W^T of the quantised weight W = b.mT
        # w8a8: a's rows through e4m3 and back, in fp32 (the kernel's numerics, no faster).
        rows = fake_quantize_fp8_activations(a) if w8a8 else a
        out = grouped_matmul_quantized(rows, b.mT, b_scale.mT, offs, transposed=True).to(a.dtype)
    out[int(offs[-1]):] = 0
    return out


def grouped_mm_backward(grad_out, a, b, offs, b_scale=None):
    """(d a, d b); with b_scale (b quantised, frozen) (d a, None), and a may be None."""
    if b_scale is not None:  # d a = d out @ b^T = d out @ W
        grad_a = grouped_matmul_quantized(grad_out, b.mT, b_scale.mT, offs, transposed=False)
        grad_a[int(offs[-1]):] = 0
        return grad_a, None
    strategy = _strategy("backward", a, b)
    grad_a = grouped_matmul(grad_out, b.transpose(1, 2), offs, strategy)
    grad_a[int(offs[-1]):] = 0
    return grad_a, grouped_matmul_tn(a, grad_out, offs, strategy)
