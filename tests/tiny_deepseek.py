"""Tiny random transformers DeepseekV3ForCausalLM models and hand-written checkpoints: the
reference that ds_model's tests compare against (test_model, test_loading, test_generate,
test_quantized_model, test_hf_patch's FP8 tests)."""

import copy
import json

import pytest
import torch

import ds_kernels

transformers = pytest.importorskip("transformers")

CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8,
              num_experts_per_tok=2, n_group=2, topk_group=1, num_attention_heads=4,
              num_key_value_heads=4,  # transformers' default (128) breaks tiny eager models
              q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
              v_head_dim=16, max_position_embeddings=512, eos_token_id=None,
              # Wide weights: logits spread over units, so greedy picks are never near-ties.
              initializer_range=0.2)


# DeepSeek-V3.2's indexer, tiny: 8 of the cached tokens per query, so prompts of more than 8
# tokens prune. 8 heads: a key scores exactly 0 (every head's relu at 0, a tie) rarely.
V32_CONFIG = dict(index_topk=8, index_head_dim=16, index_n_heads=8)


def hf_model(seed: int = 0, *, v32: bool = False, **overrides):
    """A random DeepseekV3ForCausalLM (fp32, eval), or with ``v32`` a DeepseekV32ForCausalLM
    (V32_CONFIG). Norm weights, LayerNorm biases and router correction biases, which
    transformers initialises to 1 and 0, are randomised too, so a model that drops one of
    them fails the comparisons."""
    torch.manual_seed(seed)
    if v32:
        config = transformers.DeepseekV32Config(**{**CONFIG, **V32_CONFIG, **overrides})
        model = transformers.DeepseekV32ForCausalLM(config).eval()
    else:
        config = transformers.DeepseekV3Config(**{**CONFIG, **overrides})
        model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("norm.weight"):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith(("norm.bias", "e_score_correction_bias")):
                tensor.normal_(0.0, 0.1)
    return model


def write_checkpoint(folder, config: dict, tensors: dict, shards: int = 1):
    """config.json plus the tensors in ``shards`` safetensors files (with an index if > 1)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    keys = sorted(tensors)
    if shards == 1:
        save_file({k: _own(tensors[k]) for k in keys}, folder / "model.safetensors")
        return folder
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: _own(tensors[k]) for k in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    total_size = sum(tensors[k].nbytes for k in keys)  # transformers reads the index's metadata
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total_size}, "weight_map": weight_map}))
    return folder


def _own(tensor):
    # safetensors refuses tensors that share memory (a per-expert slice and its fused weight)
    return tensor.clone(memory_format=torch.contiguous_format)


def per_expert(state: dict) -> dict:
    """The state dict with each fused expert weight split into the published DeepSeek-V3
    checkpoints' per-expert keys."""
    out = {}
    for key, tensor in state.items():
        prefix, _, name = key.rpartition(".")
        if not prefix.endswith("mlp.experts"):
            out[key] = tensor
        elif name == "gate_up_proj":
            for j, (gate, up) in enumerate(t.chunk(2) for t in tensor):
                out[f"{prefix}.{j}.gate_proj.weight"] = gate
                out[f"{prefix}.{j}.up_proj.weight"] = up
        else:
            for j, down in enumerate(tensor):
                out[f"{prefix}.{j}.down_proj.weight"] = down
    return out


def fused(tensors: dict) -> dict:
    """per_expert undone: the per-expert keys stacked into the fused 3-D weights."""
    out, parts = {}, {}
    for key, tensor in tensors.items():
        prefix, _, rest = key.partition(".mlp.experts.")
        if not rest or not rest[0].isdigit():
            out[key] = tensor
            continue
        expert, part, _ = rest.split(".")
        parts.setdefault(f"{prefix}.mlp.experts", {}).setdefault(part, {})[int(expert)] = tensor
    for prefix, by_part in parts.items():
        E = len(by_part["down_proj"])
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([by_part["gate_proj"][e], by_part["up_proj"][e]]) for e in range(E)])
        out[f"{prefix}.down_proj"] = torch.stack([by_part["down_proj"][e] for e in range(E)])
    return out


# ---- Quantised checkpoints (DeepSeek's published FP8 layout), written by hand ----

# Experts 128 wide: the per-expert gate and up 128-row scale blocks tile the fused gate_up_proj.
QUANTIZED_CONFIG = dict(moe_intermediate_size=128)
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
              "weight_block_size": [128, 128]}


def quantized_by_deepseek(key: str, tensor) -> bool:
    """Whether DeepSeek's FP8 files quantise this tensor: every Linear weight of the decoder
    layers, not their norms or the router gate (nor embeddings or lm_head)."""
    return (key.startswith("model.layers.") and key.endswith(".weight") and tensor.dim() == 2
            and "norm" not in key and not key.endswith("mlp.gate.weight"))


def quantize_tensors(tensors: dict, *, experts="fp8", scale_fmt="float",
                     scale_dtype=torch.float32):
    """(the tensors in DeepSeek's FP8 layout: X.weight codes + X.weight_scale_inv, routed
    experts MXFP4 if experts == "mxfp4"; the same weights dequantised to fp32, in the input's
    keys). The codes come from ds_kernels' quantizers, the published recipe."""
    out, dequantized = {}, {}
    for key, tensor in tensors.items():
        if not quantized_by_deepseek(key, tensor) and not key.endswith(("gate_up_proj",
                                                                         "experts.down_proj")):
            out[key] = dequantized[key] = tensor
            continue
        if experts == "mxfp4" and ".mlp.experts." in key:
            codes, scale = ds_kernels.quantize_mxfp4(tensor)
        else:
            codes, scale = ds_kernels.quantize_fp8_block(tensor, scale_fmt=scale_fmt)
            scale = scale.to(scale_dtype)
        out[key], out[key + "_scale_inv"] = codes, scale
        dequantized[key] = ds_kernels.dequantize(codes, scale)
    return out, dequantized


def dequantized_model(hf, dequantized: dict):
    """A copy of the transformers model hf holding the dequantised weights (fused keys or
    per-expert ones)."""
    model = copy.deepcopy(hf)
    model.load_state_dict(fused(dequantized))
    return model


def fused_moe_on_dequantized(hidden, w13, w2, topk_weights, topk_ids, *, w13_scale=None,
                             w2_scale=None):
    """API.md's meaning of fused_moe on quantised weights: fused_moe on the dequantised ones."""
    return ds_kernels.fused_moe(hidden, ds_kernels.dequantize(w13, w13_scale, hidden.dtype),
                                ds_kernels.dequantize(w2, w2_scale, hidden.dtype),
                                topk_weights, topk_ids)
