"""Run a live transformers 5 DeepSeek model on ds_kernels ops, and undo it exactly.

    model = DeepseekV3ForCausalLM.from_pretrained(...)   # or DeepseekV32ForCausalLM
    patch(model)      # same parameters, same logits, kernels underneath
    unpatch(model)    # transformers' own forwards again

patch / unpatch take DeepSeek-V3 and V3.2 models; patch_deepseek_v3 / unpatch_deepseek_v3 are
the same for V3 models only (their first name).

What is patched: each module of these classes gets an instance-level ``forward`` (a method bound
to the module) that shadows its class's; unpatching deletes it, so the class forward is what
runs again. Parameters, buffers, module objects, hooks and state_dict keys are untouched, so an
optimizer, transformers' output recorders (router_logits) and a deepcopy keep working.
- DeepseekV3RMSNorm -> rms_norm (transformers' order of casts, so outputs match).
- DeepseekV3TopkRouter -> fp32 logits as transformers computes them, then route. Returns
  (router_logits, topk_weights fp32, topk_ids int64) like the original; the experts come out
  sorted by score where transformers' are unsorted, which only reorders a sum.
- DeepseekV3Experts -> fused_moe (gate rows first in gate_up_proj, as transformers stores them).
- DeepseekV3Attention -> q, the normalised latent and k_pe from the module's own projections,
  apply_rope on transformers' cos/sin, then
  * prefill (no tokens cached yet for this layer): k and v expanded from the latent through
    kv_b_proj, mla_prefill over the batch as B equal-length sequences (differentiable);
  * decode (one new token per sequence, tokens cached, gradients off): absorbed attention,
    q_nope folded through W_UK, mla_decode over the cached latent rows, the result unfolded
    through W_UV. The cache is never re-expanded per head; transformers' DynamicCache holds it
    as one contiguous [B, 1, L, Dc] + [B, 1, L, Dr] pair per layer, which is copied into pages
    every step (O(L * (Dc + Dr)) bytes per layer, far less than the expansion it replaces; a
    paged cache, as ds_model keeps, avoids the copy).
  The cache receives exactly what transformers writes (k_pe in its de-interleaved layout), so
  patched and unpatched steps can share one cache.

FP8 checkpoints: on CPU (and GPUs below sm89) transformers dequantises them at load into plain
modules, which the classes above cover. Where it keeps them quantised, also:
- FP8Linear (every projection, shared experts, dense MLPs) -> quant_linear on its float8_e4m3fn
  weight and 128x128 weight_scale_inv (weight-only: activations stay unquantised, where
  transformers quantises them per token per 128 columns, so outputs differ by that rounding);
- FP8Experts -> fused_moe(..., w13_scale=, w2_scale=) on its FP8 or MXFP4 (int8 bytes, e8m0
  scales) weights;
- an FP8Linear kv_b_proj is dequantised at each absorbed decode step (W_UK and W_UV are used as
  matrices), as DeepSeek's inference does with weight_dequant.
Refused when patching: static activation scales, blocks other than 128x128, FP8Experts whose
scale grid is not fused_moe's (transformers gives gate_up_proj two scale rows when I < 128) or
with a bias, no gate or a swiglu limit.

Calls that fall back to transformers' forward of that module, which is always correct:
- attention with a mask that is not plain causal (left/right padding, packed sequences): the
  mask would have to become cu_seqlens or per-sequence cache lengths, and left padding puts
  padding rows at the start of the cache, which mla_decode cannot skip;
- attention with several new tokens after cached ones (chunked prefill, assisted decoding),
  with a cache other than DynamicCache (static, quantized), with an attention implementation
  other than eager / sdpa (flash and flex pass padding and packing through other arguments),
  with dropout while training, or a cached step with gradients enabled (mla_decode has no
  backward);
- an RMSNorm whose weight dtype differs from its input's (transformers returns the promoted
  dtype there, rms_norm the input's).
Checking a mask reads it back (one device sync per layer when transformers materialises it;
with sdpa and no padding it passes None and nothing is read).

The patched attention returns no attention weights (None), as sdpa and flash do.

DeepSeek-V3.2 (DeepseekV32ForCausalLM): its RMSNorm, router and experts are V3's and patched the
same way; DeepseekV32Attention -> MLA's q, latent and k_pe as above, the indexer's q
(wq_b of the query latent, non-interleaved RoPE on its first qk_rope_head_dim columns) and key
(its own k_norm LayerNorm of wk(x), the same RoPE), both caches updated as transformers
updates them (cache.update, cache.update_indexer), then over paged copies of the caches
lightning_indexer picks each query's index_topk keys and sparse_mla attends over them,
absorbed (q_nope through W_UK, the output through W_UV) - prefill, chunked prefill and decode
alike, with or without a cache. The dense [S, L] score matrix transformers masks is never
formed. Inference only: with gradients enabled (lightning_indexer and sparse_mla have no
backward), and for the masks, caches and implementations listed above, transformers' forward
runs. Top-k ties: ours go to the lower position, torch.topk's order is unspecified.
"""

