"""Quantised weights in ds_model: DeepSeek's FP8 checkpoints (and V4-style MXFP4 experts), held
quantised in memory and run through ds_kernels.

What DeepSeek's files quantise (DeepSeek-V3's README_WEIGHTS.md: float8_e4m3fn, one fp32
``weight_scale_inv`` per 128x128 block, edge blocks zero-padded): every Linear weight of the
decoder layers - q_a/q_b (or q), kv_a, kv_b, o_proj, the dense MLPs, the shared and the routed
experts. The embedding, lm_head, the norms and the router gate are bf16 (its correction bias
fp32); ds_model refuses a checkpoint that quantises one of them.

How ds_model holds them (from_pretrained(..., dequantize=False)):
- QuantLinear (the projections, shared experts, dense MLPs): ``weight`` float8_e4m3fn [N, K] and
  ``weight_scale_inv`` [ceil(N/128), ceil(K/128)] (fp32, or e8m0 as V4 ships), the checkpoints'
  names; forward = ds_kernels.quant_linear (weight-only: x stays unquantised).
- QuantExperts (the routed experts): ``gate_up_proj`` [E, 2I, H] + ``gate_up_proj_scale_inv``
  [E, ceil(2I/128), ceil(H/128)] and ``down_proj`` [E, H, I] + ``down_proj_scale_inv``
  (transformers' FP8Experts names); MXFP4 (V4's ``expert_dtype: "fp4"``): float4_e2m1fn_x2
  [E, 2I, H/2] + float8_e8m0fnu [E, 2I, H/32], and the same for down_proj. forward =
  ds_kernels.fused_moe(..., w13_scale=, w2_scale=).
- kv_b_proj is dequantised once at load into the model dtype (a plain Linear): absorbed decode
  multiplies q_nope by its W_UK rows and the attention output by its W_UV rows as plain
  matrices (DeepSeek's inference dequantises it with weight_dequant for the same use, at every
  call; prefill, which could run it through quant_linear, uses the same matrix). It costs
  Hq * (Dn + Dv) * Dc weights a layer in the model dtype: 16.8M in V3, 2.0 GB over 61 layers in
  bf16 where FP8 would hold 1.0 GB.

config.json's ``quantization_config`` (DeepSeek's form, plus the keys transformers writes):
quant_method "fp8", fmt "e4m3", activation_scheme "dynamic", weight_block_size [128, 128];
scale_fmt "float" or "ue8m0" (V3.1+: the scales are powers of two; it changes nothing for the
weight-only paths, which multiply by the scale whatever it is); expert_dtype "fp8" or "fp4"
(DeepSeek-V4: MXFP4 experts; V4 writes it at the top level of config.json, V4.1 inside
quantization_config, as transformers 5.24's DeepseekV4Config reads it).
"""

import dataclasses
import math

import torch
from torch import nn

from ds_kernels import fused_moe, quant_linear, quantize_fp8_block, quantize_mxfp4
from ds_kernels.expert_parallel import ShardedExperts
from ds_kernels.moe import EPExperts, Experts
from ds_kernels.quant_formats import (E8M0_DTYPE, FP4_DTYPE, FP8, FP8_BLOCK, FP8_DTYPE, MXFP4,
                                      SCALE_BLOCK, SCALE_FMTS)

FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
              "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
# What expert_dtype names -> our format names.
EXPERT_DTYPES = {"fp8": FP8, "fp4": MXFP4}
# Keys transformers' FineGrainedFP8Config writes besides DeepSeek's: which modules it converted
# (the tensors say that here) and whether it dequantised.
_INFORMATIONAL_KEYS = ("dequantize", "modules_to_not_convert", "modules_to_convert")
_KNOWN_KEYS = {*FP8_CONFIG, "scale_fmt", "expert_dtype", *_INFORMATIONAL_KEYS}
SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv, experts.down_proj -> ..._scale_inv


