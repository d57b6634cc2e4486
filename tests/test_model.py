"""ds_model.DeepSeekForCausalLM against transformers' DeepseekV3ForCausalLM: the same
state_dict keys and logits; the cached prefill and the absorbed decode against the uncached
forward; the paged cache; the presets' parameter counts; ModelConfig's validation and
topk_method."""

import dataclasses

import pytest
import torch

import ds_kernels
from ds_model import DeepSeekForCausalLM, ModelConfig
from ds_model.config import PRESETS, TOPK_METHODS
from tiny_deepseek import CONFIG, hf_model, transformers

# Unequal mscales: cos/sin get a factor (transformers) besides the softmax scale's.
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8,
        "rope_theta": 10000.0}
VARIANTS = {
    "q_lora": {},
    "no_q_lora": dict(q_lora_rank=None),
    "halves_rope+bias": dict(rope_interleave=False, attention_bias=True),
    "yarn+tied": dict(rope_parameters=YARN, tie_word_embeddings=True),
}


def ours(hf) -> DeepSeekForCausalLM:
    model = DeepSeekForCausalLM(ModelConfig.from_hf_config(hf.config)).eval()
    model.load_state_dict(hf.state_dict())
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_keys_and_shapes_are_transformers(variant):
    hf = hf_model(**VARIANTS[variant])
    model = DeepSeekForCausalLM(ModelConfig.from_hf_config(hf.config))
    want = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == want


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(variant):
    hf = hf_model(**VARIANTS[variant])
    model = ours(hf)
    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits                                     # [3, 40, V]
        got = model(ids)
    assert want.std() > 1  # not degenerate
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("variant", ["q_lora", "yarn+tied"])
def test_cached_prefill_and_absorbed_decode_match_the_forward(variant):
    check_cached_steps_match_the_forward(ours(hf_model(**VARIANTS[variant])))


def check_cached_steps_match_the_forward(model):
    """Ragged prompts across 16-token pages: prefill's last logits, then three decode steps
    (the last for a subset of sequences), equal the uncached forward of each sequence."""
    g = torch.Generator().manual_seed(2)
    full = [torch.randint(0, 128, (n,), generator=g) for n in (4, 19, 37)]  # prompt + 3 new
    prompts = [s[:-3] for s in full]
    cache = model.new_cache([len(s) for s in full], block_size=16)
    cu_seqlens = torch.tensor([0, 1, 17, 51], dtype=torch.int32)
    with torch.no_grad():
        want = [model(s[None])[0] for s in full]                   # [n, V] each
        got = model.prefill(torch.cat(prompts), cu_seqlens, cache)    # [3, V]
        torch.testing.assert_close(got, torch.stack([w[len(p) - 1] for w, p in
                                                     zip(want, prompts)]), atol=1e-4, rtol=1e-4)
        for step, seq_ids in enumerate(([0, 1, 2], [0, 1, 2], [2, 0])):
            seq_ids = torch.tensor(seq_ids)
            tokens = torch.stack([full[b][len(prompts[b]) + step] for b in seq_ids])
            got = model.decode(tokens, seq_ids, cache)             # [n, V]
            expected = torch.stack([want[b][len(prompts[b]) + step] for b in seq_ids])
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert cache.seqlens.tolist() == [4, 18, 37]


def test_kv_cache_is_paged_latent_rows():
    config = ModelConfig.preset("tiny")
    cache = DeepSeekForCausalLM(config).new_cache([10, 40, 16], block_size=16)
    width = config.kv_lora_rank + config.qk_rope_head_dim
    assert [tuple(layer.shape) for layer in cache.layers] == [(1 + 3 + 1, 16, width)] * 3
    assert cache.bytes_per_token() == config.num_hidden_layers * width * 4
    assert cache.nbytes() == 5 * 16 * cache.bytes_per_token()
    assert cache.block_table[:, :1].tolist() == [[0], [1], [4]]
    slots = cache.slots(torch.tensor([1, 1]), torch.tensor([15, 16]))
    assert slots.tolist() == [1 * 16 + 15, 2 * 16]
    with pytest.raises(ValueError, match="KV cache full"):
        cache.slots(torch.tensor([0]), torch.tensor([10]))
    with pytest.raises(ValueError, match="block_size must be a power of two >= 16, got 24"):
        DeepSeekForCausalLM(config).new_cache([8], block_size=24)


