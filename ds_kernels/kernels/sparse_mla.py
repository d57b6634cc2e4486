"""Sparse latent attention on the GPU: mla_decode's split-KV kernel (kernels/mla_decode.py)
reading the rows a query's slots name instead of a sequence's pages in order (SPARSE), heads
sharing each gathered KV tile, split over the top_k rows for decode, attention sinks folded in
as one more score whose value row is 0. Float and FP8 caches alike."""

from ds_kernels.kernels.mla_decode import attend


def sparse_mla(q, kv_cache, slots, softmax_scale, v_dim, sinks):
    # K = [first v_dim columns | the rest]: the kernel's latent and rope parts.
    return attend(q[..., :v_dim], q[..., v_dim:], kv_cache, slots, None, softmax_scale,
                  sinks=sinks)
