"""ds-kernels: fused kernels for DeepSeek-style Mixture-of-Experts networks.

Every op dispatches on the device of its inputs (cuda -> Triton, npu -> Ascend, else the
vectorised torch path); ``DS_KERNELS_BACKEND`` or ``use_backend`` forces one. See API.md.
"""

from ds_kernels import rope
from ds_kernels.dispatch import BACKENDS, BackendUnavailableError, use_backend
from ds_kernels.moe import MoE
from ds_kernels.ops.apply_rope import apply_rope
from ds_kernels.ops.fused_moe import fused_moe
from ds_kernels.ops.grouped_mm import grouped_mm
from ds_kernels.ops.index_cache_write import index_cache_write
from ds_kernels.ops.lightning_indexer import lightning_indexer
from ds_kernels.ops.mhc import mhc_post, mhc_pre
from ds_kernels.ops.mla_cache_write import mla_cache_write, mla_cache_write_fused
from ds_kernels.ops.mla_decode import mla_decode
from ds_kernels.ops.mla_prefill import mla_prefill
from ds_kernels.ops.moe_align import MoEAlignment, moe_align
from ds_kernels.ops.quant_linear import quant_linear
from ds_kernels.ops.quantize import dequantize, quantize_fp8_block, quantize_mxfp4
from ds_kernels.ops.rms_norm import rms_norm
from ds_kernels.ops.sparse_mla import sparse_mla
from ds_kernels.ops.route import route

__all__ = ["BACKENDS", "BackendUnavailableError", "MoE", "MoEAlignment", "apply_rope",
           "fused_moe", "grouped_mm", "index_cache_write", "lightning_indexer", "mla_cache_write",
           "mla_cache_write_fused", "mla_decode", "mla_prefill", "mhc_post", "mhc_pre", "moe_align",
           "rms_norm", "route", "rope", "sparse_mla", "use_backend",
           "dequantize", "quant_linear", "quantize_fp8_block", "quantize_mxfp4"]
__version__ = "0.1.0"
