"""Reference manifold-constrained hyper-connections (mHC, DeepSeek-V4): how a block reads and
writes hc_mult = n residual streams, as transformers' DeepseekV4HyperConnection and
DeepseekV4DecoderLayer compute it, in ``compute`` precision (float64 here: the exact answer;
the torch path runs the same formula in float32).

mhc_pre(streams [T, n, D], fn [(2 + n) n, n D], base [(2 + n) n], scale [3], norm_eps, hc_eps,
sinkhorn_iters) -> (collapsed [T, D] in streams' dtype, post fp32 [T, n], comb fp32 [T, n, n]):
  x = the streams flattened [T, n D], divided by their RMS (no weight; eps norm_eps)
  [p, q, c] = x @ fn^T, split n | n | n n
  pre  = sigmoid(p scale[0] + base[:n]) + hc_eps
  post = 2 sigmoid(q scale[1] + base[n:2n])
  comb = softmax over its last index of (c scale[2] + base[2n:]) as [n, n], + hc_eps; then its
         columns normalised (x / (column sum + hc_eps)) and sinkhorn_iters - 1 rounds of rows
         then columns: nearly doubly stochastic
  collapsed = sum_i pre[i] streams[i]: the block's input
mhc_post(streams [T, n, D], out [T, D], post [T, n], comb [T, n, n]) -> [T, n, D] in streams'
dtype: the new streams, mixed[k] = post[k] out + sum_j comb[j, k] streams[j] (comb's first
index is the input stream: transformers' comb^T @ streams).
"""

import torch

from ds_kernels.reference.autograd import grads_through


def mhc_pre(streams, fn, base, scale, norm_eps, hc_eps, sinkhorn_iters,
            compute=torch.float64):
    T, n, D = streams.shape
    x = streams.reshape(T, n * D).to(compute)                             # [T, nD]
    x = x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + norm_eps)
    mixes = x @ fn.to(compute).T                                          # [T, (2 + n) n]
    p, q, c = mixes.split([n, n, n * n], dim=-1)
    base, scale = base.to(compute), scale.to(compute)
    pre = torch.sigmoid(p * scale[0] + base[:n]) + hc_eps                 # [T, n]
    post = 2 * torch.sigmoid(q * scale[1] + base[n:2 * n])                # [T, n]
    comb = torch.softmax((c * scale[2] + base[2 * n:]).view(T, n, n), dim=-1) + hc_eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)               # [T, n, n]
    for _ in range(sinkhorn_iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    collapsed = (pre.unsqueeze(-1) * streams.to(compute)).sum(dim=1)      # [T, D]
    return collapsed.to(streams.dtype), post.float(), comb.float()


def mhc_post(streams, out, post, comb, compute=torch.float64):
    mixed = (post.to(compute).unsqueeze(-1) * out.to(compute).unsqueeze(1)
             + comb.to(compute).transpose(1, 2) @ streams.to(compute))    # [T, n, D]
    return mixed.to(streams.dtype)


def mhc_pre_backward(grad_collapsed, grad_post, grad_comb, streams, fn, base, scale, norm_eps,
                     hc_eps, sinkhorn_iters, compute=torch.float64):
    """(d streams, d fn, d base, d scale) by autograd through mhc_pre."""
    return grads_through(
        lambda *t: mhc_pre(*t, norm_eps, hc_eps, sinkhorn_iters, compute=compute),
        (streams, fn, base, scale), (grad_collapsed, grad_post, grad_comb))


def mhc_post_backward(grad_mixed, streams, out, post, comb, compute=torch.float64):
    """(d streams, d out, d post, d comb) by autograd through mhc_post."""
    return grads_through(lambda *t: mhc_post(*t, compute=compute), (streams, out, post, comb),
                         grad_mixed)