@dataclasses.dataclass(frozen=True)
class Quantization:
    """A checkpoint's quantization_config: FP8 128x128 blocks everywhere, the routed experts in
    ``experts`` ("fp8" or "mxfp4")."""

    scale_fmt: str = "float"
    experts: str = FP8

    @classmethod
    def from_config(cls, raw) -> "Quantization":
        """From config.json's quantization_config; ValueError naming the key and value that no
        DeepSeek checkpoint has or that ds_model does not run."""
        if not isinstance(raw, dict):
            raise ValueError(f"quantization_config must be an object or null, got {raw!r}")
        unknown = sorted(set(raw) - _KNOWN_KEYS)
        if unknown:
            raise ValueError(f"quantization_config has unknown key(s) {unknown}")
        _expect(raw, "quant_method", None, ("fp8",), "the only method of DeepSeek's checkpoints")
        _expect(raw, "fmt", "e4m3", ("e4m3",), "float8_e4m3fn, as DeepSeek's checkpoints are")
        _expect(raw, "activation_scheme", "dynamic", ("dynamic",),
                "ds_model's weight-only paths read no static activation scales")
        block = raw.get("weight_block_size", FP8_CONFIG["weight_block_size"])
        if list(block or ()) != FP8_CONFIG["weight_block_size"]:
            raise ValueError(f"quantization_config['weight_block_size'] must be [128, 128] (every "
                             f"DeepSeek FP8 checkpoint's; ds_kernels' FP8 format), got {block!r}")
        scale_fmt = _expect(raw, "scale_fmt", "float", SCALE_FMTS, "fp32 or power-of-two scales")
        experts = _expect(raw, "expert_dtype", "fp8", tuple(EXPERT_DTYPES),
                          "FP8 blocks or V4's MXFP4")
        return cls(scale_fmt, EXPERT_DTYPES[experts])

    def to_config(self) -> dict:
        """DeepSeek's published form (scale_fmt and expert_dtype only where not the default)."""
        out = dict(FP8_CONFIG)
        if self.scale_fmt != "float":
            out["scale_fmt"] = self.scale_fmt
        if self.experts == MXFP4:
            out["expert_dtype"] = "fp4"
        return out


def _expect(raw, key, default, allowed, why):
    value = raw.get(key, default)
    if value not in allowed:
        raise ValueError(f"quantization_config[{key!r}] must be one of {list(allowed)} ({why}), "
                         f"got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Format:
    """How one module's weights are held: "fp8" or "mxfp4", with scales in scale_dtype (fp32 or
    float8_e8m0fnu for FP8; e8m0 for MXFP4)."""

    fmt: str
    scale_dtype: torch.dtype = torch.float32


def scale_grid(fmt: str, shape) -> tuple[int, ...]:
    """The scale tensor's shape for a weight W [..., N, K] in ``fmt``."""
    rows, cols = SCALE_BLOCK[fmt]
    *lead, N, K = shape
    return (*lead, math.ceil(N / rows), math.ceil(K / cols))


def code_shape(fmt: str, shape) -> tuple[int, ...]:
    """The code tensor's shape for a weight W [..., N, K]: MXFP4 packs two columns a byte."""
    *lead, N, K = shape
    return (*lead, N, K // 2 if fmt == MXFP4 else K)


def _storage(fmt: str, shape, scale_dtype):
    """Empty (codes, scales) Parameters for a weight W of ``shape`` (frozen: quant_linear and
    fused_moe give quantised weights no gradient)."""
    codes = torch.empty(code_shape(fmt, shape), dtype=FP8_DTYPE if fmt == FP8 else FP4_DTYPE)
    scales = torch.empty(scale_grid(fmt, shape), dtype=scale_dtype)
    return nn.Parameter(codes, requires_grad=False), nn.Parameter(scales, requires_grad=False)


def _quantize(w, fmt, scale_fmt):
    """(codes, scales) of a dense weight w [..., N, K]."""
    return quantize_fp8_block(w, scale_fmt=scale_fmt) if fmt == FP8 else quantize_mxfp4(w)


class QuantLinear(nn.Module):
    """A bias-optional Linear whose weight stays quantised (see the module docstring)."""

    QUANTIZED = ("weight", "weight_scale_inv")  # to_dtype and init_weights leave these alone

    def __init__(self, in_features, out_features, bias: bool, fmt: Format):
        super().__init__()
        self.in_features, self.out_features, self.format = in_features, out_features, fmt
        self.weight, self.weight_scale_inv = _storage(fmt.fmt, (out_features, in_features),
                                                      fmt.scale_dtype)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x):                                             # [..., K]
        return quant_linear(x, self.weight, self.weight_scale_inv, self.bias)  # [..., N]

    @torch.no_grad()
    def load_dense(self, w, scale_fmt="float"):
        """Quantise the dense weight w [N, K] into this module."""
        codes, scales = _quantize(w, self.format.fmt, scale_fmt)
        self.weight.copy_(codes)
        self.weight_scale_inv.copy_(scales.to(self.format.scale_dtype))

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self.format.fmt}")


