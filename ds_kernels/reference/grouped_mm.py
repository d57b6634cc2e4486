"""Reference grouped GEMM: torch._grouped_mm's 2-D x 3-D meaning, one expert at a time.

Rows offs[e-1]:offs[e] of a (offs[-1] = 0) are multiplied by b[e]; rows past offs[-1] belong
to no group and are 0 (torch leaves them uninitialised).

A quantised b (b_scale given) is the transpose of a quantised [E, N, K] weight (see
ds_kernels.grouped_mm): b = dequantize(b.mT, b_scale.mT).mT by the reference recipe. It is
frozen: no gradient for it. w8a8 (FP8 b, act_quant="fp8"; forward only): a's rows are
quantised to e4m3 per 128 columns and back first (ds_kernels/reference/quantize.py).
"""

import torch

from ds_kernels.reference.autograd import grads_through
from ds_kernels.reference.quantize import dequantize, fake_quantize_fp8_activations


def grouped_mm(a, b, offs, b_scale=None, w8a8=False):
    if b_scale is not None:
        b = dequantize(b.mT, b_scale.mT).mT                          # [E, K, N]
    rows = fake_quantize_fp8_activations(a) if w8a8 else a
    M, N = a.shape[0], b.shape[2]
    out = torch.zeros(M, N, dtype=a.dtype, device=a.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = (rows[start:end].double() @ b[e].double()).to(a.dtype)  # exact, rounded
        start = end
    return out


def grouped_mm_backward(grad_out, a, b, offs, b_scale=None):
    """(d a, d b) by autograd through the reference; d b is None for a quantised b, and a
    may then be None."""
    if b_scale is None:
        return grads_through(grouped_mm, (a, b), grad_out, offs)
    b = dequantize(b.mT, b_scale.mT).mT                              # [E, K, N]
    d_a = torch.zeros(grad_out.shape[0], b.shape[1], dtype=grad_out.dtype, device=b.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        d_a[start:end] = (grad_out[start:end].double() @ b[e].double().T).to(grad_out.dtype)
        start = end
    return d_a, None
