"""Reference variable-length attention: one sequence at a time, the whole score matrix at once.

Sequence b owns tokens cu_seqlens[b]:cu_seqlens[b + 1]; its queries attend only its own keys,
and with ``causal`` query i only keys 0..i of the sequence. Scores are softmax_scale * q.k;
lse is their natural-log logsumexp per (token, head). Math in fp64 (the exact answer the kernels
approach); out in q's dtype, lse in fp32.

Non-finite input: where q[i], or k[j] or v[j] of a key j that query i sees, holds a NaN or an
infinity, out[i] and lse[i] (of that head) are NaN, and nothing else is touched: no other
sequence, and no query that cannot see j. Such a row is a constant, so its gradient is 0 and
it sends none into the keys it saw (the backward through torch.where).
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
        bad_key = ~(ks.isfinite().all(-1) & vs.isfinite().all(-1))  # [L, Hq]
        seen = bad_key.cummax(0).values if causal else bad_key.any(0).expand_as(bad_key)
        bad = (seen | ~qs.isfinite().all(-1)).t()                    # [Hq, L]
        qs, ks, vs = (torch.where(t.isfinite(), t, 0.0) for t in (qs, ks, vs))
        scores = torch.einsum("ihd,jhd->hij", qs, ks) * softmax_scale  # [Hq, L, L]
        if causal:
            future = torch.ones(end - start, end - start, dtype=torch.bool,
                                device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        seq_lse = torch.logsumexp(scores, dim=-1)                    # [Hq, L]
        probs = torch.exp(scores - seq_lse[..., None])
        seq_out = torch.einsum("hij,jhd->hid", probs, vs)           # [Hq, L, Dv]
        out[start:end] = torch.where(bad[..., None], float("nan"), seq_out).transpose(0, 1)
        lse[start:end] = torch.where(bad, float("nan"), seq_lse).t()
    return out.to(q.dtype), lse.float()


def mla_prefill_backward(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens, causal,
                         softmax_scale):
    """(d q, d k, d v) by autograd through the reference; out and lse are recomputed."""
    return grads_through(mla_prefill, (q, k, v), (grad_out, grad_lse), cu_seqlens, causal,
                         softmax_scale)
