"""Grouped GEMM on the torch path: torch's own grouped_mm (one C++ call) where its layout rules
allow, else one mm per group. Rows past offs[-1] come out 0, as in the reference."""

import torch
import torch.nn.functional as F

_ALIGN_BYTES = 16  # torch._grouped_mm wants every stride but the unit one 16-byte aligned


def _torch_grouped_mm_takes(*tensors) -> bool:
    if not hasattr(F, "grouped_mm"):
        return False
    for t in tensors:
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return False
        # One of the two matrix dims must be unit-stride; every other stride 16-byte aligned.
        unit = t.dim() - 1 if t.stride(-1) == 1 else t.dim() - 2 if t.stride(-2) == 1 else None
        if unit is None or any((s * t.itemsize) % _ALIGN_BYTES
                               for d, s in enumerate(t.stride()) if d != unit):
            return False
    return True


def grouped_matmul(a, b, offs):
    """[M, N]: rows offs[e-1]:offs[e] of a [M, K] times b[e] ([E, K, N], any strides)."""
    if _torch_grouped_mm_takes(a, b):
        return F.grouped_mm(a, b, offs=offs.to(torch.int32))
    out = a.new_empty(a.shape[0], b.shape[2])
    start = 0
    for e, end in enumerate(offs.tolist()):
        torch.mm(a[start:end], b[e], out=out[start:end])
        start = end
    return out


def grouped_matmul_tn(a, g, offs):
    """[E, K, N]: for each group e, a[rows_e]^T @ g[rows_e] (the weight gradient)."""
    if _torch_grouped_mm_takes(a.t(), g):
        return F.grouped_mm(a.t(), g, offs=offs.to(torch.int32))
    out = a.new_empty(offs.shape[0], a.shape[1], g.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        torch.mm(a[start:end].t(), g[start:end], out=out[e])
        start = end
    return out


def grouped_mm(a, b, offs):
    out = grouped_matmul(a, b, offs)
    out[int(offs[-1]):] = 0
    return out


def grouped_mm_backward(grad_out, a, b, offs):
    grad_a = grouped_mm(grad_out, b.transpose(1, 2), offs)
    return grad_a, grouped_matmul_tn(a, grad_out, offs)
