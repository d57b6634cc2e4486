"""Reference RMSNorm, in exactly the order of casts of transformers' DeepseekV3RMSNorm:

    h = x.float();  h = h * rsqrt(mean(h^2) + eps);  y = weight * h.to(x.dtype)

The normalised row is rounded to x's dtype *before* the weight multiplies it (a second
rounding that DeepSeek's own F.rms_norm does not make); matching it keeps a patched transformers
model's logits. The product is then rounded to x's dtype (transformers would return the
promoted dtype when weight is wider than x). float64 inputs are computed in float64, so that
gradcheck can test the backward.
"""

import torch

from ds_kernels.reference.autograd import grads_through


def rms_norm(x, weight, eps):
    acc = torch.promote_types(x.dtype, torch.float32)
    h = x.to(acc)                                                 # [..., D]
    h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (weight * h.to(x.dtype)).to(x.dtype)


def rms_norm_backward(grad_out, x, weight, eps):
    """(d x, d weight) by autograd through the reference."""
    return grads_through(rms_norm, (x, weight), grad_out, eps)
