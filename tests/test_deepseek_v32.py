"""ds_model on DeepSeek-V3.2 (DeepSeek Sparse Attention) against transformers'
DeepseekV32ForCausalLM, with prompts longer than index_topk so that the selection prunes: the
same state_dict keys, logits and greedy tokens; cached prefill and decode against the
forward; checkpoints (dense and FP8) through from_pretrained; FP8 caches; the preset, the
cache and ModelConfig's checks of the indexer's fields. (The Triton lane: test_model's
test_triton_backend.)"""

import pytest
import torch

from ds_model import DeepSeekForCausalLM, ModelConfig
from test_model import check_cached_steps_match_the_forward
from test_quantized_model import fp8_checkpoint
from tiny_deepseek import CONFIG, V32_CONFIG, hf_model, transformers

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8,
        "rope_theta": 10000.0}
VARIANTS = {"plain": {}, "yarn+tied": dict(rope_parameters=YARN, tie_word_embeddings=True),
            "bias": dict(attention_bias=True)}


def ours(hf) -> DeepSeekForCausalLM:
    model = DeepSeekForCausalLM(ModelConfig.from_hf_config(hf.config)).eval()
    model.load_state_dict(hf.state_dict())
    return model


def test_state_dict_keys_and_shapes_are_transformers():
    hf = hf_model(v32=True)
    model = DeepSeekForCausalLM(ModelConfig.from_hf_config(hf.config))
    want = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == want
    assert "model.layers.0.self_attn.indexer.k_norm.bias" in want


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers_and_the_selection_prunes(variant):
    hf = hf_model(v32=True, **VARIANTS[variant])
    model = ours(hf)
    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits                                     # [3, 40, V]
        got = model(ids)
        # The same weights attending densely (index_topk >= the prompt) give other logits:
        # the comparison above saw the pruning.
        dense = transformers.DeepseekV32ForCausalLM(transformers.DeepseekV32Config(
            **{**hf.config.to_dict(), "index_topk": 64})).eval()
        dense.load_state_dict(hf.state_dict())
        assert (dense(ids).logits - want).abs().max() > 1
    assert want.std() > 1
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)


def test_cached_prefill_and_decode_match_the_forward():
    """test_model's check (ragged prompts, some shorter than index_topk, decode steps for all
    and then some sequences); the cache also holds the index keys."""
    model = ours(hf_model(v32=True))
    check_cached_steps_match_the_forward(model)
    config = model.config
    row = (config.kv_lora_rank + config.qk_rope_head_dim + config.index_head_dim) * 4
    assert model.new_cache([5]).bytes_per_token() == config.num_hidden_layers * row


def test_greedy_tokens_match_transformers(tmp_path):
    hf = hf_model(v32=True)
    hf.save_pretrained(tmp_path)
    model = DeepSeekForCausalLM.from_pretrained(tmp_path)
    assert model.config.index_topk == V32_CONFIG["index_topk"]
    ids = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))
    want = hf.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, 10), want)


def test_fp8_checkpoint_indexer_weights_quantized(tmp_path):
    """DeepSeek's FP8 layout with the indexer's projections quantised too: held quantised,
    the logits of transformers on the dequantised weights."""
    hf = hf_model(v32=True, moe_intermediate_size=128)
    folder, reference = fp8_checkpoint(tmp_path, hf)
    model = DeepSeekForCausalLM.from_pretrained(folder)
    assert model.model.layers[0].self_attn.indexer.wq_b.weight.dtype == torch.float8_e4m3fn
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=1e-4, rtol=1e-4)


def test_fp8_caches_decode_close_to_the_float_caches():
    """FP8 latent rows (sparse_mla reads them) and FP8 index keys (lightning_indexer reads
    them) in prefill and decode: 132 bytes a token a layer for 128-wide index keys, logits
    within FP8's rounding of the float caches'. Two choices keep that a test of rounding
    (measured over 4 seeds: 0.024 to 0.048 relative error here): index_topk covers the prompts
    (with 8 of them, FP8 moves index scores across the cut and a changed selection moves the
    logits discretely: 0.17 to 0.28), and weights ~N(0, 0.05) rather than tiny_deepseek's 0.2
    (whose peaky attention and routing turn the latents' rounding into 0.4 to 1.1)."""
    model = ours(hf_model(v32=True, kv_lora_rank=128, index_head_dim=128, index_topk=32,
                          initializer_range=0.05))
    ids = torch.randint(0, 128, (30,), generator=torch.Generator().manual_seed(1))
    cu_seqlens = torch.tensor([0, 12, 30], dtype=torch.int32)
    logits = {}
    with torch.inference_mode():
        for fp8 in (False, True):
            cache = model.new_cache([14, 20], fp8=fp8)
            first = model.prefill(ids, cu_seqlens, cache)
            logits[fp8] = torch.cat([first, model.decode(first.argmax(-1), torch.arange(2),
                                                         cache)])
            Dr, layers = model.config.qk_rope_head_dim, model.config.num_hidden_layers
            row = (128 + 4 + 2 * Dr) + (128 + 4) if fp8 else (128 + Dr + 128) * 4
            assert cache.bytes_per_token() == layers * row
            assert cache.index_layers[0].dtype == (torch.uint8 if fp8 else torch.float32)
    error = (logits[True] - logits[False]).norm() / logits[False].norm()
    assert 0 < error < 2**-4, error
    with pytest.raises(ValueError, match="FP8 index-key cache needs index_head_dim a multiple "
                                         "of 128, got 16"):
        ours(hf_model(v32=True, kv_lora_rank=128)).new_cache([4], fp8=True)


def test_preset_counts_and_config():
    config = ModelConfig.preset("deepseek-v3.2-685b")
    assert (config.index_topk, config.index_head_dim, config.index_n_heads) == (2048, 128, 64)
    total, active = config.num_parameters()
    assert round(total / 1e9, 1) == 671.9 and 38.0e9 < active < 39.0e9
    from_hf = ModelConfig.from_hf_config(transformers.DeepseekV32Config(**CONFIG, **V32_CONFIG))
    assert from_hf.index_topk == 8 and ModelConfig.from_hf_config(
        transformers.DeepseekV3Config(**CONFIG)).index_topk is None


@pytest.mark.parametrize("change, match", [
    (dict(index_topk=0), r"index_topk must be an int >= 1 or null, got 0"),
    (dict(index_head_dim=4), r"index_head_dim must be an int >= 8 \(its first "
                             r"qk_rope_head_dim=8 columns are rotated\), got 4"),
    (dict(index_n_heads=0), "index_n_heads must be an int >= 1"),
    (dict(q_lora_rank=None), "index_topk .* needs q_lora_rank"),
])
def test_config_validation_names_the_field(change, match):
    fields = {k: v for k, v in CONFIG.items() if k not in ("num_key_value_heads",
                                                            "initializer_range")}
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**fields, **V32_CONFIG, **change})
