"""Reference variable-length attention: one sequence at a time, the whole score matrix at once.

Sequence b owns tokens cu_seqlens[b]:cu_seqlens[b + 1]; its queries attend only its own keys,
and with ``causal`` query i only keys 0..i of the sequence. Scores are softmax_scale * q.k;
lse is their natural-log logsumexp per (token, head). Math in fp64 (the exact answer the kernels
approach); out in q's dtype, lse in fp32.
"""

import torch

from ds_kernels.reference.autograd import grads_through


def mla_prefill(q, k, v, cu_seqlens, causal, softmax_scale):
    T, Hq, Dv = v.shape
    out = torch.zeros(T, Hq, Dv, dtype=torch.float64, device=q.device)
    lse = torch.zeros(T, Hq, dtype=torch.float64, device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].double() for t in (q, k, v))     # [L, Hq, D]
        scores = torch.einsum("ihd,jhd->hij", qs, ks) * softmax_scale  # [Hq, L, L]
        if causal:
            future = torch.ones(end - start, end - start, dtype=torch.bool,
                                device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        seq_lse = torch.logsumexp(scores, dim=-1)                    # [Hq, L]
        probs = torch.exp(scores - seq_lse[..., None])
        out[start:end] = torch.einsum("hij,jhd->ihd", probs, vs)
        lse[start:end] = seq_lse.t()
    return out.to(q.dtype), lse.float()


def mla_prefill_backward(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens, causal,
                         softmax_scale):
    """(d q, d k, d v) by autograd through the reference; out and lse are recomputed."""
    return grads_through(mla_prefill, (q, k, v), (grad_out, grad_lse), cu_seqlens, causal,
                         softmax_scale)
