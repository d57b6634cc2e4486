"""Reference grouped GEMM: torch._grouped_mm's 2-D x 3-D meaning, one expert at a time.

Rows offs[e-1]:offs[e] of a (offs[-1] = 0) are multiplied by b[e]; rows past offs[-1] belong
to no group and are 0 (torch leaves them uninitialised).
"""

import torch

from ds_kernels.reference.autograd import grads_through


def grouped_mm(a, b, offs):
    M, N = a.shape[0], b.shape[2]
    out = torch.zeros(M, N, dtype=a.dtype, device=a.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = (a[start:end].double() @ b[e].double()).to(a.dtype)  # exact, then rounded
        start = end
    return out


def grouped_mm_backward(grad_out, a, b, offs):
    """(d a, d b) by autograd through the reference."""
    return grads_through(grouped_mm, (a, b), grad_out, offs)
