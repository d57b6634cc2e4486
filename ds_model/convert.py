"""quantize_checkpoint: a bf16/fp32 HF-format checkpoint written in DeepSeek's published FP8
format (``python -m ds_model quantize SRC DST``).

What DST holds:
- the projection weights of every decoder layer (q/q_a/q_b, kv_a, kv_b, o_proj, the dense MLPs,
  the shared and the routed experts; the multi-token-prediction layers' too, as DeepSeek's
  files have them) as float8_e4m3fn with ``weight_scale_inv`` fp32 [ceil(N/128), ceil(K/128)]
  (DeepSeek's recipe: ds_kernels.quantize_fp8_block; ``scale_fmt="ue8m0"`` rounds each scale
  up to a power of two and still stores it as fp32: e8m0 would save 3 bytes a block). With ``experts="mxfp4"`` the
  routed experts are MXFP4 instead (two e2m1 codes a byte, the even column in the low nibble,
  stored as int8 [N, K/2] as V4 and transformers store them, + float8_e8m0fnu scales per 32
  columns, under the same ``weight_scale_inv`` names), declared ``expert_dtype: "fp4"`` as
  DeepSeek-V4 does;
- every other tensor (embeddings, lm_head, norms, routers, biases, eh_proj) as it is in SRC;
- routed experts in the published per-expert layout (``...experts.J.gate_proj.weight``), fused
  3-D source tensors split expert by expert;
- the same shard files as SRC (names and the tensors each holds) and, where SRC has one, a
  model.safetensors.index.json with ``metadata.total_size``; config.json with
  ``quantization_config``; every other file of SRC but weights, copied (tokenizer, generation
  config).

Streaming: each output file's header is computed from SRC's headers, then its tensors are
produced and written one after the other; the memory held is one source tensor (one expert's
slice of a fused tensor) and its quantised copy. Tensors are written in SRC's order, not
padded to their dtype's alignment (safetensors 0.8 and transformers 5.24 read them; the tests
load what quantize writes with both).
"""

import json
import math
import re
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from ds_kernels import quantize_fp8_block, quantize_mxfp4
from ds_kernels.quant_formats import FP8, MXFP4, MXFP4_GROUP, SCALE_FMTS
from ds_model.loading import _files, _read_config, _read_json
from ds_model.quantized import SCALE_SUFFIX, Quantization, code_shape, scale_grid

# The weights DeepSeek's FP8 files quantise (ds_model/quantized.py), per-expert experts included.
_QUANTIZED = re.compile(r"model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|"
                        r"kv_a_proj_with_mqa|kv_b_proj|o_proj)|mlp\.(shared_experts\.)?"
                        r"(gate_proj|up_proj|down_proj)|mlp\.experts\.\d+\.(gate_proj|up_proj|"
                        r"down_proj))\.weight")
_FUSED_EXPERTS = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)")
_ROUTED = re.compile(r"model\.layers\.\d+\.mlp\.experts\.")
_SOURCE_DTYPES = ("F32", "BF16", "F16")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Bytes per element of the safetensors dtypes quantize writes or copies.
_ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
             "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_INDEX = "model.safetensors.index.json"


def quantize_checkpoint(src, dst, *, scale_fmt: str = "float", experts: str = FP8) -> list[Path]:
    """Write SRC (an HF-format DeepSeek checkpoint folder, bf16/fp16/fp32) quantised into the
    new folder DST (see the module docstring); returns the safetensors files written. Every
    refusal (a quantised or broken SRC, a DST that exists and is not empty, a weight MXFP4
    cannot hold) names its cause before anything is written."""
    src, dst = Path(src), Path(dst)
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FMTS}, got {scale_fmt!r}")
    if experts not in (FP8, MXFP4):
        raise ValueError(f"experts must be {FP8!r} or {MXFP4!r}, got {experts!r}")
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such checkpoint folder")
    config, _, _ = _read_config(src / "config.json")
    if config.quantization_config is not None:
        raise ValueError(f"{src / 'config.json'}: already quantised (quantization_config "
                         f"{config.quantization_config})")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"{dst} exists and is not an empty folder")
    quantization = Quantization(scale_fmt, experts)
    plans = {path: _plan(path, keys, quantization) for path, keys in _files(src).items()}

    dst.mkdir(parents=True, exist_ok=True)
    weight_map, total_size = {}, 0
    for path, groups in plans.items():
        total_size += _write(dst / path.name, path, groups)
        weight_map.update({name: path.name for group in groups for name, _, _ in group[0]})
    if (src / _INDEX).exists():
        (dst / _INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2))
    raw = _read_json(src / "config.json")
    raw["quantization_config"] = quantization.to_config()
    (dst / "config.json").write_text(json.dumps(raw, indent=2))
    for other in sorted(src.iterdir()):
        if (other.name not in ("config.json", _INDEX) and other.is_file()
                and not other.name.endswith(_WEIGHT_SUFFIXES)):
            shutil.copyfile(other, dst / other.name)
    return [dst / path.name for path in plans]


