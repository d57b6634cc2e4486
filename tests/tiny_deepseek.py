"""Tiny random transformers DeepseekV3ForCausalLM models and hand-written checkpoints: the
reference that ds_model's tests compare against (test_model, test_loading, test_generate)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8,
              num_experts_per_tok=2, n_group=2, topk_group=1, num_attention_heads=4,
              num_key_value_heads=4,  # transformers' default (128) breaks tiny eager models
              q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
              v_head_dim=16, max_position_embeddings=512, eos_token_id=None,
              # Wide weights: logits spread over units, so greedy picks are never near-ties.
              initializer_range=0.2)


def hf_model(seed: int = 0, **overrides):
    """A random DeepseekV3ForCausalLM (fp32, eval). Norm weights and router correction biases,
    which transformers initialises to 1 and 0, are randomised too, so a model that drops
    one of them fails the comparisons."""
    torch.manual_seed(seed)
    config = transformers.DeepseekV3Config(**{**CONFIG, **overrides})
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("norm.weight"):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith("e_score_correction_bias"):
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
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
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
