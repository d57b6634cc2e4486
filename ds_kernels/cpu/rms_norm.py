"""RMSNorm on the torch path: the reference's exact ops (so outputs match transformers'
DeepseekV3RMSNorm bit for bit on CPU), with fewer temporaries; the backward in closed form.

With n = x * r, r = (mean(x^2) + eps)^-1/2 and y = w * n:
    d weight = sum over rows of dy * n        (n rounded to x's dtype, as the forward uses it)
    d x      = r * (dy w - n * mean(dy w n))
"""

import torch


def _normalized(x, eps):
    """(x in fp32 or fp64, 1 / rms [..., 1])."""
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    return h, torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True).add_(eps))


def rms_norm(x, weight, eps):
    h, inv = _normalized(x, eps)
    n = (h * inv).to(x.dtype)                                     # [..., D]
    if weight.dtype == x.dtype:
        return n.mul_(weight)
    return (weight * n).to(x.dtype)


def rms_norm_backward(grad_out, x, weight, eps):
    D = x.shape[-1]
    h, inv = _normalized(x, eps)
    n = h * inv                                                   # [..., D]
    g = grad_out.to(h.dtype)
    d_weight = (g * n.to(x.dtype).to(h.dtype)).reshape(-1, D).sum(dim=0)
    gw = g * weight.to(h.dtype)                                   # d n
    d_x = inv * (gw - n * (gw * n).mean(dim=-1, keepdim=True))
    return d_x.to(x.dtype), d_weight.to(weight.dtype)