import types

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf
from transformers.models.deepseek_v32 import modeling_deepseek_v32 as hf_v32

from ds_kernels.ops.apply_rope import apply_rope
from ds_kernels.ops.fused_moe import fused_moe
from ds_kernels.ops.lightning_indexer import lightning_indexer
from ds_kernels.ops.mla_decode import mla_decode
from ds_kernels.ops.mla_prefill import mla_prefill
from ds_kernels.ops.quant_linear import quant_linear
from ds_kernels.ops.quantize import check_quantized, dequantize
from ds_kernels.ops.rms_norm import rms_norm
from ds_kernels.ops.route import route
from ds_kernels.ops.sparse_mla import sparse_mla
from ds_kernels.quant_formats import FP4_DTYPE, FP8_BLOCK, FP8_DTYPE

try:  # transformers' FP8 modules (kept quantised on FP8-capable GPUs)
    from transformers.integrations import finegrained_fp8 as hf_fp8
except ImportError:  # a transformers without them
    hf_fp8 = None

# Rows per page of the paged view of transformers' latent cache that mla_decode reads: FlashMLA's
# page size (any power of two >= 16 is valid; the last page pads a sequence by < 64 rows).
_PAGE = 64
# Attention implementations whose masks _plain_causal reads: a 4-D bool or additive float mask,
# or None only when sdpa has proven the attention plain causal.
_MASK_IMPLEMENTATIONS = ("eager", "sdpa")


# The models patch takes, by the name its errors give them.
_FAMILIES = {"DeepseekV3": hf.DeepseekV3PreTrainedModel,
             "DeepseekV32": hf_v32.DeepseekV32PreTrainedModel}


def patch(model):
    """Run ``model``'s RMSNorms, routers, experts and attention on ds_kernels ops, in place.

    model: a transformers DeepseekV3 or DeepseekV32 model (…ForCausalLM, …Model, or another
    of their PreTrainedModels). Patching again patches only modules not yet patched (a no-op
    on a patched model). Nothing is changed if any module cannot be patched: a module that
    already has an instance-level forward (another patch, accelerate's device hooks), experts
    whose activation is not silu or that are expert-parallel. Returns ``model``.
    """
    todo = [(name, m) for name, m in _targets(model, _FAMILIES) if not _is_patched(m)]
    for name, module in todo:
        _check_patchable(name, module)
    for _, module in todo:
        module.forward = types.MethodType(_FORWARDS[type(module)], module)
    return model


def unpatch(model):
    """Undo patch: every patched module runs its class's forward again (a no-op on an
    unpatched model). Returns ``model``."""
    for _, module in _targets(model, _FAMILIES):
        if _is_patched(module):
            del module.forward
    return model


def patch_deepseek_v3(model: hf.DeepseekV3PreTrainedModel) -> hf.DeepseekV3PreTrainedModel:
    """patch, for a transformers DeepseekV3 model only."""
    _targets(model, {"DeepseekV3": hf.DeepseekV3PreTrainedModel})
    return patch(model)


def unpatch_deepseek_v3(model: hf.DeepseekV3PreTrainedModel) -> hf.DeepseekV3PreTrainedModel:
    """unpatch, for a transformers DeepseekV3 model only."""
    _targets(model, {"DeepseekV3": hf.DeepseekV3PreTrainedModel})
    return unpatch(model)