def test_to_dtype_keeps_routers_fp32():
    model = DeepSeekForCausalLM(ModelConfig.preset("tiny")).to_dtype(torch.bfloat16)
    for name, tensor in model.state_dict().items():
        fp32 = name.endswith(("gate.weight", "e_score_correction_bias"))
        assert tensor.dtype == (torch.float32 if fp32 else torch.bfloat16), name
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    ids = torch.randint(0, 1024, (2, 5))
    with torch.no_grad():
        assert model.init_weights()(ids).dtype == torch.bfloat16


def test_bad_input():
    model = DeepSeekForCausalLM(ModelConfig.preset("tiny"))
    for bad in (torch.zeros(2, 0, dtype=torch.long), torch.zeros(4, dtype=torch.long),
                torch.zeros(2, 3)):
        with pytest.raises(ValueError, match="input_ids must be integer"):
            model(bad)


# The tiny preset (16 experts in 4 groups, top-2 groups, top-4 experts, 3 layers, 1024 tokens)
# with one field changed, and the error that names it.
BAD_FIELDS = [
    (dict(n_routed_experts=0), r"^n_routed_experts must be an int >= 1, got 0$"),
    (dict(hidden_size=128.0), r"^hidden_size must be an int >= 1, got 128.0$"),
    (dict(vocab_size=True), r"^vocab_size must be an int >= 1, got True$"),
    (dict(n_group=3), r"^n_routed_experts=16 is not divisible by n_group=3$"),
    (dict(n_group=None), r"^n_group must be an int >= 1, got None$"),
    (dict(topk_method="greedy", topk_group=0), r"^topk_group must be an int >= 1 or null, got 0$"),
    (dict(n_group=16, topk_group=8),
     r"^noaux_tc scores each group by its two best experts, but n_routed_experts=16 in "
     r"n_group=16 groups leaves 1 per group$"),
    (dict(topk_group=5), r"^topk_group must be an int in \[1, 4\] \(n_group=4\), got 5$"),
    (dict(num_experts_per_tok=0), r"^num_experts_per_tok must be an int >= 1, got 0$"),
    (dict(num_experts_per_tok=9), r"^num_experts_per_tok must be an int in \[1, 8\] "
                                  r"\(topk_group=2 groups of 4 experts\), got 9$"),
    (dict(topk_method="greedy", num_experts_per_tok=17),
     r"^num_experts_per_tok must be an int in \[1, 16\] \(n_routed_experts=16\), got 17$"),
    (dict(first_k_dense_replace=4),
     r"^first_k_dense_replace must be an int in \[0, 3\] \(num_hidden_layers=3\), got 4$"),
    (dict(n_shared_experts=-1), r"^n_shared_experts must be an int >= 0, got -1$"),
    (dict(q_lora_rank=0), r"^q_lora_rank must be an int >= 1 or null, got 0$"),
    (dict(qk_rope_head_dim=15), r"^qk_rope_head_dim must be even \(RoPE rotates pairs\)"),
    (dict(kv_lora_rank=None), r"^kv_lora_rank must be an int >= 1, got None$"),
    (dict(rms_norm_eps=0.0), r"^rms_norm_eps must be a finite number > 0, got 0.0$"),
    (dict(routed_scaling_factor=float("nan")), r"^routed_scaling_factor must be a finite"),
    (dict(norm_topk_prob="yes"), r"^norm_topk_prob must be true or false, got 'yes'$"),
    (dict(scoring_func="relu"), r"^scoring_func must be one of \['sigmoid', 'softmax'"),
    (dict(topk_method="top1"), r"^topk_method must be one of \['noaux_tc', "
                               r"'group_limited_greedy', 'greedy'\], got 'top1'$"),
    (dict(hidden_act="gelu"), r"^hidden_act must be one of \['silu'\], got 'gelu'$"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
     r"^rope_scaling \{.*\}: scaling rope_type must be one of \('default', 'yarn'\)"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
     r"^rope_scaling \{.*\}: yarn scaling needs 'original_max_position_embeddings'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": -4.0,
                        "original_max_position_embeddings": 128}),
     r"^rope_scaling\['factor'\] must be a finite number > 0, got -4.0$"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4, "original_max_position_embeddings":
                        128, "partial_rotary_factor": 0.5}),
     r"^rope_scaling \{.*\}: scaling has keys this module does not implement: "
     r"\['partial_rotary_factor'\]"),
    (dict(eos_token_id=1024), r"^eos_token_id must be null, an id or a list of ids in "
                              r"\[0, vocab_size=1024\), got 1024$"),
    (dict(eos_token_id=[1, "2"]), r"^eos_token_id must be .*, got \[1, '2'\]$"),
    (dict(quantization_config="fp8"), r"^quantization_config must be an object or null"),
]


