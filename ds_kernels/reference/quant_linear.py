"""Reference quant_linear: the weight dequantised by the reference recipe, then an exact
(fp64) product, rounded once to x's dtype.

    out = x @ dequantize(w_q, scale).T + bias        d x = d out @ dequantize(w_q, scale)

The weight is frozen: no gradient reaches w_q or scale.
"""

from ds_kernels.reference.quantize import dequantize


def quant_linear(x, w_q, scale, bias=None):
    w = dequantize(w_q, scale).double()                           # [N, K]
    out = x.double() @ w.T                                        # [..., N]
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype)


def quant_linear_backward(grad_out, w_q, scale):
    """d x [..., K], in grad_out's dtype (x's)."""
    return (grad_out.double() @ dequantize(w_q, scale).double()).to(grad_out.dtype)