def _rms_norm_forward(self, hidden_states):
    if self.weight.dtype != hidden_states.dtype:
        return type(self).forward(self, hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _router_forward(self, hidden_states):
    hidden_states = hidden_states.view(-1, self.hidden_dim)                   # [T, H]
    router_logits = F.linear(hidden_states.float(), self.weight.float())      # [T, E]
    # No group_scoring to pass: transformers' DeepseekV3TopkRouter deletes the topk_method it
    # inherits from DeepseekV2's and always sums each group's two best, route's default.
    topk_weights, topk_ids = route(
        router_logits, self.top_k, correction_bias=self.e_score_correction_bias,
        n_group=self.num_group, topk_group=self.topk_group, renormalize=self.norm_topk_prob,
        routed_scaling_factor=self.routed_scaling_factor)                   # [T, k] each
    # int64 ids, as transformers' experts forward (one_hot) needs them: a caller may hold the
    # original experts, e.g. when some modules could not be patched.
    return router_logits, topk_weights, topk_ids.long()


def _experts_forward(self, hidden_states, top_k_index, top_k_weights):
    return fused_moe(hidden_states, self.gate_up_proj, self.down_proj, top_k_weights, top_k_index)


# transformers' FP8 parameters require grad, but its FP8 functions give them none (frozen,
# only the input's gradient is computed): the patched forwards pass them detached, the same.
def _fp8_linear_forward(self, input):
    if self.weight.dtype != FP8_DTYPE:  # transformers' own dense fallback (weights dequantised)
        return type(self).forward(self, input)
    return quant_linear(input, self.weight.detach(), self.weight_scale_inv.detach(), self.bias)


def _fp8_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    return fused_moe(hidden_states, _codes(self.gate_up_proj), _codes(self.down_proj),
                     top_k_weights, top_k_index, w13_scale=self.gate_up_proj_scale_inv.detach(),
                     w2_scale=self.down_proj_scale_inv.detach())


def _codes(weight):
    """An FP8Experts weight, detached; its FP4 weights are int8 bytes: ds_kernels'
    float4_e2m1fn_x2 (the even column in the low nibble, as transformers unpacks them)."""
    weight = weight.detach()
    return weight.view(FP4_DTYPE) if weight.dtype == torch.int8 else weight


def _dense_weight(linear, dtype):
    """A Linear's weight as a plain matrix in dtype: an FP8Linear's dequantised."""
    if linear.weight.dtype == FP8_DTYPE:
        return dequantize(linear.weight, linear.weight_scale_inv, dtype)
    return linear.weight


def _attention_forward(self, hidden_states, position_embeddings, attention_mask, cache=None,
                       **kwargs):
    B, S = hidden_states.shape[:-1]
    path = _kernel_path(self, S, attention_mask, cache)
    if path is None:
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask,
                                  cache=cache, **kwargs)

    H, Dr, Dv, Dc = self.num_heads, self.qk_rope_head_dim, self.v_head_dim, self.kv_lora_rank
    _, q_nope, q_pe, latent, k_pe, _, _ = _mla_inputs(self, hidden_states, position_embeddings,
                                                      self.config.rope_interleave)
    if cache is not None:
        cached_latent, cached_k_pe = cache.update(latent.view(B, 1, S, Dc), k_pe.view(B, 1, S, Dr),
                                                  self.layer_idx)            # [B, 1, L, Dc / Dr]
    if path == "decode":
        out = _absorbed_decode(self, q_nope, q_pe, cached_latent[:, 0], cached_k_pe[:, 0])
    else:
        out = _prefill(self, q_nope, q_pe, latent, k_pe, B, S)              # [T, H, Dv]
    return self.o_proj(out.reshape(B, S, H * Dv)), None


