"""patch_deepseek_v3 on a live transformers DeepseekV3, and patch / unpatch on V3 and V3.2
(DeepseekV32ForCausalLM, sparse attention through lightning_indexer + sparse_mla): the same
logits, gradients and greedy tokens as unpatched, through ds_kernels' attention kernels where
the masks allow; unpatch restores the model exactly. Every test undoes the patches it
applies."""

import copy

import pytest
import torch

import ds_kernels
from conftest import DEVICE
from numerics import assert_close

transformers = pytest.importorskip("transformers")
from ds_kernels.integrations import hf as integration  # noqa: E402
from ds_kernels.integrations.hf import patch_deepseek_v3, unpatch_deepseek_v3  # noqa: E402

# A whole network's chain of sums: atol 1e-4, rtol 1e-3 on fp32 logits and gradients.
NETWORK = 10_000
PATCHED_CLASSES = tuple(f"{family}{part}" for family in ("DeepseekV3", "DeepseekV32")
                        for part in ("RMSNorm", "TopkRouter", "Experts", "Attention"))


def _model(q_lora_rank=None, rope_interleave=True, attn="sdpa", seed=0, v32=False):
    """Two layers (one dense, one MoE with grouped routing), weights ~N(0, 0.2) so the logits
    spread out, norm weights and the routing bias random too. v32: a DeepseekV32ForCausalLM,
    DeepSeek Sparse Attention over 6 of the cached tokens a query (prompts of 7+ prune), the
    indexer's LayerNorm bias random too."""
    fields = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4,
        num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
        topk_group=1, kv_lora_rank=32, q_lora_rank=q_lora_rank, qk_rope_head_dim=16,
        qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=256,
        initializer_range=0.2, pad_token_id=0)
    if v32:
        config = transformers.DeepseekV32Config(**fields, index_topk=6, index_head_dim=32,
                                                index_n_heads=8)
    else:
        config = transformers.DeepseekV3Config(**fields, rope_interleave=rope_interleave)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = (transformers.DeepseekV32ForCausalLM if v32 else
             transformers.DeepseekV3ForCausalLM)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((0 if name.endswith("bias") else 1) + 0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.1 * torch.randn_like(b))
    return model.eval().to(DEVICE)


def _inputs(B=2, S=7, seed=1):
    ids = torch.randint(1, 128, (B, S), generator=torch.Generator().manual_seed(seed))
    return ids.to(DEVICE), torch.ones(B, S, dtype=torch.long, device=DEVICE)


def _generate(model, ids, mask, steps=5):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                              output_scores=True, return_dict_in_generate=True)


def _patched_modules(model):
    return [m for m in model.modules() if type(m).__name__ in PATCHED_CLASSES]


def _counted(monkeypatch, *names):
    """How often the patched attention calls each of these kernels, from now on."""
    counts = dict.fromkeys(names, 0)
    for name in counts:
        def counted(*args, _op=getattr(integration, name), _name=name, **kwargs):
            counts[_name] += 1
            return _op(*args, **kwargs)
        monkeypatch.setattr(integration, name, counted)
    return counts


@pytest.fixture
def calls(monkeypatch):
    return _counted(monkeypatch, "mla_prefill", "mla_decode")


def _before_and_after_patching(model, run):
    """run() on the unpatched model, then on the patched one (unpatched again afterwards)."""
    with torch.no_grad():
        expected = run()
        integration.patch(model)
        try:
            return expected, run()
        finally:
            integration.unpatch(model)


@pytest.mark.parametrize("q_lora_rank", [None, 24])
@pytest.mark.parametrize("rope_interleave", [True, False])
def test_logits_match(calls, q_lora_rank, rope_interleave):
    model = _model(q_lora_rank, rope_interleave)
    ids, _ = _inputs()
    expected, logits = _before_and_after_patching(model, lambda: model(ids).logits)
    assert_close(logits, expected, torch.float32, reduction=NETWORK, what="logits")
    assert calls["mla_prefill"] == 2                               # one per layer


@pytest.mark.parametrize("q_lora_rank", [None, 24])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])               # None / additive-float masks
def test_greedy_generate_matches(calls, q_lora_rank, attn):
    model = _model(q_lora_rank, attn=attn)
    ids, mask = _inputs()
    expected, out = _before_and_after_patching(model, lambda: _generate(model, ids, mask))
    assert torch.equal(out.sequences, expected.sequences)
    for step, (got, want) in enumerate(zip(out.scores, expected.scores)):
        assert_close(got, want, torch.float32, reduction=NETWORK, what=f"step {step} logits")
    # prefill then absorbed decode in both layers at every later step
    assert calls == {"mla_prefill": 2, "mla_decode": 2 * (len(out.scores) - 1)}