def _plan(path: Path, keys, quantization):
    """The tensors one output file holds, as groups (outputs, produce): outputs is a list of
    (name, safetensors dtype, shape); produce(f) returns their tensors, f being the source open.
    From the source header alone."""
    groups = []
    with safe_open(path, framework="pt") as f:
        for key in keys or f.keys():
            header = f.get_slice(key)
            dtype, shape = header.get_dtype(), tuple(header.get_shape())
            fused = _FUSED_EXPERTS.fullmatch(key)
            if fused:
                groups += _fused_groups(path, key, fused.group(1), fused.group(2), dtype, shape,
                                        quantization)
            elif _QUANTIZED.fullmatch(key):
                fmt = quantization.experts if _ROUTED.match(key) else FP8
                groups.append(_quantized_group(path, key, key, dtype, shape, fmt,
                                               quantization.scale_fmt,
                                               lambda f, k=key: f.get_tensor(k)))
            elif dtype in _ITEMSIZE:
                groups.append(([(key, dtype, shape)], lambda f, k=key: [f.get_tensor(k)]))
            else:
                raise ValueError(f"{path.name}: {key} is {dtype}, which quantize does not copy")
    return groups


def _fused_groups(path, key, prefix, part, dtype, shape, quantization):
    """One group per expert and part of a fused [E, 2I, H] / [E, H, I] source tensor."""
    groups = []
    for e in range(shape[0]):
        if part == "down_proj":
            parts = [("down_proj", shape[1:], lambda f, e=e: f.get_slice(key)[e])]
        else:
            half = (shape[1] // 2, shape[2])
            parts = [("gate_proj", half, lambda f, e=e: f.get_slice(key)[e, :half[0]]),
                     ("up_proj", half, lambda f, e=e: f.get_slice(key)[e, half[0]:])]
        for name, part_shape, read in parts:
            groups.append(_quantized_group(path, key, f"{prefix}.{e}.{name}.weight", dtype,
                                           part_shape, quantization.experts,
                                           quantization.scale_fmt, read))
    return groups


def _quantized_group(path, source, name, dtype, shape, fmt, scale_fmt, read):
    """The codes and scales of weight ``name`` (read(f): its dense tensor from ``source``)."""
    if dtype not in _SOURCE_DTYPES or len(shape) != 2:
        raise ValueError(f"{path.name}: {source} is {dtype} {list(shape)}: quantize reads 2-D "
                         f"{'/'.join(_SOURCE_DTYPES)} weights")
    if fmt == MXFP4 and shape[1] % MXFP4_GROUP:
        raise ValueError(f"{path.name}: {source}: MXFP4 needs K = {shape[1]} to be a multiple "
                         f"of {MXFP4_GROUP}")
    grid = scale_grid(fmt, shape)
    if fmt == FP8:
        outputs = [(name, "F8_E4M3", shape), (name + SCALE_SUFFIX, "F32", grid)]
    else:  # the codes' bytes as int8, as V4 and transformers store them (transformers 5.24
        # cannot read F4 tensors from a file: it slices them by their 4-bit shape)
        outputs = [(name, "I8", code_shape(fmt, shape)), (name + SCALE_SUFFIX, "F8_E8M0", grid)]

    def produce(f):
        w = read(f)
        if fmt == FP8:
            return list(quantize_fp8_block(w, scale_fmt=scale_fmt))
        codes, scales = quantize_mxfp4(w)
        return [codes.view(torch.int8), scales]

    return outputs, produce


def _write(dst: Path, src: Path, groups) -> int:
    """Stream the groups' tensors into the safetensors file dst; returns its data bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for outputs, _ in groups:
        for name, dtype, shape in outputs:
            size = _nbytes(dtype, shape)
            header[name] = {"dtype": dtype, "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors does
    with safe_open(src, framework="pt") as f, open(dst, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        for outputs, produce in groups:
            tensors = produce(f)
            for (name, _, _), tensor in zip(outputs, tensors, strict=True):
                data = tensor.contiguous().reshape(-1).view(torch.uint8)   # its bytes
                start, end = header[name]["data_offsets"]
                if data.numel() != end - start:  # the header would lie about every later tensor
                    raise RuntimeError(f"{dst}: {name} has {data.numel()} bytes, its header "
                                       f"entry {end - start}")
                out.write(memoryview(data.numpy()))
    return offset


def _nbytes(dtype: str, shape) -> int:
    return math.prod(shape) * _ITEMSIZE[dtype]
