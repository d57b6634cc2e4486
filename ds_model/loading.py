"""from_pretrained: an HF-format folder (config.json + safetensors) into a DeepSeekForCausalLM,
tensor by tensor.

Files: model.safetensors.index.json's shards when the index exists, else every *.safetensors
in the folder. Routed experts come in either layout, per layer:
- per expert, as the published DeepSeek-V3 checkpoints and transformers 5's save_pretrained
  write them: ...mlp.experts.J.{gate_proj,up_proj,down_proj}.weight ([I, H], [I, H], [H, I]);
- fused 3-D, as transformers 5 holds them in memory: ...mlp.experts.gate_up_proj [E, 2I, H]
  (gate rows first) and ...mlp.experts.down_proj [E, H, I].
Each per-expert tensor is copied straight into its slice of the fused parameter.

Quantised checkpoints (config.json's quantization_config; ds_model/quantized.py says which
tensors and how they are held): a weight X (X.weight, or a fused expert weight) is quantised
when the checkpoint also holds X_scale_inv (X.weight_scale_inv, experts.gate_up_proj_scale_inv):
codes float8_e4m3fn with fp32 or e8m0 scales per 128x128 block, or - routed experts declared
``expert_dtype: "fp4"`` - MXFP4 codes (float4_e2m1fn_x2, or int8 bytes as V4 and transformers
store them) with e8m0 scales per 32 columns. They stay quantised in memory; ``dequantize=True``
folds every one into the model dtype at load, and kv_b_proj is always folded. The tensors decide
which modules are quantised (a module left out of quantisation loads as a plain one), but the
experts of one layer must all come in one format. Per-expert FP8 experts stay quantised only
when moe_intermediate_size is a multiple of 128 (every DeepSeek checkpoint's): otherwise the
gate and up blocks do not tile the fused [2I, H] weight's 128-row grid (dequantize=True loads
them).

Memory: the model is built on the meta device, materialised uninitialised on the target
device, and each checkpoint tensor is read (memory-mapped), copied into its parameter
(converting its dtype; a folded weight is dequantised first) and dropped: the peak is the model
plus one tensor. Nothing is unpickled. Every name, dtype and shape is checked before any data
is read, and afterwards every element of every parameter and buffer must have been written
exactly once.

Refused, naming the offender, before anything is allocated: config.json's and the index's
JSON errors (with the position), config fields ModelConfig does not know, lacks or finds
invalid (ModelConfig.validate, quantization_config's keys included), a model whose weights
exceed the device's memory, index entries that are not plain file names beside the index
(``../x``, absolute paths), and files that are not regular files (a FIFO would block the read
forever). Symbolic links are followed: huggingface_hub's cache links every file of a snapshot
to ../../blobs/. Then, before any tensor data is read: checkpoint tensors the model has no place
for, parameters the checkpoint lacks, shape mismatches, weights of a non-floating dtype; and for
quantised weights: FP8 data without quantization_config, a weight without its scale or a scale
without its weight, a quantised tensor that DeepSeek keeps dense (embeddings, lm_head, norms,
router), codes or scales of a dtype the declared format does not have, a scale grid that does
not fit its weight, and experts of one layer in different formats.
Skipped, with a log line: the multi-token-prediction layers (model.layers.{L + i}.* for the
num_nextn_predict_layers layers after the L = num_hidden_layers), which generation never uses.
"""

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import stat
from pathlib import Path

import torch
from safetensors import safe_open

import ds_kernels
from ds_kernels.quant_formats import (E8M0_DTYPE, FP4_DTYPE, FP8, MXFP4, MXFP4_GROUP,
                                      SCALE_BLOCK)
from ds_kernels.expert_parallel import ShardedExperts
from ds_model.config import ModelConfig
from ds_model.quantized import (SCALE_SUFFIX, Format, quantizable, quantize_modules,
                                scale_grid)

log = logging.getLogger("ds_model")

_EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)"
                     r"\.weight")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_OTHER_RANK = ("another rank's expert",)  # _target's mark: not read on this rank
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors' names of plain weights
# Quantised codes by safetensors dtype: I8 holds MXFP4 bytes as DeepSeek-V4 and transformers
# store them; F8_E5M2 is FP8 of a fmt no DeepSeek checkpoint has.
_CODE_FORMATS = {"F8_E4M3": FP8, "F4": MXFP4, "I8": MXFP4}
_SCALE_DTYPES = {FP8: {"F32": torch.float32, "F8_E8M0": E8M0_DTYPE},
                 MXFP4: {"F8_E8M0": E8M0_DTYPE}}


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """A checkpoint tensor, as its file's header describes it."""

    path: Path
    key: str
    dtype: str                  # safetensors' name
    shape: tuple[int, ...]      # as stored (F4: safetensors counts 4-bit values)

    def where(self) -> str:
        return f"{self.path.name}: {self.key}"


@dataclasses.dataclass(frozen=True)
class _Weight:
    """A checkpoint weight (with its scale if quantised) and the part of the model it fills."""

    tensor: _Tensor
    scale: _Tensor | None
    name: str                   # model key: a parameter, or a fused expert weight
    expert: int | None          # per-expert tensors: the expert
    part: str | None            # and gate_proj / up_proj / down_proj
    module: str | None          # the quantisable module it belongs to (None: not quantisable)
    rows: list[int] | None = None  # a fused expert weight under EP: this rank's experts

    @property
    def fmt(self) -> str | None:
        return None if self.scale is None else _CODE_FORMATS[self.tensor.dtype]