def test_padded_batch_falls_back_and_matches(calls):
    model = _model(q_lora_rank=24)
    ids, mask = _inputs()
    mask[0, :3] = 0                                                 # left padding
    expected, out = _before_and_after_patching(model, lambda: _generate(model, ids, mask))
    assert torch.equal(out.sequences, expected.sequences)
    assert calls == {"mla_prefill": 0, "mla_decode": 0}


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_gradients_match(calls, q_lora_rank):
    model = _model(q_lora_rank).train()
    ids, _ = _inputs()

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    expected = grads()
    patch_deepseek_v3(model)
    try:
        got = grads()
    finally:
        unpatch_deepseek_v3(model)
    assert calls["mla_prefill"] == 2
    assert got.keys() == expected.keys()
    for name, grad in got.items():
        assert_close(grad, expected[name], torch.float32, reduction=NETWORK, what=name)


def test_cache_is_shared_with_transformers(calls):
    """Patched steps write the cache exactly as transformers does: prefill patched, then a
    3-token chunk (falls back: new tokens after cached ones), then one token, then one more
    with the model unpatched; every step's logits match an all-unpatched run."""
    model = _model(q_lora_rank=24)
    ids, _ = _inputs(S=9)
    chunks = (ids[:, :4], ids[:, 4:7], ids[:, 7:8], ids[:, 8:])

    def run(patch_steps):
        cache, logits = None, []
        with torch.no_grad():
            for step, chunk in enumerate(chunks):
                if step in patch_steps:
                    patch_deepseek_v3(model)
                try:
                    out = model(chunk, cache=cache, use_cache=True)
                finally:
                    unpatch_deepseek_v3(model)
                cache = out.cache
                logits.append(out.logits)
        return logits

    expected = run(patch_steps=())
    for step, (got, want) in enumerate(zip(run(patch_steps=(0, 1, 2)), expected)):
        assert_close(got, want, torch.float32, reduction=NETWORK, what=f"step {step} logits")
    assert calls == {"mla_prefill": 2, "mla_decode": 2}


def test_base_model():
    model = _model().model                                          # DeepseekV3Model
    ids, _ = _inputs()
    expected, got = _before_and_after_patching(model, lambda: model(ids).last_hidden_state)
    assert_close(got, expected, torch.float32, reduction=NETWORK, what="hidden states")


def test_bfloat16_model(calls):
    model = _model(q_lora_rank=24).to(torch.bfloat16)
    ids, mask = _inputs()
    with torch.no_grad():
        expected = model(ids).logits
    expected_tokens = _generate(model, ids, mask, steps=2)
    patch_deepseek_v3(model)
    try:
        with torch.no_grad():
            logits = model(ids).logits
        tokens = _generate(model, ids, mask, steps=2)
    finally:
        unpatch_deepseek_v3(model)
    # transformers rotates in bf16, apply_rope in fp32: a few bf16 roundings apart
    assert_close(logits, expected, torch.bfloat16, reduction=64, what="logits")
    assert tokens.sequences.shape == expected_tokens.sequences.shape   # ties may break apart
    assert calls == {"mla_prefill": 2 * 2, "mla_decode": 2}


def test_triton_backend():
    """The Triton kernels (the interpreter on CPU) on the strided views the patch passes them."""
    model = _model(q_lora_rank=24)
    ids, mask = _inputs(S=5)
    expected = _generate(model, ids, mask, steps=2)
    patch_deepseek_v3(model)
    try:
        with ds_kernels.use_backend("triton"):
            out = _generate(model, ids, mask, steps=2)
    finally:
        unpatch_deepseek_v3(model)
    assert torch.equal(out.sequences, expected.sequences)
    for got, want in zip(out.scores, expected.scores):
        assert_close(got, want, torch.float32, reduction=NETWORK, what="logits")


