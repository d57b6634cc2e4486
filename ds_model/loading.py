"""from_pretrained: an HF-format folder (config.json + safetensors) into a DeepSeekForCausalLM,
tensor by tensor.

Files: model.safetensors.index.json's shards when the index exists, else every *.safetensors
in the folder. Routed experts come in either layout, per layer:
- per expert, as the published DeepSeek-V3 checkpoints and transformers 5's save_pretrained
  write them: ...mlp.experts.J.{gate_proj,up_proj,down_proj}.weight ([I, H], [I, H], [H, I]);
- fused 3-D, as transformers 5 holds them in memory: ...mlp.experts.gate_up_proj [E, 2I, H]
  (gate rows first) and ...mlp.experts.down_proj [E, H, I].
Each per-expert tensor is copied straight into its slice of the fused parameter.

Memory: the model is built on the meta device, materialised uninitialised on the target
device, and each checkpoint tensor is read (memory-mapped), copied into its parameter
(converting its dtype) and dropped: the peak is the model plus one tensor. Nothing is
unpickled. Every name and shape is checked before any data is read, and afterwards every
element of every parameter and buffer must have been written exactly once.

Refused, naming the offender: FP8 checkpoints (quantization_config, *.weight_scale_inv or
float8 tensors; not supported yet), checkpoint tensors the model has no place for, parameters
the checkpoint lacks, shape mismatches, and config fields ModelConfig does not know.
Skipped, with a log line: the multi-token-prediction layers (model.layers.{L + i}.* for the
num_nextn_predict_layers layers after the L = num_hidden_layers), which generation never uses.
"""

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open

from ds_model.config import ModelConfig

log = logging.getLogger("ds_model")

_EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)"
                     r"\.weight")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_FP8_DTYPES = ("F8_E4M3", "F8_E5M2")  # safetensors' names


def from_pretrained(cls, folder, *, dtype: torch.dtype | None = None, device="cpu"):
    """A ``cls`` (DeepSeekForCausalLM) with the weights of the HF-format checkpoint in folder,
    in ``dtype`` (default: config.json's dtype, else float32; routers stay fp32) on ``device``,
    in eval mode."""
    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())
    if raw.get("quantization_config"):
        raise ValueError(f"{folder}: quantization_config {raw['quantization_config']}: quantized "
                         "(FP8) checkpoints are not supported yet; dequantize to bf16 first")
    config = ModelConfig.from_hf_config(raw)
    if dtype is None:
        name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        dtype = getattr(torch, name)
    with torch.device("meta"):
        model = cls(config)
    model.to_dtype(dtype).to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty gave each module its own tensor
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.reset_parameters()

    state = model.state_dict()
    mtp = range(config.num_hidden_layers,
                config.num_hidden_layers + raw.get("num_nextn_predict_layers", 0))
    plan, skipped = {}, 0  # file -> [(checkpoint key, model key, expert, part)]
    for path, keys in _files(folder).items():
        with safe_open(path, framework="pt") as f:
            for key in keys or f.keys():
                layer = _LAYER.match(key)
                if layer and int(layer.group(1)) in mtp:
                    skipped += 1
                    continue
                target = _target(key, state, config)
                tensor = f.get_slice(key)
                if key.endswith("weight_scale_inv") or tensor.get_dtype() in _FP8_DTYPES:
                    raise ValueError(f"{path.name}: {key} ({tensor.get_dtype()}) is FP8 weight "
                                     "data: FP8 checkpoints are not supported yet")
                if target is None:
                    raise ValueError(f"{path.name}: unexpected tensor {key}: the model has no "
                                     "parameter for it")
                want = tuple(_slice(state, *target).shape)
                if tuple(tensor.get_shape()) != want:
                    raise ValueError(f"{path.name}: {key} has shape {tuple(tensor.get_shape())},"
                                     f" the model expects {want}")
                plan.setdefault(path, []).append((key, *target))
    if skipped:
        log.info("%s: skipped %d tensors of the multi-token-prediction layers %s", folder,
                 skipped, list(mtp))

    written = dict.fromkeys(state, 0)
    with torch.no_grad():
        for path, tensors in plan.items():
            with safe_open(path, framework="pt") as f:
                for key, name, expert, part in tensors:
                    dest = _slice(state, name, expert, part)
                    dest.copy_(f.get_tensor(key))
                    written[name] += dest.numel()
    if config.tie_word_embeddings and written["lm_head.weight"] == 0:
        written["lm_head.weight"] = written["model.embed_tokens.weight"]
    missing = [k for k, n in written.items() if n < state[k].numel()]
    if missing:
        raise ValueError(f"{folder}: the checkpoint lacks {len(missing)} tensor(s) the model "
                         f"needs: {missing[:8]}")
    twice = [k for k, n in written.items() if n > state[k].numel()]
    if twice:
        raise ValueError(f"{folder}: tensor(s) {twice[:8]} written more than once (both the "
                         "per-expert and the fused expert layout?)")
    return model.eval()


def _files(folder: Path) -> dict[Path, list[str] | None]:
    """Each safetensors file with the keys to read from it (None: all of them)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = {}
        for key, name in json.loads(index.read_text())["weight_map"].items():
            files.setdefault(folder / name, []).append(key)
        for path in files:
            if not path.exists():
                raise FileNotFoundError(f"{index} names {path.name}, which does not exist")
        return files
    paths = sorted(folder.glob("*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"{folder} holds no *.safetensors (pickled checkpoints such as "
                                "pytorch_model.bin are never loaded)")
    return dict.fromkeys(paths)


def _target(key, state, config):
    """(model key, expert, part) that checkpoint tensor ``key`` fills, or None if none."""
    if key in state:
        return key, None, None
    match = _EXPERT.fullmatch(key)
    if match is None:
        return None
    prefix, expert, part = match.group(1), int(match.group(2)), match.group(3)
    name = f"{prefix}.{'down_proj' if part == 'down_proj' else 'gate_up_proj'}"
    if name not in state or expert >= config.n_routed_experts:
        return None
    return name, expert, part


def _slice(state, name, expert, part):
    """The part of parameter ``name`` that one checkpoint tensor fills."""
    tensor = state[name]
    if expert is None:
        return tensor
    half = tensor.shape[1] // 2
    return {"gate_proj": tensor[expert, :half], "up_proj": tensor[expert, half:],
            "down_proj": tensor[expert]}[part]
