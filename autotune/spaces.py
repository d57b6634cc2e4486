"""Candidate configs per op and backend, as data, with static pruning.

Triton candidates are pruned before anything is compiled: a tile that tl.dot cannot take
(< 16), a pipeline whose shared memory exceeds the device's, or an accumulator that cannot stay
in registers would fail with "out of resources" on a smaller GPU or spill, and a BLOCK_M far
above the rows an expert has only multiplies padding.
"""

import itertools

import torch

# GEMM tiles for grouped_mm and fused_moe (the same kernel).
GEMM_SPACE = dict(BLOCK_M=[16, 32, 64, 128], BLOCK_N=[32, 64, 128, 256], BLOCK_K=[32, 64, 128],
                  GROUP_M=[1, 8, 16], num_warps=[4, 8], num_stages=[2, 3, 4, 5])
GEMM_QUICK = dict(BLOCK_M=[16, 64, 128], BLOCK_N=[64, 128], BLOCK_K=[64], GROUP_M=[8],
                  num_warps=[4, 8], num_stages=[3, 4])

# The torch path's strategies (ds_kernels/cpu/*.py name them and say when each wins).
CPU_STRATEGIES = {
    "route": ["sort", "topk"],
    "fused_moe": ["grouped_mm", "mm_loop", "expert_threads"],
    "grouped_mm": ["grouped_mm", "mm_loop"],
}

_REGISTERS_PER_THREAD = 255
_FALLBACK_SHARED_BYTES = 99 * 1024  # the smallest opt-in limit among recent NVIDIA GPUs


def shared_memory_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return _FALLBACK_SHARED_BYTES
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", _FALLBACK_SHARED_BYTES)


def gemm_candidates(rows_per_expert: float, N: int, K: int, dtype, device: torch.device, *,
                    quick: bool, swiglu: bool = False) -> list[dict]:
    space = GEMM_QUICK if quick else GEMM_SPACE
    keep = []
    for values in itertools.product(*space.values()):
        config = dict(zip(space, values))
        if gemm_fits(config, rows_per_expert, N, K, dtype, device, swiglu=swiglu):
            keep.append(config)
    return keep


def gemm_fits(config: dict, rows_per_expert: float, N: int, K: int, dtype,
              device: torch.device, *, swiglu: bool = False) -> bool:
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    b_tiles = 2 if swiglu else 1  # SwiGLU loads gate and up tiles of B
    if min(bm, bn, bk) < 16:
        return False
    if bm > max(16, 2 * rows_per_expert):  # tiles of mostly padding
        return False
    if bn > max(32, 2 * N) or bk > max(32, 2 * K):
        return False
    staged = config["num_stages"] * (bm * bk + b_tiles * bk * bn) * dtype.itemsize
    if staged > shared_memory_bytes(device):
        return False
    threads = config["num_warps"] * 32
    accumulator_registers = b_tiles * bm * bn // threads  # fp32, one register each
    return accumulator_registers <= _REGISTERS_PER_THREAD // 2
