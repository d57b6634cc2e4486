"""Candidate configs per op and backend, with static pruning.

A space (ds_kernels/tuning_spaces.py, data that ds_kernels also checks stored configs against)
maps each config key to its values; the candidates are their product, minus those
pruned before anything is compiled: a tile that tl.dot cannot take (< 16), a pipeline whose
shared memory exceeds the device's, or tiles whose accumulators cannot stay in registers would
fail with "out of resources" on a smaller GPU or spill, and a BLOCK_M far above the rows an
expert has only multiplies padding. The kernels' own resource models (``fits``) do the MLA
pruning, so that a heuristic and a sweep never disagree about what fits.
"""

import itertools

import torch

from ds_kernels import tuning
from ds_kernels.tuning_spaces import SPACES

# fp32 accumulator words per thread, at most: sampled offline sm_90 builds (triton 3.9) of the
# fused_moe GEMMs at or below it spilled nothing; the 256-rows heuristic tile sits at 128.
_ACCUMULATOR_WORDS = 128
_FALLBACK_SHARED_BYTES = 99 * 1024  # the smallest opt-in limit among recent NVIDIA GPUs


def candidates(op: str, backend: str, *, quick: bool, fits=None) -> list[dict]:
    """The product of ``op``'s space for ``backend``, keeping the configs ``fits`` accepts."""
    if (op, backend) not in SPACES:
        raise ValueError(f"{op} has no {backend} tuning space")
    space = SPACES[op, backend][1 if quick else 0]
    configs = (dict(zip(space, values)) for values in itertools.product(*space.values()))
    return [c for c in configs if fits is None or fits(c)]


def shared_memory_bytes(device: torch.device) -> int:
    """The device's opt-in shared memory per block; off a GPU (tests), the smallest limit."""
    return tuning.shared_memory_bytes(device) if device.type == "cuda" else _FALLBACK_SHARED_BYTES


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
    if tuning.gemm_staged_bytes(config, dtype, b_tiles) > shared_memory_bytes(device):
        return False
    threads = config["num_warps"] * 32
    accumulator_registers = b_tiles * bm * bn // threads  # fp32, one register each
    return accumulator_registers <= _ACCUMULATOR_WORDS
