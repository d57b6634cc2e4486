"""DeepSeekForCausalLM: the DeepSeek-V3 family's network on ds_kernels ops (gpt-fast's tone).

Every heavy line is a ds_kernels call or a Linear. Parameter names are transformers 5's
DeepseekV3ForCausalLM state_dict keys, so its checkpoints load as they are (loading.py).

Tokens travel as one flat batch [T, H], no padding, with a Batch saying where each one sits:
- prefill: whole sequences packed back to back (cu_seqlens). K and V are decompressed from the
  latent through kv_b_proj and ds_kernels.mla_prefill attends within each sequence;
- decode: one new token per sequence, appended to a paged latent cache. Attention is absorbed:
  W_UK (kv_b_proj's K rows) is folded into the query, ds_kernels.mla_decode scores the cached
  [latent | k_pe] rows themselves, and W_UV maps its [Hq, Dc] output to values. The cache is
  never expanded per head: (Dc + Dr) values per token per layer (576 in DeepSeek-V3), not
  Hq * (Dn + Dr + Dv) (40,960).
DeepSeek-V3.2 (config.index_topk set: DeepSeek Sparse Attention, ds_model/deepseek_v32.py):
prefill and decode alike write the cache first, the indexer picks index_topk cached rows per
query, and ds_kernels.sparse_mla attends over those, absorbed as in decode; forward() without a
cache runs the same through a cache of its own.

Quantised checkpoints (ds_model/quantized.py): the projections, shared experts and dense MLPs
become QuantLinear (ds_kernels.quant_linear on the FP8 weight) and the routed experts
QuantExperts (ds_kernels.fused_moe on FP8 or MXFP4 weights); kv_b_proj stays a plain Linear,
dequantised at load, since absorbed decode uses its rows as matrices.

RoPE: config.rope_interleave (DeepSeek's weights; transformers' default) rotates adjacent
pairs. transformers returns the rotated pairs de-interleaved, in q and k alike, so every score
and everything after it is the same; only k_pe's column order in the cache differs from theirs.
"""

import dataclasses

import torch
from torch import nn

import ds_kernels
from ds_kernels import mla_cache_format
from ds_kernels.moe import MoE, SharedExperts
from ds_kernels.rope import (mla_softmax_scale, rope_attention_factor, rope_cos_sin,
                             rope_frequencies)
from ds_model.config import ModelConfig
from ds_model.deepseek_v32 import Indexer
from ds_model.generate import generate as _generate
from ds_model.loading import from_pretrained as _from_pretrained
from ds_model.quantized import QuantExperts, QuantLinear, quantized_state_keys

# transformers and DeepSeek's model.py give q_a_layernorm and kv_a_layernorm RMSNorm's default
# eps, whatever config.rms_norm_eps says.
LATENT_NORM_EPS = 1e-6


@dataclasses.dataclass
class Batch:
    """Where the tokens of a flat batch sit. Prefill sets cu_seqlens; decode (one token per
    sequence) sets seqlens; both set block_table and query_seq when there is a cache."""

    positions: torch.Tensor                  # [T] int64 position in its sequence
    slots: torch.Tensor | None = None        # [T] int64 cache row to write (None: no cache)
    cu_seqlens: torch.Tensor | None = None   # [B + 1] int32 sequence bounds
    block_table: torch.Tensor | None = None  # [B, max_pages] int32 pages of each sequence
    seqlens: torch.Tensor | None = None      # [B] int32 cached tokens, this step's included
    query_seq: torch.Tensor | None = None    # [T] int32 each token's row of block_table


