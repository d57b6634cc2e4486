"""Rotary embedding tables: default RoPE and YaRN, as transformers' DeepseekV3RotaryEmbedding
computes them (modeling_rope_utils._compute_yarn_parameters) and DeepSeek-V3's own
inference/model.py (precompute_freqs_cis, MLA.softmax_scale).

DeepSeek-V3 (config.json "rope_scaling"): {"type": "yarn", "factor": 40,
"original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
"mscale_all_dim": 1.0}, rope_theta 10000, qk_rope_head_dim 64, qk_head_dim 192.

YaRN keeps the frequency of a pair that turns more than beta_fast times over the original
context, divides by ``factor`` that of a pair turning fewer than beta_slow times, and ramps
linearly between the two over the pair indices [low, high] where those counts fall. Its
attention temperature is split in two places:
- cos and sin are multiplied by attention_factor = mscale(factor, mscale) / mscale(factor,
  mscale_all_dim) (transformers; 1.0 for DeepSeek-V3, whose two mscales are equal, and
  DeepSeek's model.py has no such factor);
- the softmax scale is multiplied by mscale(factor, mscale_all_dim)^2 (both).

Differences between the two sources, none of which changes DeepSeek-V3's tables beyond fp32
rounding:
- model.py applies YaRN (and the softmax mscale) only when max_seq_len > original_seq_len
  (its default max_seq_len, 16384, is); transformers whenever rope_type is "yarn". We follow
  transformers: the scaling dict decides.
- model.py's softmax mscale uses ModelArgs.mscale (1.0); transformers uses mscale_all_dim.
- model.py writes freqs / factor * (1 - smooth) + freqs * smooth with freqs = 1 / base^(2i/d);
  transformers 1 / (factor * base^(2i/d)) for the first term: the inverse frequencies differ
  by an ulp at most. We use transformers' order.
- transformers casts cos/sin to the activations' dtype; ours stay fp32 (apply_rope reads fp32).
"""

import math

import torch

# Keys of a rope_parameters / rope_scaling dict understood here; any other is an error rather
# than silently ignored (e.g. partial_rotary_factor would change the table).
_KEYS = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings",
         "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"}
_ROPE_TYPES = ("default", "yarn")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(scale) + 1, or 1 when scale <= 1."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _rope_type(scaling: dict | None) -> str:
    if scaling is None:
        return "default"
    unknown = set(scaling) - _KEYS
    if unknown:
        raise ValueError(f"scaling has keys this module does not implement: {sorted(unknown)}; "
                         f"understood: {sorted(_KEYS)}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"scaling rope_type must be one of {_ROPE_TYPES}, got {rope_type!r}")
    if rope_type == "yarn":
        for key in ("factor", "original_max_position_embeddings"):
            if scaling.get(key) is None:
                raise ValueError(f"yarn scaling needs {key!r}, got {scaling}")
    return rope_type


def rope_frequencies(dim: int, base: float, scaling: dict | None = None) -> torch.Tensor:
    """inv_freq [dim/2] fp32: the angle per position of each rotated pair.

    scaling None (or rope_type "default"): 1 / base^(2i/dim). rope_type "yarn": YaRN with the
    keys of transformers' rope_parameters (factor, original_max_position_embeddings, beta_fast
    = 32, beta_slow = 1, truncate = True). A "rope_theta" key, if present, must equal base.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
        raise ValueError(f"dim must be an even int >= 2, got {dim!r}")
    rope_type = _rope_type(scaling)
    if scaling is not None and scaling.get("rope_theta", base) != base:
        raise ValueError(f"scaling rope_theta={scaling['rope_theta']} but base={base}")
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # [dim/2]
    if rope_type == "default":
        return 1.0 / pos_freqs

    factor = scaling["factor"]
    original = scaling["original_max_position_embeddings"]
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations):
        """The pair index whose wavelength fits ``rotations`` times in the original context."""
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a one-point ramp: avoid 0 / 0
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp                                      # 1: keep, 0: interpolate
    return 1.0 / (factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation


def rope_attention_factor(scaling: dict | None = None) -> float:
    """The factor transformers multiplies YaRN's cos and sin by (1.0 for default RoPE):
    scaling["attention_factor"] if given, else mscale(factor, mscale) / mscale(factor,
    mscale_all_dim) when both are set and non-zero, else mscale(factor)."""
    if _rope_type(scaling) == "default":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = scaling["factor"]
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor,
                 attention_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [T, dim/2] fp32 of the angles positions[t] * inv_freq, times
    attention_factor (as transformers: see rope_attention_factor), on positions' device.

    positions: int [T]; inv_freq [dim/2] from rope_frequencies. These are apply_rope's tables.
    """
    if (not isinstance(positions, torch.Tensor) or positions.dim() != 1
            or positions.is_floating_point() or positions.is_complex()):
        raise ValueError("positions must be a 1-D integer tensor, got "
                         f"{getattr(positions, 'dtype', type(positions).__name__)} "
                         f"{tuple(getattr(positions, 'shape', ()))}")
    if not isinstance(inv_freq, torch.Tensor) or inv_freq.dim() != 1:
        raise ValueError("inv_freq must be a 1-D tensor (rope_frequencies' output)")
    angles = positions[:, None].float() * inv_freq.to(positions.device, torch.float32)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def mla_softmax_scale(qk_head_dim: int = 192, scaling: dict | None = None) -> float:
    """MLA's softmax scale: qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN
    with a non-zero mscale_all_dim (transformers' yarn_apply_mscale; DeepSeek's model.py uses
    its mscale, equal for DeepSeek-V3). 0.1352 for DeepSeek-V3 (192, factor 40, 1.0)."""
    scale = qk_head_dim ** -0.5
    if _rope_type(scaling) == "yarn" and scaling.get("mscale_all_dim"):
        mscale = yarn_mscale(scaling["factor"], scaling["mscale_all_dim"])
        scale = scale * mscale * mscale
    return scale
