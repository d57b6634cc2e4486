"""model: ds_model's generate against transformers' generate, on the same checkpoint.

One random DeepseekV3ForCausalLM, saved with save_pretrained and loaded by both: 11.6M
parameters, 7.5M active per token (4 layers, the first dense; hidden 256; 8 heads with
DeepSeek-V3's head dims, Dn = Dv = 128 and Dr = 64; kv_lora_rank Dc = 128, no q_lora; 16 routed
experts of width 128, top 2, one shared; vocab 4096). Batch 1, greedy, no EOS; fp32 on CPU,
bf16 on CUDA. Then the same network as a DeepseekV32ForCausalLM (shape["model"] says which):
q_lora_rank 192 (the indexer reads MLA's query latent) and DeepSeek Sparse Attention with
V3.2's indexer heads (64 of 128 dims) but index_topk 256 instead of 2048, so that these CPU
contexts prune: ds_model runs lightning_indexer + sparse_mla, transformers scores every cached
token with the indexer and masks a dense [S, L] attention matrix down to the top 256.

Rows (op "model"), at each context length ctx:
- phase=prefill: generate(ctx-token prompt, max_new_tokens=1): the prompt's forward and one
  token; its tokens/s counts prompt tokens.
- phase=decode: one decode step after the prompt: ds_model.decode over its paged latent cache,
  and transformers' forward of one token with its DynamicCache, as each generate runs it
  every step (the per-step bookkeeping of the two generate loops is left out; timing whole
  generate calls and subtracting drowns the steps in the prefill's noise at long contexts).
  ds_model[compile] (CUDA, or CPU runs without --quick): generate(compile=True)'s captured step
  (ds_model/captured.py: torch.compile on CPU, a CUDA graph on CUDA), its cache bookkeeping
  included; notes["capture_s"] is its one-time capture, done before the timing.
ds_model decodes absorbed, reading (Dc + Dr) values per cached token; transformers re-expands
its whole latent cache through kv_b_proj into per-head K and V every step, Hq * (Dn + Dv) more
per token.

Cache bytes per token (all layers) are printed to stderr: ds_model's from its KVCache, and
transformers' measured on the cache its generate returns, plus the K/V it expands (one layer at
a time) every step. Before timing, both models' logits on a short prompt must agree.
"""

import sys
import tempfile

import torch

from bench.harness import Row, assert_close, time_fns
from ds_model import DeepSeekForCausalLM, captured

CONFIG = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
              num_hidden_layers=4, first_k_dense_replace=1, n_routed_experts=16,
              num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1,
              num_attention_heads=8, num_key_value_heads=8, q_lora_rank=None,
              kv_lora_rank=128, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
              max_position_embeddings=16384, eos_token_id=None, bos_token_id=None)
# (full, quick) per family. transformers' V3.2 indexer holds [S, index_n_heads, L] fp32 scores
# in prefill: 4.3 GB at 4096 tokens, 17 GB at 8192 (more than this machine's 23 GB free).
CONTEXTS = {"deepseek_v3": ((256, 2048, 8192), (256, 2048)),
            "deepseek_v32": ((256, 1024, 4096), (256, 1024))}
STEPS = 20                                                           # timed decode steps, at most
BASELINE = "transformers"
COMPILED = "ds_model[compile]"
OP = "model"
# What each family adds to CONFIG.
FAMILIES = {"deepseek_v3": {},
            "deepseek_v32": dict(q_lora_rank=192, index_topk=256, index_head_dim=128,
                                 index_n_heads=64)}


def run(device: torch.device, quick: bool) -> list[Row]:
    return [row for family in FAMILIES for row in _run(family, device, quick)]


def _run(family, device, quick):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hf, ours = _models(family, device, dtype)
    g = torch.Generator().manual_seed(0)
    # Longer than the V3.2 model's index_topk: the check covers a pruned selection.
    probe = torch.randint(CONFIG["vocab_size"], (1, 320), generator=g).to(device)
    with torch.inference_mode():
        assert_close(f"model logits: ds_model vs transformers ({family})", ours(probe).float(),
                     hf(probe).logits.float(), 1e-4 if dtype == torch.float32 else 3e-2)
    rows = []
    for ctx in CONTEXTS[family][quick]:
        ids = torch.randint(CONFIG["vocab_size"], (1, ctx), generator=g).to(device)
        with torch.inference_mode():
            _cache_bytes(hf, ours, ids)
            prefill = time_fns({"ds_model": lambda: ours.generate(ids, 1),
                                BASELINE: lambda: hf.generate(ids, max_new_tokens=1,
                                                              do_sample=False, pad_token_id=0)},
                               device, warmup=1, reps=20, budget_s=2.0)
            captures = []
            steps = _decode_steps(hf, ours, ids, captures if device.type == "cuda" or not quick
                                  else None)
            decode = time_fns(steps, device, warmup=1, reps=STEPS, budget_s=1.0)
        for name in prefill:
            rows.append(_row(name, dict(model=family, ctx=ctx, B=1, phase="prefill"), dtype,
                             device, ctx, prefill[name]))
            print(f"[model] {family} ctx={ctx} {name}: prefill "
                  f"{prefill[name]['median_us'] / 1e3:.1f} ms", file=sys.stderr, flush=True)
        for name in decode:
            rows.append(_row(name, dict(model=family, ctx=ctx, B=1, phase="decode"), dtype,
                             device, 1, decode[name]))
            if name == COMPILED:
                rows[-1].notes["capture_s"] = f"{captures[0]:.1f}"
            print(f"[model] {family} ctx={ctx} {name}: decode "
                  f"{decode[name]['median_us'] / 1e3:.2f} ms/token", file=sys.stderr, flush=True)
    return rows


