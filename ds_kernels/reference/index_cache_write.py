"""Reference index-key cache write (DeepSeek-V3.2's lightning indexer keys): each token's key
wk(x) [Di] is LayerNorm'd (weight and bias; fp32 math, rounded to the key's dtype, as
torch.nn.LayerNorm), its first Dr columns rotated (non-interleaved pairs in V3.2, unlike MLA's),
and the row stored at kv_cache-style slot ``slot`` (page slot // block_size, row
slot % block_size); slot -1 is skipped. An FP8 cache (uint8) gets the row quantised as an MLA
latent is (ds_kernels/reference/fp8_mla_cache.py, no rope part): e4m3 codes, a power-of-two
fp32 scale per 128 columns."""

import torch
import torch.nn.functional as F

from ds_kernels.mla_cache_format import is_fp8
from ds_kernels.reference.apply_rope import apply_rope
from ds_kernels.reference.fp8_mla_cache import quantize_row


def index_keys(k, norm_weight, norm_bias, eps, cos, sin, interleaved):
    """The rows [T, Di] the cache receives."""
    acc = torch.promote_types(k.dtype, torch.float32)
    normed = F.layer_norm(k.to(acc), k.shape[-1:], norm_weight.to(acc), norm_bias.to(acc),
                          eps).to(k.dtype)                                      # [T, Di]
    Dr = 2 * cos.shape[1]
    return torch.cat([apply_rope(normed[:, :Dr], cos, sin, interleaved), normed[:, Dr:]], dim=1)


def index_cache_write(k, norm_weight, norm_bias, eps, cos, sin, k_cache, slot_mapping,
                      interleaved):
    rows = index_keys(k, norm_weight, norm_bias, eps, cos, sin, interleaved)
    block_size = k_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            row = quantize_row(rows[t], rows[t, :0]) if is_fp8(k_cache) else rows[t]
            k_cache[slot // block_size, slot % block_size] = row