def test_unpatch_restores_exactly():
    model = _model(q_lora_rank=24)
    ids, _ = _inputs()
    modules = list(model.modules())
    params = list(model.parameters())
    with torch.no_grad():
        before = model(ids).logits
    patch_deepseek_v3(model)
    targets = _patched_modules(model)
    assert len(targets) == 2 * (1 + 4) + 1 + 2      # per layer attention + 4 norms; final norm; MoE
    assert all(m.forward.__func__ is not type(m).forward for m in targets)
    unpatch_deepseek_v3(model)
    assert list(model.modules()) == modules
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    for m in targets:
        assert "forward" not in m.__dict__
        assert m.forward.__func__ is type(m).forward
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_patching_twice_is_a_no_op():
    model = _model()
    unpatch_deepseek_v3(model)                                      # unpatched: nothing to undo
    patch_deepseek_v3(model)
    forwards = [m.__dict__["forward"] for m in _patched_modules(model)]
    assert patch_deepseek_v3(model) is model
    again = [m.__dict__["forward"] for m in _patched_modules(model)]
    assert all(a is b for a, b in zip(again, forwards, strict=True))
    unpatch_deepseek_v3(model)
    assert all("forward" not in m.__dict__ for m in _patched_modules(model))


def test_deepcopy_of_a_patched_model_runs_its_own_modules():
    model = patch_deepseek_v3(_model())
    try:
        clone = copy.deepcopy(model)
        assert all(m.forward.__self__ is m for m in _patched_modules(clone))
        unpatch_deepseek_v3(clone)
        assert all("forward" in m.__dict__ for m in _patched_modules(model))
    finally:
        unpatch_deepseek_v3(model)


def test_rms_norm_with_a_wider_weight_keeps_transformers_dtype():
    model = patch_deepseek_v3(_model())
    try:
        norm = model.model.norm
        x = torch.randn(3, 64, device=DEVICE, dtype=torch.bfloat16)
        out = norm(x)                                               # fp32 weight, bf16 input
        assert out.dtype == torch.float32
        assert torch.equal(out, type(norm).forward(norm, x))
    finally:
        unpatch_deepseek_v3(model)


def test_rejects_other_models():
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2))
    for bad in (llama, torch.nn.Linear(2, 2)):
        with pytest.raises(TypeError, match="DeepseekV3 model.*got (LlamaForCausalLM|Linear)"):
            patch_deepseek_v3(bad)
        with pytest.raises(TypeError, match="DeepseekV3 model"):
            unpatch_deepseek_v3(bad)


def test_refuses_a_module_with_its_own_forward_and_changes_nothing():
    model = _model()
    norm = model.model.norm
    norm.forward = lambda x: x                                      # e.g. a hook's wrapper
    try:
        with pytest.raises(ValueError, match="'model.norm'.*already has its own forward"):
            patch_deepseek_v3(model)
        assert all("forward" not in m.__dict__ for m in _patched_modules(model) if m is not norm)
    finally:
        del norm.forward


def test_refuses_non_silu_experts():
    model = _model()
    model.config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="silu.*'gelu'"):
        patch_deepseek_v3(model)
    assert all("forward" not in m.__dict__ for m in _patched_modules(model))


# ---- Models loaded from FP8 checkpoints (tiny_deepseek's published layout) ----

def _fp8_folder(tmp_path, hf):
    """hf's weights in DeepSeek's FP8 layout, as a checkpoint folder."""
    from tiny_deepseek import FP8_CONFIG, per_expert, quantize_tensors, write_checkpoint

    tensors, _ = quantize_tensors(per_expert(hf.state_dict()))
    config = {**hf.config.to_dict(), "dtype": "float32", "quantization_config": FP8_CONFIG}
    return write_checkpoint(tmp_path, config, tensors, shards=2)


def _fp8_structure(hf, **config):
    """A copy of hf with transformers' FP8 modules (empty, on the meta device) where it keeps
    an FP8 checkpoint's on an FP8 GPU; config: FineGrainedFP8Config's."""
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear

    model = copy.deepcopy(hf)
    return replace_with_fp8_linear(model, modules_to_not_convert=["lm_head"], pre_quantized=True,
                                   quantization_config=transformers.FineGrainedFP8Config(**config))


def _kept_fp8(hf, experts):
    """hf as transformers holds an FP8 checkpoint on an FP8 GPU (FP8Linear, FP8Experts), with
    weights quantised by DeepSeek's recipe; and transformers' model on the dequantised ones.
    experts "mxfp4": V4's (int8 bytes, e8m0 scales, which V4's ue8m0 gives every module)."""
    from tiny_deepseek import dequantized_model, quantize_tensors

    if experts == "fp8":
        model = _fp8_structure(hf)
        tensors, dequantized = quantize_tensors(hf.state_dict())
    else:
        model = _fp8_structure(hf, expert_dtype="fp4", scale_fmt="ue8m0")
        tensors, dequantized = quantize_tensors(hf.state_dict(), experts="mxfp4",
                                                scale_fmt="ue8m0",
                                                scale_dtype=torch.float8_e8m0fnu)
        tensors = {k: t.view(torch.int8) if t.dtype == torch.float4_e2m1fn_x2 else t
                   for k, t in tensors.items()}
    assert {k: t.dtype for k, t in model.state_dict().items()} == {
        k: t.dtype for k, t in tensors.items()}
    model.load_state_dict(tensors, assign=True)
    return model.eval(), dequantized_model(hf, dequantized)