class QuantExperts(nn.Module):
    """The routed experts with quantised weights (see the module docstring); the forward of
    ds_kernels.moe.Experts."""

    QUANTIZED = ("gate_up_proj", "gate_up_proj_scale_inv", "down_proj", "down_proj_scale_inv")

    def __init__(self, num_experts, hidden_size, intermediate_size, fmt: Format):
        super().__init__()
        E, H, I = num_experts, hidden_size, intermediate_size
        self.format = fmt
        self.gate_up_proj, self.gate_up_proj_scale_inv = _storage(fmt.fmt, (E, 2 * I, H),
                                                                  fmt.scale_dtype)
        self.down_proj, self.down_proj_scale_inv = _storage(fmt.fmt, (E, H, I), fmt.scale_dtype)

    def forward(self, x, topk_ids, topk_weights):                    # x [T, H]
        return fused_moe(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids,
                         w13_scale=self.gate_up_proj_scale_inv,
                         w2_scale=self.down_proj_scale_inv)           # [T, H]

    @torch.no_grad()
    def load_dense(self, expert: int, gate_up, down, scale_fmt="float"):
        """Quantise expert ``expert``'s dense weights gate_up [2I, H] and down [H, I] into it."""
        for name, w in (("gate_up_proj", gate_up), ("down_proj", down)):
            codes, scales = _quantize(w, self.format.fmt, scale_fmt)
            getattr(self, name)[expert].copy_(codes)
            getattr(self, name + SCALE_SUFFIX)[expert].copy_(scales.to(self.format.scale_dtype))

    def extra_repr(self):
        E, two_i = self.gate_up_proj.shape[:2]
        return f"num_experts={E}, intermediate_size={two_i // 2}, {self.format.fmt}"


class EPQuantExperts(ShardedExperts, QuantExperts):
    """Quantised routed experts sharded over a torch.distributed group (expert parallelism,
    ds_kernels/expert_parallel.py): this rank's experts' codes and scales only."""


QUANTIZED_MODULES = (QuantLinear, QuantExperts)


def quantizable(model: nn.Module) -> dict[str, str]:
    """Module name -> "linear" (held quantised), "folded" (kv_b_proj: dequantised at load) or
    "experts", for every module of a (plain) model that DeepSeek's checkpoints quantise."""
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, Experts):  # EPExperts included
            kinds[name] = "experts"
        elif type(module) is nn.Linear and name != "lm_head":
            kinds[name] = "folded" if name.endswith(".kv_b_proj") else "linear"
    return kinds


def planned_formats(model: nn.Module, quantization: Quantization) -> dict[str, Format]:
    """The formats a model holds when every module DeepSeek quantises is quantised as
    ``quantization`` says (fp32 FP8 scales; MXFP4 scales are e8m0): for random presets."""
    expert_format = Format(MXFP4, E8M0_DTYPE) if quantization.experts == MXFP4 else Format(FP8)
    return {name: expert_format if kind == "experts" else Format(FP8)
            for name, kind in quantizable(model).items() if kind != "folded"}


def quantize_modules(model: nn.Module, formats: dict[str, Format]) -> nn.Module:
    """Replace each named module (a Linear or ds_kernels Experts) by its quantised twin, with
    empty storage on the current default device (build on the meta device, then to_empty)."""
    for name, fmt in formats.items():
        module = model.get_submodule(name)
        if isinstance(module, EPExperts):
            _, two_i, H = module.gate_up_proj.shape
            new = EPQuantExperts(module.num_experts, H, two_i // 2, fmt, group=module.group,
                                 expert_map=module.experts_of, wire=module.wire)
        elif isinstance(module, Experts):
            E, two_i, H = module.gate_up_proj.shape
            new = QuantExperts(E, H, two_i // 2, fmt)
        else:
            new = QuantLinear(module.in_features, module.out_features, module.bias is not None,
                              fmt)
        model.set_submodule(name, new)
    return model


def quantized_state_keys(model: nn.Module) -> set[str]:
    """The state_dict keys of quantised codes and scales."""
    return {f"{name}.{attr}" if name else attr for name, module in model.named_modules()
            for attr in getattr(module, "QUANTIZED", ())}

