"""Reference rotary embedding: each pair (x1, x2) of a row rotated by its token's angle,

    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)

interleaved=True:  pairs (x[2i], x[2i+1]), DeepSeek-V3's inference/model.py (complex product of
                   adjacent pairs, view_as_complex).
interleaved=False: pairs (x[i], x[i + D/2]), transformers' rotate_half.
Math in fp32 (fp64 for fp64 inputs), one rounding to x's dtype at the end.
"""

import torch


def pairs(x, interleaved):
    """(x1, x2), the two members of every rotated pair: [..., D/2] views of x [..., D]."""
    if interleaved:
        return x[..., 0::2], x[..., 1::2]
    return x.chunk(2, dim=-1)


def apply_rope(x, cos, sin, interleaved):
    acc = torch.promote_types(x.dtype, torch.float32)
    c, s = cos.to(acc), sin.to(acc)                               # [T, D/2]
    if x.dim() == 3:
        c, s = c.unsqueeze(1), s.unsqueeze(1)                     # [T, 1, D/2]: every head
    x1, x2 = pairs(x.to(acc), interleaved)
    y1, y2 = x1 * c - x2 * s, x2 * c + x1 * s
    if interleaved:
        out = torch.stack([y1, y2], dim=-1).flatten(-2)           # back to (y1, y2) pairs
    else:
        out = torch.cat([y1, y2], dim=-1)
    return out.to(x.dtype)
