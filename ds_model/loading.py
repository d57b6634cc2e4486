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

Refused, naming the offender, before anything is allocated: config.json's and the index's
JSON errors (with the position), config fields ModelConfig does not know, lacks or finds
invalid (ModelConfig.validate), a model whose parameters exceed the device's memory, index
entries that are not plain file names beside the index (``../x``, absolute paths), and files
that are not regular files (a FIFO would block the read forever). Symbolic links are followed:
huggingface_hub's cache links every file of a snapshot to ../../blobs/. Then, before any
tensor data is read: FP8 checkpoints (quantization_config, *.weight_scale_inv or float8
tensors; not supported yet), checkpoint tensors the model has no place for, parameters the
checkpoint lacks, and shape mismatches.
Skipped, with a log line: the multi-token-prediction layers (model.layers.{L + i}.* for the
num_nextn_predict_layers layers after the L = num_hidden_layers), which generation never uses.
"""

import json
import logging
import os
import re
import stat
from pathlib import Path

import torch
from safetensors import safe_open

from ds_model.config import ModelConfig

log = logging.getLogger("ds_model")

_EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)"
                     r"\.weight")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_FP8_DTYPES = ("F8_E4M3", "F8_E5M2")  # safetensors' names
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def from_pretrained(cls, folder, *, dtype: torch.dtype | None = None, device="cpu"):
    """A ``cls`` (DeepSeekForCausalLM) with the weights of the HF-format checkpoint in folder,
    in ``dtype`` (default: config.json's dtype, else float32; routers stay fp32) on ``device``,
    in eval mode."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    config, checkpoint_dtype, num_mtp = _read_config(folder / "config.json")
    files = _files(folder)
    dtype = checkpoint_dtype if dtype is None else dtype
    device = torch.device(device)
    check_fits(config, dtype, device, str(folder))
    with torch.device("meta"):
        model = cls(config)
    model.to_dtype(dtype).to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty gave each module its own tensor
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.reset_parameters()

    state = model.state_dict()
    mtp = range(config.num_hidden_layers, config.num_hidden_layers + num_mtp)
    plan, skipped = {}, 0  # file -> [(checkpoint key, model key, expert, part)]
    for path, keys in files.items():
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
                if target is None and _unused_zero_bias(key, f, config):
                    continue
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


def check_fits(config: ModelConfig, dtype: torch.dtype, device: torch.device, what: str):
    """Refuse, before allocating anything, a model whose parameters alone exceed the memory of
    ``device`` (what: the model's source, for the message)."""
    total, _ = config.num_parameters()
    needed, available = total * dtype.itemsize, _device_memory(device)
    if available is not None and needed > available:
        raise ValueError(f"{what}: {total / 1e9:.1f}B parameters in {dtype} need "
                         f"{needed / 2**30:.1f} GiB, {device} has {available / 2**30:.1f} GiB")


def _device_memory(device: torch.device) -> int | None:
    """Free memory of a CUDA device, all physical memory of the CPU; None where unknown."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device}: CUDA is not available")
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def _read_config(path: Path) -> tuple[ModelConfig, torch.dtype, int]:
    """config.json's ModelConfig, the checkpoint's dtype and its number of
    multi-token-prediction layers; every error names the file."""
    raw = _read_json(path)
    try:
        config = ModelConfig.from_hf_config(raw)
        if config.quantization_config:
            raise ValueError(f"quantization_config {config.quantization_config}: quantized "
                             "(FP8) checkpoints are not supported yet; dequantize to bf16 first")
        name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        if name not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {name!r}")
        num_mtp = raw.get("num_nextn_predict_layers", 0)
        if isinstance(num_mtp, bool) or not isinstance(num_mtp, int) or num_mtp < 0:
            raise ValueError(f"num_nextn_predict_layers must be an int >= 0, got {num_mtp!r}")
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return config, _DTYPES[name], num_mtp


def _files(folder: Path) -> dict[Path, list[str] | None]:
    """Each safetensors file with the keys to read from it (None: all of them)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        raw = _read_json(index)
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: expected {{\"weight_map\": {{tensor: file name}}}}")
        files = {}
        for key, name in weight_map.items():
            files.setdefault(_shard(index, name), []).append(key)
        return files
    paths = sorted(folder.glob("*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"{folder} holds no *.safetensors (pickled checkpoints such as "
                                "pytorch_model.bin are never loaded)")
    for path in paths:
        _check_regular(path)
    return dict.fromkeys(paths)


def _shard(index: Path, name) -> Path:
    """The file that an index entry names: only a plain file name beside the index, never a
    path that could lead out of the folder."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
        raise ValueError(f"{index} names {name!r}: shards must be plain file names in "
                         f"{index.parent}")
    path = index.parent / name
    if not path.exists():
        raise FileNotFoundError(f"{index} names {name}, which does not exist")
    _check_regular(path)
    return path


def _read_json(path: Path):
    _check_regular(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: invalid JSON: {error}") from None


def _check_regular(path: Path):
    """Refuse anything but a regular file (or a link to one): reading a FIFO blocks until a
    writer comes, a device may never end."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode)
                else "a special file")
        raise ValueError(f"{path} is {kind}, not a regular file")


def _unused_zero_bias(key, f, config) -> bool:
    """Whether ``key`` is a router correction bias that a method without one (DeepSeek-V2's)
    can skip: transformers' DeepseekV3 classes write zeros there whatever topk_method says. A
    non-zero one would change the routing: it is refused as unexpected."""
    return (config.topk_method != "noaux_tc" and key.endswith(".gate.e_score_correction_bias")
            and not f.get_tensor(key).any())


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
