"""DeepSeekForCausalLM.from_pretrained: checkpoints that transformers writes, the published
DeepSeek-V3 per-expert layout (sharded), the fused 3-D layout, and every refusal naming its
cause."""

import pytest
import torch
from safetensors import safe_open

from ds_model import DeepSeekForCausalLM
from tiny_deepseek import hf_model, per_expert, write_checkpoint


@pytest.fixture(scope="module")
def hf():
    return hf_model()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


def config_of(model) -> dict:
    return model.config.to_dict()


def check_logits(model, hf, ids):
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_save_pretrained_checkpoint_gives_transformers_logits(tmp_path, ids, q_lora_rank):
    hf = hf_model(q_lora_rank=q_lora_rank)
    hf.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert "model.layers.1.mlp.experts.0.gate_proj.weight" in f.keys()  # per expert
    model = DeepSeekForCausalLM.from_pretrained(tmp_path)
    assert not model.training and model.lm_head.weight.dtype == torch.float32
    check_logits(model, hf, ids)


def test_fused_expert_layout(tmp_path, hf, ids):
    state = hf.state_dict()
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    write_checkpoint(tmp_path, config_of(hf), state)
    check_logits(DeepSeekForCausalLM.from_pretrained(tmp_path), hf, ids)


def test_sharded_per_expert_checkpoint_skips_mtp_layers(tmp_path, hf, ids, caplog):
    """The published DeepSeek-V3 layout: per-expert keys in shards with an index, and the
    multi-token-prediction layer after the last layer (skipped with a log line)."""
    tensors = per_expert(hf.state_dict())
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in tensors
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    tensors["model.layers.3.mlp.experts.0.up_proj.weight"] = torch.zeros(32, 64)
    write_checkpoint(tmp_path, {**config_of(hf), "num_nextn_predict_layers": 1}, tensors,
                     shards=3)
    with caplog.at_level("INFO", logger="ds_model"):
        model = DeepSeekForCausalLM.from_pretrained(tmp_path)
    assert "skipped 2 tensors of the multi-token-prediction layers [3]" in caplog.text
    check_logits(model, hf, ids)


def test_dtype_and_tied_embeddings(tmp_path, ids):
    hf = hf_model(tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    model = DeepSeekForCausalLM.from_pretrained(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    check_logits(model, hf, ids)
    bf16 = DeepSeekForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for name, tensor in bf16.state_dict().items():
        fp32 = name.endswith(("gate.weight", "e_score_correction_bias"))
        assert tensor.dtype == (torch.float32 if fp32 else torch.bfloat16), name
    torch.testing.assert_close(bf16.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq,
                               rtol=0, atol=0)
    hf_bf16 = type(hf).from_pretrained(tmp_path, dtype=torch.bfloat16)
    with torch.no_grad():
        low, full, reference = bf16(ids), model(ids), hf_bf16(ids).logits
    assert low.dtype == torch.bfloat16

    def error(x):  # relative to the fp32 logits
        return float((x.float() - full).norm() / full.norm())

    assert error(low) < 1.25 * error(reference)  # bf16 rounding no worse than transformers'



def broken(tmp_path, hf, edit=None, config=None, shards=1):
    tensors = per_expert(hf.state_dict())
    if edit:
        edit(tensors)
    return write_checkpoint(tmp_path, {**config_of(hf), **(config or {})}, tensors, shards)


@pytest.mark.parametrize("case, match", [
    ("missing", r"lacks 1 tensor\(s\) the model needs: \['model.layers.1.self_attn.kv_b_proj"),
    ("missing_expert", r"lacks 1 tensor\(s\).*'model.layers.2.mlp.experts.gate_up_proj'"),
    ("unexpected", r"unexpected tensor model.layers.0.self_attn.rotary.weight"),
    ("expert_out_of_range", r"unexpected tensor model.layers.1.mlp.experts.8.up_proj.weight"),
    ("shape", r"model.layers.0.mlp.up_proj.weight has shape \(95, 64\), the model expects "
              r"\(96, 64\)"),
    ("both_layouts", r"\['model.layers.1.mlp.experts.gate_up_proj'\] written more than once"),
    ("fp8_scale", r"model.layers.0.self_attn.o_proj.weight_scale_inv \(F32\) is FP8 weight "
                  r"data: FP8 checkpoints are not supported"),
    ("fp8_weight", r"model.norm.weight \(F8_E4M3\) is FP8"),
])
def test_bad_tensors_are_named(tmp_path, hf, case, match):
    state = hf.state_dict()
    edits = {
        "missing": lambda t: t.pop("model.layers.1.self_attn.kv_b_proj.weight"),
        "missing_expert": lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"),
        "unexpected": lambda t: t.update({"model.layers.0.self_attn.rotary.weight":
                                          torch.zeros(2)}),
        "expert_out_of_range": lambda t: t.update({
            "model.layers.1.mlp.experts.8.up_proj.weight": torch.zeros(32, 64)}),
        "shape": lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(95, 64)}),
        "both_layouts": lambda t: t.update({"model.layers.1.mlp.experts.gate_up_proj":
                                            state["model.layers.1.mlp.experts.gate_up_proj"]}),
        "fp8_scale": lambda t: t.update({"model.layers.0.self_attn.o_proj.weight_scale_inv":
                                         torch.ones(1, 1)}),
        "fp8_weight": lambda t: t.update({"model.norm.weight":
                                          t["model.norm.weight"].to(torch.float8_e4m3fn)}),
    }
    folder = broken(tmp_path, hf, edits[case], shards=2)
    with pytest.raises(ValueError, match=match):
        DeepSeekForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("config, match", [
    ({"sliding_window": 4096}, r"unknown config field\(s\) \['sliding_window'\]"),
    ({"quantization_config": {"quant_method": "fp8", "fmt": "e4m3"}},
     r"quantization_config \{'quant_method': 'fp8', 'fmt': 'e4m3'\}: quantized \(FP8\) "
     r"checkpoints are not supported"),
])
def test_bad_configs_are_named(tmp_path, hf, config, match):
    with pytest.raises(ValueError, match=match):
        DeepSeekForCausalLM.from_pretrained(broken(tmp_path, hf, config=config))


def test_missing_files_are_named(tmp_path, hf):
    folder = broken(tmp_path, hf, shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="names model-00002-of-00002.safetensors"):
        DeepSeekForCausalLM.from_pretrained(folder)
    (folder / "model.safetensors.index.json").unlink()
    (folder / "model-00001-of-00002.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="holds no \\*.safetensors"):
        DeepSeekForCausalLM.from_pretrained(folder)
