"""ds-kernels: fused kernels for DeepSeek-style Mixture-of-Experts networks.

Every op dispatches on the device of its inputs (cuda -> Triton, npu -> Ascend, else the
vectorised torch path); ``DS_KERNELS_BACKEND`` or ``use_backend`` forces one. See API.md.
"""

from ds_kernels.dispatch import BACKENDS, BackendUnavailableError, use_backend
from ds_kernels.moe import MoE
from ds_kernels.ops.fused_moe import fused_moe
from ds_kernels.ops.grouped_mm import grouped_mm
from ds_kernels.ops.moe_align import MoEAlignment, moe_align
from ds_kernels.ops.route import route

__all__ = ["BACKENDS", "BackendUnavailableError", "MoE", "MoEAlignment", "fused_moe", "grouped_mm",
           "moe_align", "route", "use_backend"]
__version__ = "0.1.0"