def from_pretrained(cls, folder, *, dtype: torch.dtype | None = None, device="cpu",
                    dequantize: bool = False, ep_group=None, ep_wire="native",
                    mtp: bool = False):
    """A ``cls`` (DeepSeekForCausalLM) with the weights of the HF-format checkpoint in folder,
    in ``dtype`` (default: config.json's dtype, else float32; routers stay fp32) on ``device``,
    in eval mode. A quantised checkpoint's weights stay quantised, unless ``dequantize`` (then
    they are folded into ``dtype``). With ``ep_group`` (expert parallelism), this rank's routed
    experts only (quantised or not): the other ranks' expert tensors are never read (fused
    [E, ...] expert weights: only this rank's rows); ``ep_wire``: see DeepSeekForCausalLM.
    ``mtp``: also load the multi-token-prediction layer(s) (config.json's
    num_nextn_predict_layers; speculative decoding), which are otherwise skipped; their
    embed_tokens and shared_head.head come from the main model's where the checkpoint has
    none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    config, checkpoint_dtype, num_mtp = _read_config(folder / "config.json")
    if mtp and not num_mtp:
        raise ValueError(f"{folder}: mtp=True, but the checkpoint has no multi-token-prediction "
                         "layer (config.json's num_nextn_predict_layers is 0 or absent)")
    files = _files(folder)
    dtype = checkpoint_dtype if dtype is None else dtype
    device = torch.device(device)
    ranks = 1 if ep_group is None else torch.distributed.get_world_size(ep_group)
    check_fits(config, dtype, device, str(folder), quantized=not dequantize, expert_ranks=ranks)
    with torch.device("meta"):
        model = cls(config, ep_group=ep_group, ep_wire=ep_wire, mtp_layers=num_mtp if mtp else 0)
    local = {name: m.local_ids for name, m in model.named_modules()
             if isinstance(m, ShardedExperts)}
    weights = _scan(folder, files, model, config, 0 if mtp else num_mtp, local)
    formats = {} if dequantize else _formats(weights, config)
    with torch.device("meta"):
        quantize_modules(model, formats)
    model = empty(model, dtype, device)

    state = model.state_dict()
    written = _copy(weights, state, formats)
    if config.tie_word_embeddings and written["lm_head.weight"] == 0:
        written["lm_head.weight"] = written["model.embed_tokens.weight"]
    for j in range(num_mtp if mtp else 0):  # the MTP layers' copies of the shared tensors
        layer = f"model.layers.{config.num_hidden_layers + j}"
        for own, main in ((f"{layer}.embed_tokens.weight", "model.embed_tokens.weight"),
                          (f"{layer}.shared_head.head.weight", "lm_head.weight")):
            if written[own] == 0 and written[main]:
                with torch.no_grad():
                    state[own].copy_(state[main])
                written[own] = written[main]
    missing = [k for k, n in written.items() if n < state[k].numel()]
    if missing:
        raise ValueError(f"{folder}: the checkpoint lacks {len(missing)} tensor(s) the model "
                         f"needs: {missing[:8]}")
    twice = [k for k, n in written.items() if n > state[k].numel()]
    if twice:
        raise ValueError(f"{folder}: tensor(s) {twice[:8]} written more than once (both the "
                         "per-expert and the fused expert layout?)")
    return model.eval()


@torch.no_grad()
def _copy(weights: list[_Weight], state, formats) -> dict[str, int]:
    """Read every weight into its place in ``state``: quantised ones as they are where their
    module is held quantised, dequantised into the parameter's dtype where it is not. Returns
    the number of elements written to each state key."""
    written = dict.fromkeys(state, 0)
    with contextlib.ExitStack() as stack:
        handles = {}

        def read(t: _Tensor, rows=None) -> torch.Tensor:
            """The tensor, or only its ``rows`` (a fused expert weight under EP)."""
            if t.path not in handles:
                handles[t.path] = stack.enter_context(safe_open(t.path, framework="pt"))
            if rows is None:
                tensor = handles[t.path].get_tensor(t.key)
            elif rows == list(range(rows[0], rows[-1] + 1)) and t.dtype == "F4":
                tensor = _f4_rows(t, rows[0], rows[-1] + 1)
            elif rows == list(range(rows[0], rows[-1] + 1)):  # contiguous: read just those
                tensor = handles[t.path].get_slice(t.key)[rows[0]:rows[-1] + 1]
            else:
                tensor = handles[t.path].get_tensor(t.key)[rows]
            return tensor.view(FP4_DTYPE) if t.dtype == "I8" else tensor  # MXFP4 bytes

        for w in weights:
            dest = _slice(state, w.name, w.expert, w.part)
            if w.module in formats:
                dest.copy_(read(w.tensor, w.rows))
                scales = _slice(state, w.name + SCALE_SUFFIX, w.expert, w.part)
                scales.copy_(read(w.scale, w.rows))
                written[w.name + SCALE_SUFFIX] += scales.numel()
            elif w.scale is not None:
                dest.copy_(ds_kernels.dequantize(read(w.tensor, w.rows), read(w.scale, w.rows),
                                                 dest.dtype))
            else:
                dest.copy_(read(w.tensor, w.rows))
            written[w.name] += dest.numel()
    return written


def _f4_rows(t: _Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop of an F4 (MXFP4 codes) tensor, from the file's bytes: safetensors 0.8's
    get_slice sizes an F4 slice as if each 4-bit value took a byte, and fails."""
    with open(t.path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        begin = 8 + header + json.loads(f.read(header))[t.key]["data_offsets"][0]
        row = math.prod(t.shape[1:]) // 2                         # bytes a row
        f.seek(begin + start * row)
        data = bytearray(f.read((stop - start) * row))
    codes = torch.frombuffer(data, dtype=torch.uint8).view(FP4_DTYPE)
    return codes.view(stop - start, *t.shape[1:-1], t.shape[-1] // 2)


def empty(model, dtype: torch.dtype, device: torch.device):
    """A model built on the meta device, in dtype on device, uninitialised (but for the RoPE
    tables, which no checkpoint holds)."""
    model.to_dtype(dtype).to_empty(device=device)
    if model.config.tie_word_embeddings:  # to_empty gave each module its own tensor
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.reset_parameters()
    return model


def _scan(folder, files, model, config, num_mtp, local) -> list[_Weight]:
    """Every checkpoint weight paired with its scale and its place in the (plain, meta) model,
    checked from the file headers alone (see the module docstring). local: expert-parallel
    experts modules -> this rank's expert ids; other ranks' per-expert tensors are skipped."""
    state, kinds = model.state_dict(), quantizable(model)
    mtp = range(config.num_hidden_layers, config.num_hidden_layers + num_mtp)
    tensors, skipped = {}, 0
    for path, keys in files.items():
        with safe_open(path, framework="pt") as f:
            for key in keys or f.keys():
                layer = _LAYER.match(key)
                if layer and int(layer.group(1)) in mtp:
                    skipped += 1
                elif _target(key.removesuffix(SCALE_SUFFIX), state, config,
                             local) is _OTHER_RANK:
                    continue
                elif _target(key, state, config, local) is None and _unused_zero_bias(key, f,
                                                                                       config):
                    continue
                else:
                    header = f.get_slice(key)
                    tensors[key] = _Tensor(path, key, header.get_dtype(),
                                           tuple(header.get_shape()))
    if skipped:
        log.info("%s: skipped %d tensors of the multi-token-prediction layers %s", folder,
                 skipped, list(mtp))
    scales = {t.key.removesuffix(SCALE_SUFFIX): t for t in tensors.values()
              if t.key.endswith(SCALE_SUFFIX)}
    for key, scale in scales.items():
        if key not in tensors:
            raise ValueError(f"{scale.where()} is a scale, but the checkpoint has no weight {key}")
    return [_weight(t, scales.get(t.key), state, kinds, config, local)
            for t in tensors.values() if not t.key.endswith(SCALE_SUFFIX)]


def _weight(t: _Tensor, scale: _Tensor | None, state, kinds, config, local) -> _Weight:
    target = _target(t.key, state, config, local)
    if target is None:
        raise ValueError(f"{t.path.name}: unexpected tensor {t.key}: the model has no "
                         "parameter for it")
    name, expert, part = target
    owner, _, attr = name.rpartition(".")  # X.weight, ...experts.gate_up_proj / down_proj
    quantizable = attr in ("weight", "gate_up_proj", "down_proj") and owner in kinds
    rows = local.get(owner) if expert is None and attr in ("gate_up_proj", "down_proj") else None
    if rows is not None and t.shape[0] != config.n_routed_experts:
        raise ValueError(f"{t.where()} has shape {t.shape}, the model expects "
                         f"[{config.n_routed_experts}, ...] (all experts; this rank keeps "
                         f"{len(rows)} of them)")
    weight = _Weight(t, scale, name, expert, part, owner if quantizable else None, rows)
    if scale is not None:
        _check_quantized(weight, kinds, config)
    elif t.dtype in (*_CODE_FORMATS, "F8_E5M2"):
        raise ValueError(f"{t.where()} is {t.dtype}, quantised data, but the checkpoint has no "
                         f"scales {t.key}{SCALE_SUFFIX} for it")
    elif t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{t.where()} is {t.dtype}, not a floating-point weight")
    want = tuple(_slice(state, *target).shape)
    if rows is not None:
        want = (config.n_routed_experts, *want[1:])
    if _logical_shape(t) != want:
        raise ValueError(f"{t.where()} has shape {_logical_shape(t)}, the model expects {want}")
    return weight


def _check_quantized(w: _Weight, kinds, config):
    """A quantised weight's declaration, dtypes and scale grid (see the module docstring)."""
    t, scale = w.tensor, w.scale
    quantization = config.quantization
    if quantization is None:
        raise ValueError(f"{t.where()} ({t.dtype}) is quantised (it has {scale.key}), but "
                         "config.json has no quantization_config")
    if w.module is None:
        raise ValueError(f"{t.where()} is quantised, but ds_model holds {w.name} unquantised, "
                         "as DeepSeek's checkpoints do (embeddings, lm_head, norms, the router)")
    experts = kinds[w.module] == "experts"
    declared = quantization.experts if experts else FP8
    fmt = _CODE_FORMATS.get(t.dtype)
    if fmt != declared:
        dtypes = [d for d, f in _CODE_FORMATS.items() if f == declared]
        what = "routed experts' weights" if experts else "weights"
        raise ValueError(f"{t.where()} is {t.dtype}, but quantization_config declares {declared} "
                         f"{what} ({' or '.join(dtypes)})")
    if scale.dtype not in _SCALE_DTYPES[fmt]:
        raise ValueError(f"{scale.where()} is {scale.dtype}: the scales of {fmt} weights are "
                         f"{' or '.join(_SCALE_DTYPES[fmt])}")
    shape = _logical_shape(t)
    if fmt == MXFP4 and shape[-1] % MXFP4_GROUP:
        raise ValueError(f"{t.where()}: MXFP4 weights need K = {shape[-1]} to be a multiple of "
                         f"{MXFP4_GROUP}")
    grid = scale_grid(fmt, shape)
    if scale.shape != grid:
        rows, cols = SCALE_BLOCK[fmt]
        raise ValueError(f"{scale.where()} has shape {scale.shape}, but {t.key} of shape "
                         f"{shape} needs {grid} ({fmt}: one scale per {rows}x{cols} block)")


def _logical_shape(t: _Tensor) -> tuple[int, ...]:
    """The dense shape of a checkpoint weight: I8 MXFP4 bytes hold two columns each
    (safetensors' F4 shape already counts 4-bit values)."""
    if t.dtype == "I8":
        return (*t.shape[:-1], 2 * t.shape[-1])
    return t.shape


def _formats(weights: list[_Weight], config) -> dict[str, Format]:
    """Module -> how it is held, for every module whose checkpoint weights are quantised (and
    not kv_b_proj, which is folded); refuses a layer's experts in mixed formats."""
    formats, dense = {}, {}
    for w in weights:
        if w.module is None or w.module.endswith(".kv_b_proj"):
            continue
        if w.scale is None:
            dense.setdefault(w.module, w.tensor)
            continue
        fmt = Format(w.fmt, _SCALE_DTYPES[w.fmt][w.scale.dtype])
        if formats.setdefault(w.module, fmt) != fmt:
            raise ValueError(f"{w.tensor.where()}: {w.module} mixes formats: {fmt} here, "
                             f"{formats[w.module]} in its other tensors")
        if w.part in ("gate_proj", "up_proj") and fmt.fmt == FP8 and \
                config.moe_intermediate_size % 128:
            raise ValueError(f"{w.tensor.where()}: moe_intermediate_size="
                             f"{config.moe_intermediate_size} is not a multiple of 128, so the "
                             "per-expert gate and up scale blocks do not tile the fused "
                             "gate_up_proj's 128-row grid; load with dequantize=True")
    for module, t in dense.items():
        if module in formats:
            raise ValueError(f"{t.where()} is {t.dtype}, but other weights of {module} are "
                             f"quantised ({formats[module]})")
    return formats


def check_fits(config: ModelConfig, dtype: torch.dtype, device: torch.device, what: str, *,
               quantized: bool = True, expert_ranks: int = 1):
    """Refuse, before allocating anything, a model whose weights alone (ModelConfig.weight_bytes:
    quantised where config.quantization_config says, unless not ``quantized``; the routed
    experts shared by ``expert_ranks``) exceed the memory of ``device`` (what: the model's
    source, for the message)."""
    total, _ = config.num_parameters()
    needed, _ = config.weight_bytes(dtype, quantized=quantized, expert_ranks=expert_ranks)
    available = _device_memory(device)
    if available is not None and needed > available:
        quantization = config.quantization if quantized else None
        held = str(dtype) if quantization is None else (
            f"FP8{' with MXFP4 experts' if quantization.experts == MXFP4 else ''} (the rest in "
            f"{dtype})")
        raise ValueError(f"{what}: {total / 1e9:.1f}B parameters in {held} need "
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


def _target(key, state, config, local):
    """(model key, expert, part) that checkpoint tensor ``key`` fills, None if none, or
    _OTHER_RANK for another rank's expert (local: see _scan; expert is then this rank's row)."""
    if key in state:
        return key, None, None
    match = _EXPERT.fullmatch(key)
    if match is None:
        return None
    prefix, expert, part = match.group(1), int(match.group(2)), match.group(3)
    name = f"{prefix}.{'down_proj' if part == 'down_proj' else 'gate_up_proj'}"
    if name not in state or expert >= config.n_routed_experts:
        return None
    if prefix in local:
        if expert not in local[prefix]:
            return _OTHER_RANK
        expert = local[prefix].index(expert)
    return name, expert, part


def _slice(state, name, expert, part):
    """The part of parameter ``name`` that one checkpoint tensor fills."""
    tensor = state[name]
    if expert is None:
        return tensor
    half = tensor.shape[1] // 2
    return {"gate_proj": tensor[expert, :half], "up_proj": tensor[expert, half:],
            "down_proj": tensor[expert]}[part]
