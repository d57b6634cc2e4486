"""Rotary embedding on the torch path: the reference's arithmetic (bit for bit on x86 here).

Interleaved pairs are complex numbers, as in DeepSeek's model.py: one complex product does the
rotation (7x faster than four real products and a stack on a 2-core x86 CPU, [256, 16, 64]
fp32, one thread). Halves are rotated into one preallocated buffer through two views.
"""

import torch

from ds_kernels.reference.apply_rope import pairs


def _as_complex(x):
    """[..., D] real -> [..., D/2] complex view of its adjacent pairs (of a copy when x's layout
    has no such view, e.g. an odd column offset; clone, as contiguous() keeps an empty x's
    offset)."""
    pairs_ = x.unflatten(-1, (-1, 2))
    if (pairs_.stride(-1) != 1 or any(s % 2 for s in pairs_.stride()[:-1])
            or pairs_.storage_offset() % 2):
        pairs_ = pairs_.clone(memory_format=torch.contiguous_format)
    return torch.view_as_complex(pairs_)


def apply_rope(x, cos, sin, interleaved):
    acc = torch.promote_types(x.dtype, torch.float32)
    c, s = cos.to(acc), sin.to(acc)                               # [T, D/2]
    if x.dim() == 3:
        c, s = c.unsqueeze(1), s.unsqueeze(1)                     # [T, 1, D/2]: every head
    if interleaved:
        rotated = _as_complex(x.to(acc)) * torch.complex(c, s)    # [..., D/2] complex
        return torch.view_as_real(rotated).flatten(-2).to(x.dtype)
    x1, x2 = pairs(x, False)
    out = torch.empty(x.shape, dtype=acc, device=x.device)
    y1, y2 = pairs(out, False)
    torch.mul(x1, c, out=y1)
    y1.sub_(x2 * s)
    torch.mul(x2, c, out=y2)
    y2.add_(x1 * s)
    return out.to(x.dtype)