def _sparse_attention_forward(self, hidden_states, position_embeddings, attention_mask,
                              cache=None, **kwargs):
    B, S = hidden_states.shape[:-1]
    past = _sparse_past(self, S, attention_mask, cache)
    if past is None:
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask,
                                  cache=cache, **kwargs)
    H, Dr, Dc = self.num_heads, self.qk_rope_head_dim, self.kv_lora_rank
    T, indexer = B * S, self.indexer
    # V3.2's MLA always rotates adjacent pairs (its config has no rope_interleave).
    q_resid, q_nope, q_pe, latent, k_pe, cos, sin = _mla_inputs(self, hidden_states,
                                                                position_embeddings, True)
    Hi, Di = indexer.n_heads, indexer.head_dim
    q_index = _rope_first(indexer.wq_b(q_resid).view(T, Hi, Di), cos, sin)  # [T, Hi, Di]
    k_index = _rope_first(indexer.k_norm(indexer.wk(hidden_states)).view(T, Di), cos, sin)
    latent, k_pe, k_index = latent.view(B, 1, S, Dc), k_pe.view(B, 1, S, Dr), k_index.view(B, S, Di)
    if cache is not None:
        latent, k_pe = cache.update(latent, k_pe, self.layer_idx)          # [B, 1, L, Dc / Dr]
        k_index = cache.update_indexer(k_index, self.layer_idx)             # [B, L, Di]
    kv_pages, block_table, _ = _pages(latent[:, 0], k_pe[:, 0])
    index_pages, _, _ = _pages(k_index)
    device = hidden_states.device
    query_seq = torch.arange(B, dtype=torch.int32, device=device).repeat_interleave(S)  # [T]
    query_pos = (past + torch.arange(S, dtype=torch.int32, device=device)).repeat(B)    # [T]
    weights = indexer.weights_proj(hidden_states).float().view(T, Hi) * (Hi * Di) ** -0.5
    slots = lightning_indexer(q_index, weights, index_pages, block_table, query_seq, query_pos,
                              indexer.index_topk)                           # [T, index_topk]
    w_uk, w_uv = _absorbed(self, q_nope.dtype)
    q = torch.cat([torch.einsum("thn,hnc->thc", q_nope, w_uk), q_pe], dim=-1)  # [T, H, Dc + Dr]
    out, _ = sparse_mla(q, kv_pages, slots, self.scaling, v_dim=Dc)         # [T, H, Dc]
    out = torch.einsum("thc,hvc->thv", out, w_uv)                           # [T, H, Dv]
    return self.o_proj(out.reshape(B, S, H * self.v_head_dim)), None


def _mla_inputs(self, hidden_states, position_embeddings, rope_interleave):
    """What MLA's projections give for hidden_states [B, S, H]: (q_resid [B, S, q_lora_rank] or
    None without q_lora, q_nope [T, Hq, Dn], q_pe [T, Hq, Dr] rotated, the normalised latent
    [T, Dc], k_pe [T, Dr] rotated, cos and sin [T, Dr/2]), rotated as transformers does."""
    B, S = hidden_states.shape[:-1]
    H, Dn, Dr, Dc = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
    T = B * S
    if self.q_lora_rank is None:
        q_resid, q = None, self.q_proj(hidden_states)
    else:
        q_resid = self.q_a_layernorm(self.q_a_proj(hidden_states))
        q = self.q_b_proj(q_resid)
    q_nope, q_pe = q.view(T, H, Dn + Dr).split([Dn, Dr], dim=-1)            # [T, H, Dn], [T, H, Dr]
    latent, k_pe = self.kv_a_proj_with_mqa(hidden_states).view(T, Dc + Dr).split([Dc, Dr], dim=-1)
    latent = self.kv_a_layernorm(latent)                                    # [T, Dc]
    cos, sin = (_rope_table(t, B, S) for t in position_embeddings)          # [T, Dr/2] each
    q_pe = _rope(q_pe, cos, sin, rope_interleave)                           # [T, H, Dr]
    k_pe = _rope(k_pe, cos, sin, rope_interleave)                           # [T, Dr]
    return q_resid, q_nope, q_pe, latent, k_pe, cos, sin


def _rope_first(x, cos, sin):
    """x [..., Di] with its first Dr = 2 * cos.shape[1] columns rotated in halves, the
    indexer's RoPE; the rest as it is."""
    Dr = 2 * cos.shape[1]
    return torch.cat([apply_rope(x[..., :Dr], cos, sin, interleaved=False), x[..., Dr:]], dim=-1)


def _sparse_past(self, q_len, attention_mask, cache):
    """Tokens cached before this call when the sparse kernels can take it, else None (keep
    transformers' forward; the module docstring says when)."""
    return None if torch.is_grad_enabled() else _past(self, q_len, attention_mask, cache)


def _kernel_path(self, q_len, attention_mask, cache):
    """Which kernels this call takes: "prefill", "decode", or None to keep transformers' forward
    (the module docstring says why each case does)."""
    if self.training and self.attention_dropout > 0:
        return None
    past = _past(self, q_len, attention_mask, cache)
    if past is None:
        return None
    if past == 0:
        return "prefill"
    return "decode" if q_len == 1 and not torch.is_grad_enabled() else None


def _past(self, q_len, attention_mask, cache):
    """Tokens cached before this call, or None where the kernels cannot take it: an attention
    implementation or cache they do not read, or a mask other than plain causal."""
    if (self.config._attn_implementation not in _MASK_IMPLEMENTATIONS
            or (cache is not None and not isinstance(cache, DynamicCache))):
        return None
    past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
    return past if _plain_causal(attention_mask, q_len, past + q_len) else None


