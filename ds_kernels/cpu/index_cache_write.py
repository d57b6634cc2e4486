"""Index-key cache write on the torch path: LayerNorm and the rope columns' rotation for all
tokens at once (torch's layer_norm, our apply_rope), then one indexed copy of the rows (an FP8
cache: the rows quantised first, as mla_cache_write quantises latents)."""

import torch
import torch.nn.functional as F

from ds_kernels.cpu.apply_rope import apply_rope
from ds_kernels.cpu.mla_cache_write import quantize_rows, write_rows
from ds_kernels.mla_cache_format import is_fp8


def index_cache_write(k, norm_weight, norm_bias, eps, cos, sin, k_cache, slot_mapping,
                      interleaved):
    acc = torch.promote_types(k.dtype, torch.float32)
    normed = F.layer_norm(k.to(acc), k.shape[-1:], norm_weight.to(acc), norm_bias.to(acc),
                          eps).to(k.dtype)                                      # [T, Di]
    Dr = 2 * cos.shape[1]
    rows = torch.cat([apply_rope(normed[:, :Dr], cos, sin, interleaved), normed[:, Dr:]], dim=1)
    if is_fp8(k_cache):
        rows = quantize_rows(rows, rows[:, :0])                                 # [T, width]
    write_rows(k_cache, slot_mapping, [(slice(None), rows)])