def _fp8_modules(model):
    from transformers.integrations.finegrained_fp8 import FP8Experts, FP8Linear

    return [m for m in model.modules() if type(m) in (FP8Linear, FP8Experts)]


def test_fp8_checkpoint_dequantised_by_transformers_on_cpu(tmp_path, calls):
    """On CPU transformers dequantises an FP8 checkpoint into plain modules (with accelerate
    installed): the patch runs them as any other model."""
    pytest.importorskip("accelerate")
    from tiny_deepseek import QUANTIZED_CONFIG, hf_model

    model = transformers.DeepseekV3ForCausalLM.from_pretrained(
        _fp8_folder(tmp_path, hf_model(**QUANTIZED_CONFIG))).eval().to(DEVICE)
    assert not _fp8_modules(model)
    ids, mask = _inputs()
    expected, out = _before_and_after_patching(model, lambda: _generate(model, ids, mask))
    assert torch.equal(out.sequences, expected.sequences)
    for step, (got, want) in enumerate(zip(out.scores, expected.scores)):
        assert_close(got, want, torch.float32, reduction=NETWORK, what=f"step {step} logits")
    assert calls["mla_decode"] > 0


@pytest.mark.parametrize("experts", ["fp8", "mxfp4"])
def test_fp8_modules_run_on_ds_kernels(calls, experts):
    """FP8Linear and FP8Experts, as transformers keeps them on FP8 GPUs (their own forward needs
    one): patched, they run quant_linear / fused_moe (and absorbed decode dequantises kv_b_proj),
    giving transformers' logits and greedy tokens on the dequantised weights; unpatched again
    after. Gradients reach the input only, as with transformers' FP8 functions."""
    from tiny_deepseek import QUANTIZED_CONFIG, hf_model

    model, reference = _kept_fp8(hf_model(**QUANTIZED_CONFIG), experts)
    modules = _fp8_modules(model)
    assert len(modules) == 3 * 5 + 3 * 3 + 2   # attention, MLPs, shared experts; experts
    ids, mask = _inputs()
    patch_deepseek_v3(model)
    try:
        assert all("forward" in m.__dict__ for m in modules)
        with torch.no_grad():
            assert_close(model(ids).logits, reference(ids).logits, torch.float32,
                         reduction=NETWORK, what="logits")
        out, want = _generate(model, ids, mask), _generate(reference, ids, mask)
        assert torch.equal(out.sequences, want.sequences)
        embeddings = model.model.embed_tokens(ids).detach().requires_grad_()
        model(inputs_embeds=embeddings).logits.sum().backward()
        assert embeddings.grad is not None and model.model.layers[0].self_attn.o_proj.weight.grad \
            is None
    finally:
        unpatch_deepseek_v3(model)
    assert all("forward" not in m.__dict__ for m in modules)
    assert calls["mla_decode"] > 0


@pytest.mark.parametrize("config, overrides, match", [
    ({"activation_scheme": "static"}, {}, r"activation_scheme='static': static activation "
                                          r"scales are not supported"),
    ({"weight_block_size": (64, 64)}, {}, r"block_size=\(64, 64\): ds_kernels takes 128x128"),
    ({}, {"moe_intermediate_size": 32},
     r"model.layers.1.mlp.experts.gate_up_proj_scale_inv must have shape \[8, 1, 1\] for "
     r"model.layers.1.mlp.experts.gate_up_proj of shape \(8, 64, 64\).*got \[8, 2, 1\]"),
])
def test_fp8_modules_refused_name_the_module(config, overrides, match):
    """What the kernels cannot run is refused when patching, and nothing is patched:
    transformers' static activation scales, other blocks, and its FP8Experts scale grid for
    I < 128 (two rows, one each for gate and up)."""
    from tiny_deepseek import QUANTIZED_CONFIG, hf_model

    model = _fp8_structure(hf_model(**{**QUANTIZED_CONFIG, **overrides}), **config)
    with pytest.raises(ValueError, match=match):
        patch_deepseek_v3(model)
    assert all("forward" not in m.__dict__ for m in model.modules())