def _plain_causal(mask, q_len, kv_len):
    """Whether transformers' attention mask lets query i see exactly keys 0 .. kv_len - q_len + i
    of its own row: no padding, no packed sequences."""
    if mask is None:
        return True
    if mask.dim() != 4 or tuple(mask.shape[-2:]) != (q_len, kv_len):
        return False
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril(kv_len - q_len)
    if mask.dtype != torch.bool:                    # additive: 0 where seen, dtype min elsewhere
        causal = torch.zeros(causal.shape, dtype=mask.dtype, device=mask.device).masked_fill_(
            ~causal, torch.finfo(mask.dtype).min)
    return bool((mask == causal).all())


def _rope_table(table, B, S):
    """transformers' cos or sin, [B or 1, S, Dr] = cat(t, t), as apply_rope's [B * S, Dr/2] t."""
    half = table[..., : table.shape[-1] // 2]
    return half.expand(B, S, half.shape[-1]).reshape(B * S, half.shape[-1])


def _rope(x, cos, sin, rope_interleave):
    """x rotated as transformers rotates it, in its output layout. With rope_interleave it
    rotates adjacent pairs but returns them de-interleaved, cat(x[0::2], x[1::2]) (see
    ds_kernels/ops/apply_rope.py); its cache holds k_pe that way, so we do too."""
    out = apply_rope(x, cos, sin, interleaved=rope_interleave)
    if rope_interleave:
        out = torch.cat([out[..., 0::2], out[..., 1::2]], dim=-1)
    return out


def _prefill(self, q_nope, q_pe, latent, k_pe, B, S):
    """Attention of B sequences of S new tokens each; k and v expanded from the latent."""
    T, H = q_nope.shape[:2]
    k_nope, v = self.kv_b_proj(latent).view(T, H, -1).split(
        [self.qk_nope_head_dim, self.v_head_dim], dim=-1)                   # [T, H, Dn], [T, H, Dv]
    q = torch.cat([q_nope, q_pe], dim=-1)                                   # [T, H, Dn + Dr]
    k = torch.cat([k_nope, k_pe[:, None].expand(-1, H, -1)], dim=-1)        # [T, H, Dn + Dr]
    cu_seqlens = torch.arange(B + 1, dtype=torch.int32, device=q.device) * S  # [B + 1]
    out, _ = mla_prefill(q, k, v, cu_seqlens, causal=True, softmax_scale=self.scaling)
    return out


def _absorbed(self, dtype):
    """(W_UK [H, Dn, Dc], W_UV [H, Dv, Dc]): kv_b_proj's rows as per-head matrices in dtype."""
    H, Dn, Dv, Dc = self.num_heads, self.qk_nope_head_dim, self.v_head_dim, self.kv_lora_rank
    w_kv_b = _dense_weight(self.kv_b_proj, dtype)                         # [H * (Dn + Dv), Dc]
    return w_kv_b.view(H, Dn + Dv, Dc).split([Dn, Dv], dim=1)


def _absorbed_decode(self, q_nope, q_pe, latent, k_pe):
    """One new token per sequence against its cached rows: q_nope [B, H, Dn], q_pe [B, H, Dr];
    latent [B, L, Dc], k_pe [B, L, Dr] (this layer's whole cache, new token included)."""
    w_uk, w_uv = _absorbed(self, q_nope.dtype)
    q_latent = torch.einsum("bhn,hnc->bhc", q_nope, w_uk)                  # [B, H, Dc]
    kv_cache, block_table, cache_seqlens = _pages(latent, k_pe)
    out, _ = mla_decode(q_latent, q_pe, kv_cache, block_table, cache_seqlens, self.scaling)
    return torch.einsum("bhc,hvc->bhv", out, w_uv)                         # [B, H, Dv]


def _pages(*parts):
    """A copy of a contiguous cache, the columns parts [B, L, n_i] side by side (latent and
    k_pe; or the index keys), in mla_decode's layout: (cache [B * P, _PAGE, sum n_i],
    block_table int32 [B, P], cache_seqlens int32 [B]), sequence b owning pages
    b * P .. b * P + P - 1."""
    B, L, _ = parts[0].shape
    P = -(-L // _PAGE)
    rows = parts[0].new_empty(B, P * _PAGE, sum(p.shape[-1] for p in parts))
    first = 0
    for part in parts:
        rows[:, :L, first:first + part.shape[-1]] = part
        first += part.shape[-1]
    rows[:, L:] = 0                                 # the last page's tail: never scored, but finite
    block_table = torch.arange(B * P, dtype=torch.int32, device=rows.device).view(B, P)
    cache_seqlens = torch.full((B,), L, dtype=torch.int32, device=rows.device)
    return rows.view(B * P, _PAGE, -1), block_table, cache_seqlens


_FORWARDS = {
    hf.DeepseekV3RMSNorm: _rms_norm_forward,
    hf.DeepseekV3TopkRouter: _router_forward,
    hf.DeepseekV3Experts: _experts_forward,
    hf.DeepseekV3Attention: _attention_forward,
    hf_v32.DeepseekV32RMSNorm: _rms_norm_forward,
    hf_v32.DeepseekV32TopkRouter: _router_forward,
    hf_v32.DeepseekV32Experts: _experts_forward,
    hf_v32.DeepseekV32Attention: _sparse_attention_forward,
}
_EXPERTS = (hf.DeepseekV3Experts, hf_v32.DeepseekV32Experts)
if hf_fp8 is not None:
    _FORWARDS.update({hf_fp8.FP8Linear: _fp8_linear_forward,
                      hf_fp8.FP8Experts: _fp8_experts_forward})
    _EXPERTS += (hf_fp8.FP8Experts,)


def _targets(model, families):
    """(name, module) of every module of a patched class in model, which must be one of the
    families {name: PreTrainedModel class}; exact classes, as a subclass may compute something
    else."""
    if not isinstance(model, tuple(families.values())):
        names = " or ".join(families)
        examples = ", ".join(f"{n}ForCausalLM, {n}Model" for n in families)
        raise TypeError(f"expected a transformers {names} model ({examples}), got "
                        f"{type(model).__name__}")
    return [(name, m) for name, m in model.named_modules() if type(m) in _FORWARDS]


def _is_patched(module):
    forward = module.__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is _FORWARDS[type(module)]


def _check_patchable(name, module):
    if "forward" in module.__dict__:
        raise ValueError(f"module {name!r} ({type(module).__name__}) already has its own forward "
                         f"({module.__dict__['forward']!r}: another patch, or a hook such as "
                         "accelerate's device_map dispatch), which patching would drop; patch "
                         "before adding it")
    if hf_fp8 is not None and isinstance(module, (hf_fp8.FP8Linear, hf_fp8.FP8Experts)):
        _check_fp8(name, module)
    if isinstance(module, _EXPERTS):
        if module.config.hidden_act != "silu":
            raise ValueError(f"module {name!r}: fused_moe implements silu experts, but "
                             f"hidden_act={module.config.hidden_act!r}")
        if module._is_expert_parallel:
            raise ValueError(f"module {name!r}: expert-parallel experts (ids of other ranks' "
                             "experts in top_k_index) are not supported")


def _check_fp8(name, module):
    """What quant_linear and fused_moe cannot run of transformers' FP8 modules (see the module
    docstring)."""
    if module.activation_scheme != "dynamic":
        raise ValueError(f"module {name!r}: activation_scheme={module.activation_scheme!r}: "
                         "static activation scales are not supported (weight-only kernels)")
    if isinstance(module, hf_fp8.FP8Experts) and (module.has_bias or not module.has_gate
                                                  or module.limit is not None):
        raise ValueError(f"module {name!r}: FP8Experts with has_bias={module.has_bias}, "
                         f"has_gate={module.has_gate}, swiglu_limit={module.limit}: fused_moe "
                         "runs gated, bias-free, unclamped SwiGLU experts")
    weights = ("weight",) if isinstance(module, hf_fp8.FP8Linear) else ("gate_up_proj",
                                                                          "down_proj")
    for weight in weights:
        codes = _codes(getattr(module, weight))
        if codes.dtype == FP8_DTYPE and list(module.block_size or ()) != [FP8_BLOCK] * 2:
            raise ValueError(f"module {name!r}: block_size={module.block_size}: ds_kernels "
                             f"takes {FP8_BLOCK}x{FP8_BLOCK} blocks")
        if codes.dtype in (FP8_DTYPE, FP4_DTYPE):  # the grid, e.g. gate_up_proj's for I < 128
            check_quantized(f"{name}.{weight}", codes, f"{name}.{weight}_scale_inv",
                            getattr(module, f"{weight}_scale_inv"))
