"""DeepSeek-V3.2's own piece of the network: the lightning indexer of DeepSeek Sparse Attention
(DSA). The rest of V3.2 is V3's (ds_model/model.py): an Attention with an ``indexer`` attends
only over the index_topk cached tokens the indexer picks for each query, through
ds_kernels.sparse_mla on the absorbed latent rows, in prefill and decode alike.

Parameter names are transformers 5's DeepseekV32Indexer (self_attn.indexer.wq_b, wk, k_norm,
weights_proj), whose forward is the spec:
- q = wq_b(q_resid) [T, Hi, Di] with q_resid = q_a_layernorm(q_a_proj(x)), MLA's query latent;
  RoPE on its first qk_rope_head_dim columns, NON-interleaved (rotate_half) - MLA's is
  interleaved - with the same cos/sin as MLA;
- k = k_norm(wk(x)) [T, Di], a LayerNorm (weight and bias, eps 1e-6), the same RoPE on its first
  columns, cached per token (ds_kernels.index_cache_write, fused) in pages of the latent
  cache's block table, so the slots the indexer returns name latent rows as they are;
- score(s) = sum_h w[t, h] relu(q[t, h] . k[s] / sqrt(Di)), w = weights_proj(x) / sqrt(Hi):
  both scales are folded into the weights (relu(c a) = c relu(a) for c > 0);
- the top index_topk keys by score among the query's sequence's positions 0..its own
  (ds_kernels.lightning_indexer: ties to the lower position, -1 when fewer are visible).
DeepSeek's own inference code also rotates q and k by a Hadamard matrix and scores them in
FP8; transformers skips both (a rotation leaves dot products unchanged), and so do we: index
keys are cached in the model's dtype.
"""

import torch
from torch import nn

import ds_kernels

# transformers' and DeepSeek's k_norm: nn.LayerNorm(index_head_dim, eps=1e-6).
INDEX_NORM_EPS = 1e-6


class Indexer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads, self.dim = config.index_n_heads, config.index_head_dim
        self.dr, self.top_k = config.qk_rope_head_dim, config.index_topk
        self.wq_b = nn.Linear(config.q_lora_rank, self.heads * self.dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.dim, bias=False)
        self.k_norm = nn.LayerNorm(self.dim, eps=INDEX_NORM_EPS)
        self.weights_proj = nn.Linear(config.hidden_size, self.heads, bias=False)
        self.weight_scale = (self.heads * self.dim) ** -0.5

    def forward(self, x, q_resid, cos, sin, batch, index_cache):    # x [T, H], q_resid [T, ql]
        """slots int32 [T, index_topk]: the cache rows each query attends over (-1: none); this
        step's keys are written into index_cache first, so each query sees itself."""
        T = x.shape[0]
        q = self.wq_b(q_resid).view(T, self.heads, self.dim)                  # [T, Hi, Di]
        q_pe, q_pass = q.split([self.dr, self.dim - self.dr], dim=-1)
        q = torch.cat([ds_kernels.apply_rope(q_pe, cos, sin, interleaved=False), q_pass], dim=-1)
        ds_kernels.index_cache_write(self.wk(x), self.k_norm.weight, self.k_norm.bias,
                                     INDEX_NORM_EPS, cos, sin, index_cache, batch.slots)
        weights = self.weights_proj(x).float() * self.weight_scale           # [T, Hi]
        return ds_kernels.lightning_indexer(q, weights, index_cache, batch.block_table,
                                            batch.query_seq, batch.positions.int(), self.top_k)