def _decode_steps(hf, ours, ids, captures):
    """One decode step each, after the prompt ids [1, ctx] is cached; every call appends one
    more token (at most 1 + STEPS calls: the warm-up and the timed ones). With a ``captures``
    list, COMPILED too: the step captured before timing, the seconds that took appended."""
    ctx = ids.shape[1]
    prompt_bounds = torch.tensor([0, ctx], dtype=torch.int32, device=ids.device)
    cache, compiled_cache = (ours.new_cache([ctx + 2 + STEPS]) for _ in range(2))
    ours.prefill(ids[0], prompt_bounds, cache)
    ours.prefill(ids[0], prompt_bounds, compiled_cache)
    hf_cache = hf(ids, use_cache=True).cache
    token, seq_ids = ids[:, -1], torch.zeros(1, dtype=torch.long, device=ids.device)
    steps = {"ds_model": lambda: ours.decode(token, seq_ids, cache),
             BASELINE: lambda: hf(token[:, None], cache=hf_cache, use_cache=True).logits}
    if captures is not None:
        compiled = captured.CapturedDecode(ours, compiled_cache)
        assert_close("model decode: captured vs eager", compiled(token, seq_ids).float(),
                     ours.decode(token, seq_ids, cache).float(), 1e-4)
        captures.append(compiled.capture_s)
        steps[COMPILED] = lambda: compiled(token, seq_ids)
    return steps


def _models(family, device, dtype):
    import transformers

    torch.manual_seed(0)
    name = {"deepseek_v3": "DeepseekV3", "deepseek_v32": "DeepseekV32"}[family]
    config = getattr(transformers, f"{name}Config")(**{**CONFIG, **FAMILIES[family]})
    hf = getattr(transformers, f"{name}ForCausalLM")(config)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = DeepSeekForCausalLM.from_pretrained(folder, dtype=dtype, device=device)
    total, active = ours.config.num_parameters()
    print(f"[model] {family}: {total / 1e6:.1f}M parameters ({active / 1e6:.1f}M active per "
          "token)",
          file=sys.stderr, flush=True)
    return hf.to(device, dtype).eval(), ours


def _cache_bytes(hf, ours, ids):
    """Print both caches' bytes per token, measured on what each holds after a generate."""
    ctx = ids.shape[1]
    cache = ours.new_cache([ctx])
    c = ours.config
    with torch.inference_mode():
        out = hf.generate(ids[:, :64], max_new_tokens=1, do_sample=False, pad_token_id=0,
                          return_dict_in_generate=True)
    held = sum(t.nbytes for layer in out.cache.layers  # V3.2: its index keys too
               for t in (layer.keys, layer.values, getattr(layer, "indexer_keys", None))
               if t is not None) // out.cache.get_seq_length()
    expanded = (c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)
                * ours.lm_head.weight.element_size())
    parts = "paged latent + index keys" if cache.index_layers else "paged latent"
    print(f"[model] ctx={ctx} cache bytes per token: ds_model {cache.bytes_per_token():,} "
          f"({parts}; {cache.nbytes() / 2**20:.1f} MiB for {ctx} tokens); transformers "
          f"{held:,} held + {expanded:,} per layer re-expanded every step "
          f"({ctx * expanded / 2**20:.1f} MiB at this ctx)", file=sys.stderr, flush=True)


def _row(impl, shape, dtype, device, tokens, t):
    return Row(op=OP, impl=impl, shape=shape, dtype=str(dtype).replace("torch.", ""),
               device=str(device), median_us=round(t["median_us"], 3),
               p20_us=round(t["p20_us"], 3), p80_us=round(t["p80_us"], 3),
               tokens_per_s=round(tokens / (t["median_us"] * 1e-6), 1), baseline=BASELINE,
               others_cpu=t["others_cpu"])