@pytest.mark.parametrize("change, match", BAD_FIELDS, ids=[str(c) for c, _ in BAD_FIELDS])
def test_config_validation_names_the_field(change, match):
    """Every ModelConfig is validated when built: each field's type and range, and the rules
    that ds_kernels.route (or the RoPE tables) would otherwise enforce only at the first
    forward."""
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(ModelConfig.preset("tiny"), **change)


def test_model_validates_a_changed_config():
    config = ModelConfig.preset("tiny")
    config.n_group = 3
    with pytest.raises(ValueError, match="n_routed_experts=16 is not divisible by n_group=3"):
        DeepSeekForCausalLM(config)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("topk_method", TOPK_METHODS)
def test_config_round_trips_through_its_fields(preset, topk_method):
    """A ModelConfig written out as config.json fields and read back is the same config."""
    config = dataclasses.replace(ModelConfig.preset(preset), topk_method=topk_method)
    assert ModelConfig.from_hf_config(dataclasses.asdict(config)) == config


def test_topk_method_from_transformers_config():
    assert ModelConfig.from_hf_config(transformers.DeepseekV3Config(**CONFIG)).topk_method == \
        "noaux_tc"  # transformers 5 writes no topk_method: DeepSeek-V3's
    hf = transformers.DeepseekV3Config(**CONFIG, topk_method="group_limited_greedy")
    assert ModelConfig.from_hf_config(hf).topk_method == "group_limited_greedy"


def test_deepseek_v2_config_from_transformers():
    """transformers' DeepseekV2Config: "greedy" with n_group and topk_group None, and no
    scoring_func (V2's gate is softmax)."""
    fields = {k: v for k, v in CONFIG.items() if k not in ("n_group", "topk_group")}
    config = ModelConfig.from_hf_config(transformers.DeepseekV2Config(**fields))
    assert (config.topk_method, config.scoring_func) == ("greedy", "softmax")
    assert (config.n_group, config.topk_group, config.norm_topk_prob) == (None, None, False)
    with torch.device("meta"):
        DeepSeekForCausalLM(config)


def test_greedy_routes_over_all_experts():
    """topk_method "greedy" (DeepSeek-V2-Lite): plain top-k, whatever n_group and topk_group
    say, even values that would not do for group-limited routing."""
    config = dataclasses.replace(ModelConfig.preset("tiny"), topk_method="greedy", n_group=3,
                                 topk_group=7, num_experts_per_tok=12)
    model = DeepSeekForCausalLM(config).init_weights(generator=torch.Generator().manual_seed(4))
    gate = model.model.layers[1].mlp.gate
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(5))     # [T, H]
    with torch.no_grad():
        _, ids = gate(x)                                                    # [T, 12]
        want = (x @ gate.weight.T).topk(12, dim=-1).indices   # zero bias: the top logits
        assert torch.equal(ids.sort(dim=-1).values, want.sort(dim=-1).values.int())
        assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 1024)


def test_presets_parameter_counts():
    """num_parameters() counts what the model holds; V3 is 671B / 37.6B, R2 (hypothetical)
    within 3% of the rumoured 1.2T / 78B."""
    for name in PRESETS:
        config = ModelConfig.preset(name)
        with torch.device("meta"):
            model = DeepSeekForCausalLM(config)
        assert sum(t.numel() for t in model.state_dict().values()) == config.num_parameters()[0]
    total, active = ModelConfig.preset("deepseek-v3-671b").num_parameters()
    assert round(total / 1e9, 1) == 671.0 and 37.0e9 < active < 38.0e9
    total, active = ModelConfig.preset("r2-hypothetical-1.2t").num_parameters()
    assert abs(total / 1.2e12 - 1) < 0.03 and abs(active / 78e9 - 1) < 0.03


@pytest.mark.parametrize("v32", [False, True], ids=["deepseek_v3", "deepseek_v32"])
def test_triton_backend(v32):
    """A forward and a short generation with every op on its Triton kernel (the interpreter
    on CPU): prefill, the fused cache write and absorbed decode included; V3.2's
    index_cache_write, lightning_indexer and sparse_mla, over prompts longer than index_topk."""
    hf = hf_model(num_hidden_layers=2, n_routed_experts=4, n_group=1, topk_group=1, v32=v32)
    model = ours(hf)
    ids = torch.randint(0, 128, (2, 12 if v32 else 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want_logits, want_tokens = hf(ids).logits, model.generate(ids, 3)
    with torch.no_grad(), ds_kernels.use_backend("triton"):
        torch.testing.assert_close(model(ids), want_logits, atol=1e-3, rtol=1e-4)
        assert torch.equal(model.generate(ids, 3), want_tokens)
