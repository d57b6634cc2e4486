"""The two quantised weight formats of DeepSeek's checkpoints: dtypes, block sizes and the
constants of their recipes (ds_kernels/reference/quantize.py spells the recipes out).

  "fp8":   w_q float8_e4m3fn [..., N, K], one scale per 128x128 block: fp32 (V3, R1) or
           float8_e8m0fnu (V4's ue8m0 scales) [..., ceil(N/128), ceil(K/128)].
  "mxfp4": w_q float4_e2m1fn_x2 [..., N, K/2] (two codes a byte, the even column in the low
           nibble), one float8_e8m0fnu scale per 32 of K [..., N, K/32] (V4's experts).

The block size follows from the dtype, as in DeepSeek's own code, not from the shapes: a scale
grid fits many block sizes (576 rows in 5 scale rows: any block of 116 to 143 rows).
"""

import torch

FP8, MXFP4 = "fp8", "mxfp4"
FP8_DTYPE = torch.float8_e4m3fn
# Added in torch 2.8 and 2.7; None before, so that importing ds_kernels still works there.
FP4_DTYPE = getattr(torch, "float4_e2m1fn_x2", None)
E8M0_DTYPE = getattr(torch, "float8_e8m0fnu", None)

FP8_BLOCK = 128        # weight_block_size [128, 128] of every DeepSeek FP8 checkpoint
E4M3_MAX = 448.0
FP8_AMAX_FLOOR = 1e-4  # DeepGEMM's clamp(1e-4), DeepSeek-V3's tl.maximum(amax, 1e-4)
MXFP4_GROUP = 32       # elements sharing one e8m0 scale (the OCP MX block)
E2M1_MAX = 6.0
FP4_AMAX_FLOOR = 6 * 2.0 ** -126  # DeepSeek-V4's clamp: the scale is at least 2^-126
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitudes of codes 0..7
E8M0_NAN = 0xFF
SCALE_FMTS = ("float", "ue8m0")

# (rows, columns) of W sharing one scale.
SCALE_BLOCK = {FP8: (FP8_BLOCK, FP8_BLOCK), MXFP4: (1, MXFP4_GROUP)}


def format_of(w_q: torch.Tensor) -> str | None:
    """"fp8" or "mxfp4" from w_q's dtype; None for any other dtype."""
    if w_q.dtype == FP8_DTYPE:
        return FP8
    if FP4_DTYPE is not None and w_q.dtype == FP4_DTYPE:
        return MXFP4
    return None


def in_features(w_q: torch.Tensor, fmt: str) -> int:
    """K of a quantised [..., N, K] weight (MXFP4 packs two columns a byte)."""
    return w_q.shape[-1] * (2 if fmt == MXFP4 else 1)