class KVCache:
    """Paged latent cache: per layer [num_blocks, block_size, Dc + Dr] rows [latent | k_pe];
    token t of sequence b lives in page block_table[b, t // block_size], row t % block_size.
    Sequence b gets pages for capacities[b] tokens (no more: ragged batches waste at most a
    page each). With ``fp8`` the rows are FlashMLA's FP8 layout for DeepSeek-V3.2 (uint8: e4m3
    latent, a scale per 128 columns, bf16 k_pe; ds_kernels/mla_cache_format.py): 656 bytes a
    token a layer for DeepSeek-V3 instead of 1,152 in bf16; the ops read the format from the
    dtype. DeepSeek-V3.2 (config.index_topk): also the indexer's keys, per layer
    [num_blocks, block_size, index_head_dim] in ``dtype`` (``index_layers``), under the same
    block table; with ``fp8`` FP8 rows too (e4m3, a scale per 128 columns: 132 bytes a token a
    layer for V3.2's 128-wide keys, against 256 in bf16), as DeepSeek's inference holds them
    (it also rotates them by a Hadamard matrix first, which we do not)."""

    def __init__(self, config: ModelConfig, capacities: list[int], *, block_size: int = 64,
                 dtype=torch.float32, device=None, fp8: bool = False,
                 layers: int | None = None):
        """layers: how many (default config.num_hidden_layers; the MTP layers' cache is one
        of its own, as its rows run behind the main model's)."""
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
        Dc, Dr = config.kv_lora_rank, config.qk_rope_head_dim
        tile = mla_cache_format.FP8_TILE
        if fp8 and (Dc % tile or Dr % 2):
            raise ValueError(f"an FP8 latent cache needs kv_lora_rank a multiple of {tile} and "
                             f"an even qk_rope_head_dim, got {Dc} and {Dr}")
        Di = config.index_head_dim
        if fp8 and config.index_topk and Di % tile:
            raise ValueError(f"an FP8 index-key cache needs index_head_dim a multiple of {tile}, "
                             f"got {Di}")
        latent_dtype = mla_cache_format.FP8_CACHE_DTYPE if fp8 else dtype
        pages = [-(-c // block_size) for c in capacities]
        width = mla_cache_format.row_width(Dc, Dr, latent_dtype)
        self.block_size = block_size
        layers = config.num_hidden_layers if layers is None else layers
        self.layers = [torch.zeros(sum(pages), block_size, width, dtype=latent_dtype,
                                   device=device) for _ in range(layers)]
        index_width = mla_cache_format.row_width(Di, 0, latent_dtype)
        self.index_layers = [
            torch.zeros(sum(pages), block_size, index_width, dtype=latent_dtype, device=device)
            for _ in range(layers if config.index_topk else 0)]
        table = torch.zeros(len(pages), max(pages, default=0), dtype=torch.int32)
        first = 0
        for b, n in enumerate(pages):  # entries past a sequence's pages are never read
            table[b, :n] = torch.arange(first, first + n, dtype=torch.int32)
            first += n
        self.block_table = table.to(device)                              # [B, max_pages]
        self.seqlens = torch.zeros(len(pages), dtype=torch.int32, device=device)  # [B]
        self.capacities = torch.tensor(capacities, device=device)        # [B]
        # Host-side bound on every length: decode hands mla_decode only the table's columns
        # in use (the torch path gathers every column it is given).
        self.longest = 0

    def fill(self, cu_seqlens) -> Batch:
        """Where B whole sequences (bounds cu_seqlens [B + 1]) go: sequences 0..B-1, empty
        until now."""
        B, T = cu_seqlens.shape[0] - 1, int(cu_seqlens[-1])
        starts, lengths = cu_seqlens[:-1].long(), cu_seqlens.diff()      # [B], [B]
        seq_ids = torch.repeat_interleave(torch.arange(B, device=starts.device), lengths)  # [T]
        positions = torch.arange(T, device=starts.device) - starts[seq_ids]  # [T]
        slots = self.slots(seq_ids, positions)
        self.seqlens[:B] = lengths
        self.longest = max(self.longest, int(lengths.max()))
        return Batch(positions, slots, cu_seqlens=cu_seqlens,
                     block_table=self.block_table[:B, :self._pages()],
                     query_seq=seq_ids.to(torch.int32))

    def append(self, seq_ids, counts=1) -> Batch:
        """Where counts[i] more tokens (an int for all, or int64 [n]) of each of sequences
        seq_ids (int64 [n], distinct) go - sequence seq_ids[0]'s new tokens first, in order -
        and what decode reads: each token its sequence's cache up to itself, so several new
        tokens of a sequence attend causally among themselves (speculative verification).
        Each token gets its own block-table row and length: decode runs them as sequences
        sharing pages (mla_decode reads the shared pages once per token, where FlashMLA's
        s_q > 1 reads them once)."""
        device = seq_ids.device
        if isinstance(counts, int):  # as many for every sequence: decode's hot path, no scan
            token_seq = seq_ids.repeat_interleave(counts) if counts > 1 else seq_ids   # [T]
            positions = self.seqlens[token_seq].long()                   # [T]
            if counts > 1:
                positions += torch.arange(counts, device=device).repeat(len(seq_ids))
            self.longest += counts
        else:
            token_seq = seq_ids.repeat_interleave(counts)                # [T]
            first = torch.cumsum(counts, 0) - counts                     # [n]
            offsets = torch.arange(len(token_seq), device=device) - first.repeat_interleave(
                counts)
            positions = self.seqlens[token_seq].long() + offsets        # [T]
            self.longest += int(counts.max()) if len(counts) else 0
            counts = counts.to(torch.int32)
        T = len(token_seq)
        slots = self.slots(token_seq, positions)
        self.seqlens[seq_ids] += counts
        return Batch(positions, slots, block_table=self.block_table[token_seq, :self._pages()],
                     seqlens=(positions + 1).to(torch.int32),
                     query_seq=torch.arange(T, dtype=torch.int32, device=device))

    def rewind(self, seq_ids, lengths):
        """Keep only the first lengths[i] cached tokens of sequence seq_ids[i] (int64 [n]
        each; rejected draft tokens): the next append overwrites the rows past them."""
        if bool((lengths > self.seqlens[seq_ids]).any() or (lengths < 0).any()):
            raise ValueError(f"rewind lengths must be in [0, cached length], got "
                             f"{lengths.tolist()} for {self.seqlens[seq_ids].tolist()}")
        self.seqlens[seq_ids] = lengths.to(torch.int32)

    def _pages(self) -> int:
        return -(-self.longest // self.block_size)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer i's (latent cache, index-key cache or None)."""
        return self.layers[i], self.index_layers[i] if self.index_layers else None

    def slots(self, seq_ids, positions):                                 # [T], [T]
        if bool((positions >= self.capacities[seq_ids]).any()):
            raise ValueError(f"KV cache full: a sequence would pass its capacity "
                             f"{self.capacities.tolist()}")
        page = self.block_table[seq_ids, positions // self.block_size].long()   # [T]
        return page * self.block_size + positions % self.block_size             # [T]

    def bytes_per_token(self) -> int:
        """Cache bytes one token takes, all layers together: layers * row bytes (V3.2: the
        index keys' row too)."""
        return sum(layer[0, 0].nbytes for layer in self.layers + self.index_layers)

    def nbytes(self) -> int:
        """Bytes allocated, all pages of all layers."""
        return sum(layer.nbytes for layer in self.layers + self.index_layers)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return ds_kernels.rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos, sin [T, Dr/2] fp32 at each token's position (YaRN if config.rope_scaling says)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dim, self.base, self.scaling = (config.qk_rope_head_dim, config.rope_theta,
                                             config.rope_scaling)
        self.attention_factor = rope_attention_factor(config.rope_scaling)
        self.register_buffer("inv_freq", torch.empty(self.dim // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        # Derived from the config, never stored in checkpoints: from_pretrained calls this
        # once the model leaves the meta device.
        with torch.no_grad():
            self.inv_freq.copy_(rope_frequencies(self.dim, self.base, self.scaling))

    def forward(self, positions):                                        # [T]
        return rope_cos_sin(positions, self.inv_freq, self.attention_factor)


class Attention(nn.Module):
    """Multi-head latent attention, with (q_a_proj, q_b_proj) or without (q_proj) q_lora_rank;
    with an indexer (DeepSeek-V3.2), sparse over the tokens it picks."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        H, self.heads = config.hidden_size, config.num_attention_heads
        self.dn, self.dr = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.dv, self.dc = config.v_head_dim, config.kv_lora_rank
        q_width, bias = self.heads * (self.dn + self.dr), config.attention_bias
        self.q_lora = bool(config.q_lora_rank)
        if self.q_lora:
            self.q_a_proj = nn.Linear(H, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(config.q_lora_rank, q_width, bias=False)
        else:
            self.q_proj = nn.Linear(H, q_width, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, self.dc + self.dr, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.dc, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.dc, self.heads * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(self.heads * self.dv, H, bias=bias)
        self.softmax_scale = mla_softmax_scale(self.dn + self.dr, config.rope_scaling)
        self.interleaved = config.rope_interleave
        self.indexer = Indexer(config) if config.index_topk else None

    def forward(self, x, cos, sin, batch: Batch, kv_cache=None, index_cache=None):  # x [T, H]
        T = x.shape[0]
        if self.q_lora:
            q_resid = self.q_a_layernorm(self.q_a_proj(x))                 # [T, q_lora_rank]
            q = self.q_b_proj(q_resid)
        else:
            q = self.q_proj(x)
        q_nope, q_pe = q.view(T, self.heads, -1).split([self.dn, self.dr], dim=-1)  # [T, Hq, *]
        q_pe = ds_kernels.apply_rope(q_pe, cos, sin, interleaved=self.interleaved)
        kv = self.kv_a_proj_with_mqa(x)                                    # [T, Dc + Dr]
        latent, k_pe = kv.split([self.dc, self.dr], dim=-1)                # [T, Dc], [T, Dr]
        if kv_cache is None:
            latent = self.kv_a_layernorm(latent)                            # [T, Dc]
            k_pe = ds_kernels.apply_rope(k_pe, cos, sin, interleaved=self.interleaved)
        else:
            latent, k_pe = ds_kernels.mla_cache_write_fused(
                latent, k_pe, self.kv_a_layernorm.weight, LATENT_NORM_EPS, cos, sin, kv_cache,
                batch.slots, interleaved=self.interleaved)
        if self.indexer is not None:
            slots = self.indexer(x, q_resid, cos, sin, batch, index_cache)  # [T, index_topk]
            out, _ = ds_kernels.sparse_mla(torch.cat([self._absorb(q_nope), q_pe], dim=-1),
                                           kv_cache, slots, self.softmax_scale, v_dim=self.dc)
            out = self._values(out)
        elif batch.cu_seqlens is not None:
            out = self._prefill(q_nope, q_pe, latent, k_pe, batch.cu_seqlens)
        else:
            out, _ = ds_kernels.mla_decode(self._absorb(q_nope), q_pe, kv_cache,
                                           batch.block_table, batch.seqlens, self.softmax_scale)
            out = self._values(out)
        return self.o_proj(out.reshape(T, self.heads * self.dv))           # [T, H]

    def _prefill(self, q_nope, q_pe, latent, k_pe, cu_seqlens):
        T = latent.shape[0]
        kv = self.kv_b_proj(latent).view(T, self.heads, self.dn + self.dv)  # [T, Hq, Dn + Dv]
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)                     # [T, Hq, Dn | Dv]
        q = torch.cat([q_nope, q_pe], dim=-1)                                # [T, Hq, Dn + Dr]
        k = torch.cat([k_nope, k_pe[:, None].expand(-1, self.heads, -1)], dim=-1)
        out, _ = ds_kernels.mla_prefill(q, k, v, cu_seqlens, causal=True,
                                        softmax_scale=self.softmax_scale)    # [T, Hq, Dv]
        return out

    def _absorbed(self):
        """(W_UK [Hq, Dn, Dc], W_UV [Hq, Dv, Dc]): kv_b_proj's rows as per-head matrices."""
        w = self.kv_b_proj.weight.view(self.heads, self.dn + self.dv, self.dc)
        return w.split([self.dn, self.dv], dim=1)

    def _absorb(self, q_nope):                                             # [T, Hq, Dn]
        """The query in latent space, scoring cached latents as k_nope would."""
        return torch.bmm(q_nope.transpose(0, 1), self._absorbed()[0]).transpose(0, 1)  # [T, Hq, Dc]

    def _values(self, out):                                                # [T, Hq, Dc]
        """Attention over latents mapped to values through W_UV."""
        return torch.bmm(out.transpose(0, 1), self._absorbed()[1].mT).transpose(0, 1)  # [T, Hq, Dv]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, ep: dict):
        """ep: MoE.from_hf_config's expert-parallel arguments (ep_group, ep_wire), or none."""
        super().__init__()
        H = config.hidden_size
        self.self_attn = Attention(config)
        self.mlp = (MoE.from_hf_config(config, **ep)
                    if layer_idx >= config.first_k_dense_replace
                    else SharedExperts(H, config.intermediate_size))  # the dense SwiGLU MLP
        self.input_layernorm = RMSNorm(H, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(H, config.rms_norm_eps)

    def forward(self, x, cos, sin, batch, kv_cache=None, index_cache=None):  # x [T, H]
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, kv_cache, index_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepSeekModel(nn.Module):
    def __init__(self, config: ModelConfig, ep: dict, mtp_layers: int = 0):
        """mtp_layers: DeepSeek's multi-token-prediction layers (ds_model/mtp.py) to hold,
        after the decoder layers in ``layers`` (the checkpoint's layer numbers)."""
        super().__init__()
        L = config.num_hidden_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, ep) for i in range(L))
        if mtp_layers:
            from ds_model.mtp import MTPLayer  # mtp.py builds on this module's DecoderLayer
            self.layers.extend(MTPLayer(config, L + j, ep) for j in range(mtp_layers))
        self.decoder_layers = L
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids, batch: Batch, cache: KVCache | None = None):  # [T]
        x = self.embed_tokens(input_ids)                                  # [T, H]
        cos, sin = self.rotary_emb(batch.positions)                       # [T, Dr/2] each
        for i, layer in enumerate(self.layers[:self.decoder_layers]):
            x = layer(x, cos, sin, batch, *((None, None) if cache is None else cache.layer(i)))
        return self.norm(x)                                               # [T, H]

    def draft(self, input_ids, hidden, batch: Batch, mtp_cache: KVCache):  # [T], [T, H]
        """(g [T, H], logits [T, V]) of the first MTP layer (ds_model/mtp.py) on rows of
        (next token, hidden state before it), its rows cached in mtp_cache."""
        cos, sin = self.rotary_emb(batch.positions)
        return self.layers[self.decoder_layers].draft(input_ids, hidden, cos, sin, batch,
                                                      *mtp_cache.layer(0))


class DeepSeekForCausalLM(nn.Module):
    from_pretrained = classmethod(_from_pretrained)   # see ds_model/loading.py
    generate = _generate                              # see ds_model/generate.py

    def __init__(self, config: ModelConfig, *, ep_group=None, ep_wire="native",
                 mtp_layers: int = 0):
        """ep_group: a torch.distributed group whose ranks share the routed experts (E/W each;
        ds_kernels.MoE), each rank running attention and everything else on its own sequences
        (data-parallel attention); ep_wire: how the tokens travel to the experts ("native", or
        "fp8": ds_kernels/expert_wire.py). load_state_dict takes the unsharded state_dict.
        mtp_layers: hold DeepSeek's multi-token-prediction layer(s) too (model.layers.{L},
        ...; speculative decoding, ds_model/speculative.py)."""
        super().__init__()
        config.validate()  # again: its fields may have been changed since it was built
        self.config, self.ep_group = config, ep_group
        if ep_wire != "native" and ep_group is None:
            raise ValueError(f"ep_wire={ep_wire!r} is how tokens travel to other ranks' "
                             "experts: it needs an ep_group")
        ep = {} if ep_group is None else dict(ep_group=ep_group, ep_wire=ep_wire)
        _check_mtp_layers(mtp_layers)
        self.model = DeepSeekModel(config, ep, mtp_layers)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, S, V] of input_ids [B, S] (every row a whole sequence; no cache kept:
        DeepSeek-V3.2's sparse attention selects from a cache of its own, dropped after, and is
        inference only - lightning_indexer and sparse_mla have no backward)."""
        if input_ids.dim() != 2 or input_ids.shape[1] < 1 or input_ids.is_floating_point():
            raise ValueError(f"input_ids must be integer [B, S >= 1], got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        B, S = input_ids.shape
        device = input_ids.device
        cu_seqlens = torch.arange(0, B * S + 1, S, dtype=torch.int32, device=device)  # [B + 1]
        if self.config.index_topk:
            cache = self.new_cache([S] * B)
            hidden = self.model(input_ids.reshape(-1), cache.fill(cu_seqlens), cache)
        else:
            positions = torch.arange(S, device=device).repeat(B)         # [B * S]
            hidden = self.model(input_ids.reshape(-1), Batch(positions, cu_seqlens=cu_seqlens))
        return self.lm_head(hidden).view(B, S, -1)                       # [B, S, V]

    def new_cache(self, capacities: list[int], *, block_size: int = 64, fp8: bool = False,
                  mtp: bool = False) -> KVCache:
        """An empty cache for len(capacities) sequences of at most capacities[b] tokens, in
        the model's dtype or (``fp8``) FlashMLA's FP8 rows; ``mtp``: for the MTP layers."""
        weight = self.lm_head.weight
        layers = len(self.model.layers) - self.model.decoder_layers if mtp else None
        return KVCache(self.config, capacities, block_size=block_size, dtype=weight.dtype,
                       device=weight.device, fp8=fp8, layers=layers)

    def prefill(self, input_ids, cu_seqlens, cache: KVCache) -> torch.Tensor:
        """Logits [B, V] at the last token of each of B whole sequences packed in input_ids
        [T] (bounds cu_seqlens int32 [B + 1], every length >= 1), whose latents fill the
        cache's (empty) sequences 0..B-1."""
        hidden = self.model(input_ids, cache.fill(cu_seqlens), cache)    # [T, H]
        return self.lm_head(hidden[cu_seqlens[1:].long() - 1])           # [B, V]

    def decode(self, input_ids, seq_ids, cache: KVCache) -> torch.Tensor:
        """Logits [n, V] of one new token input_ids[i] [n] appended to cached sequence
        seq_ids[i] (int64 [n], distinct); or [n, s, V] of s new tokens each, input_ids [n, s],
        each attending to its sequence's cache and its new tokens up to itself."""
        count = 1 if input_ids.dim() == 1 else input_ids.shape[1]
        batch = cache.append(seq_ids, count)
        logits = self.lm_head(self.model(input_ids.reshape(-1), batch, cache))  # [n * s, V]
        return logits if input_ids.dim() == 1 else logits.view(*input_ids.shape, -1)

    def join_experts(self):
        """This rank's part of one forward with no tokens of its own (expert parallelism: a
        rank whose sequences are done while others still decode): every MoE layer's expert
        exchange, in order, on zero rows, so that the other ranks' collectives complete."""
        H, weight = self.config.hidden_size, self.lm_head.weight
        for layer in self.model.layers[:self.model.decoder_layers]:
            if isinstance(layer.mlp, MoE):
                k = layer.mlp.gate.top_k
                layer.mlp.experts(weight.new_empty(0, H),
                                  torch.empty(0, k, dtype=torch.long, device=weight.device),
                                  torch.empty(0, k, device=weight.device))

    def to_dtype(self, dtype: torch.dtype) -> "DeepSeekForCausalLM":
        """Cast to dtype, except quantised weights and their scales (``.to(dtype)`` would cast
        the codes as numbers) and what stays fp32 as in transformers: the routers' weight and
        bias (expert choice is sensitive to their rounding) and the RoPE frequencies."""
        with torch.no_grad():
            for module in self.modules():
                quantized = getattr(module, "QUANTIZED", ())
                for name, tensor in [*module.named_parameters(recurse=False),
                                     *module.named_buffers(recurse=False)]:
                    if name not in quantized and tensor.is_floating_point():
                        tensor.data = tensor.data.to(dtype)
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.gate.float()
        self.model.rotary_emb.float().reset_parameters()
        return self

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None):
        """Random weights as transformers initialises them: N(0, std) matrices, unit norms,
        zero biases and router correction biases; quantised modules get N(0, std) weights
        quantised, one matrix at a time. For presets run without a checkpoint."""
        quantized = quantized_state_keys(self)
        # The MTP layers draw last: the main model gets the same weights with or without them.
        mtp = tuple(f"model.layers.{i}." for i in range(self.model.decoder_layers,
                                                         len(self.model.layers)))
        for name, tensor in sorted(self.state_dict().items(),
                                   key=lambda item: item[0].startswith(mtp)):
            if name in quantized:
                continue
            if name.endswith("norm.weight"):
                tensor.fill_(1.0)
            elif name.endswith(("bias", "e_score_correction_bias")):
                tensor.zero_()
            else:
                tensor.normal_(0.0, std, generator=generator)
        for _, module in sorted(self.named_modules(),
                                key=lambda item: item[0].startswith(mtp)):
            if isinstance(module, QuantLinear):
                module.load_dense(_normal((module.out_features, module.in_features), std,
                                          generator, module.weight.device))
            elif isinstance(module, QuantExperts):
                E, two_i, _ = module.gate_up_proj.shape
                H, device = module.down_proj.shape[1], module.down_proj.device
                for e in range(E):
                    module.load_dense(e, _normal((two_i, H), std, generator, device),
                                      _normal((H, two_i // 2), std, generator, device))
        return self


def _check_mtp_layers(mtp_layers):
    if isinstance(mtp_layers, bool) or not isinstance(mtp_layers, int) or mtp_layers < 0:
        raise ValueError(f"mtp_layers must be an int >= 0, got {mtp_layers!r}")


def _normal(shape, std, generator, device):
    return torch.empty(shape, device=device).normal_(0.0, std, generator=generator)