# ---- DeepSeek-V3.2 (DeepseekV32ForCausalLM) through the common entry point ----

V32_PATCHED = ("DeepseekV32RMSNorm", "DeepseekV32TopkRouter", "DeepseekV32Experts",
               "DeepseekV32Attention")


def _v32_model(attn="sdpa"):
    return _model(q_lora_rank=24, attn=attn, v32=True)


@pytest.fixture
def sparse_calls(monkeypatch):
    return _counted(monkeypatch, "lightning_indexer", "sparse_mla")


def test_v32_logits_match_and_prune(sparse_calls):
    model = _v32_model()
    ids, _ = _inputs(S=20)
    expected, logits = _before_and_after_patching(model, lambda: model(ids).logits)
    assert_close(logits, expected, torch.float32, reduction=NETWORK, what="logits")
    assert sparse_calls == {"lightning_indexer": 2, "sparse_mla": 2}  # one per layer
    # The selection prunes: the same weights attending over every token differ.
    model.config.index_topk = 64
    for layer in model.model.layers:
        layer.self_attn.indexer.index_topk = 64
    with torch.no_grad():
        assert (model(ids).logits - expected).abs().max() > 0.5


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_v32_greedy_generate_matches(sparse_calls, attn):
    """Prefill, then decode steps reading transformers' own cache (both of its parts)."""
    model = _v32_model(attn=attn)
    ids, mask = _inputs(S=9)
    expected, out = _before_and_after_patching(model, lambda: _generate(model, ids, mask, steps=6))
    assert torch.equal(out.sequences, expected.sequences)
    for step, (got, want) in enumerate(zip(out.scores, expected.scores)):
        assert_close(got, want, torch.float32, reduction=NETWORK, what=f"step {step} logits")
    assert sparse_calls["sparse_mla"] == 2 * len(out.scores)


def test_v32_chunked_prefill_matches(sparse_calls):
    """Several new tokens after cached ones (chunked prefill) stay on the kernels: the cache
    of the first chunk, then the second chunk against it."""
    model = _v32_model()
    ids, _ = _inputs(S=16)

    def run():
        cache = transformers.DynamicCache(config=model.config)
        first = model(ids[:, :9], cache=cache, use_cache=True).logits
        second = model(ids[:, 9:], cache=cache, use_cache=True).logits
        return torch.cat([first, second], dim=1)

    expected, logits = _before_and_after_patching(model, run)
    assert_close(logits, expected, torch.float32, reduction=NETWORK, what="logits")
    assert sparse_calls["sparse_mla"] == 4                          # 2 chunks x 2 layers


def test_v32_padded_batch_and_gradients_fall_back():
    """Left padding (not plain causal) and grad-enabled calls run transformers' forward."""
    model = _v32_model()
    ids, mask = _inputs(S=10)
    mask[0, :3] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    integration.patch(model)
    try:
        with torch.no_grad():
            got = model(ids, attention_mask=mask).logits
        loss = model(ids).logits.square().mean()
        loss.backward()
    finally:
        integration.unpatch(model)
    assert_close(got, expected, torch.float32, reduction=NETWORK, what="logits")
    assert model.model.layers[0].self_attn.q_b_proj.weight.grad is not None


def test_v32_triton_backend():
    model = _v32_model()
    ids, _ = _inputs(S=10)
    with ds_kernels.use_backend("triton"):
        expected, logits = _before_and_after_patching(model, lambda: model(ids).logits)
    assert_close(logits, expected, torch.float32, reduction=NETWORK, what="logits")


def test_patch_takes_either_family_and_unpatch_restores():
    for model in (_model(q_lora_rank=24), _v32_model()):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        assert integration.patch(model) is model
        # 4 RMSNorms a layer and the final one, 2 attentions, the MoE's router and experts
        assert len(_patched_modules(model)) == 2 * 4 + 1 + 2 + 2
        assert all("forward" in m.__dict__ for m in _patched_modules(model))
        assert integration.unpatch(model) is model
        assert not any("forward" in m.__dict__ for m in model.modules())
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="DeepseekV3 model .* got DeepseekV32ForCausalLM"):
        patch_deepseek_v3(_v32_model())
    with pytest.raises(TypeError, match="DeepseekV3 or DeepseekV32 model .* got Linear"):
        integration.patch(torch.nn.Linear(2, 2))
