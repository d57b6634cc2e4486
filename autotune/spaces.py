"""Candidate configs per op and backend, as data, with static pruning.

A space maps each config key to its values; the candidates are their product, minus those
pruned before anything is compiled: a tile that tl.dot cannot take (< 16), a pipeline whose
shared memory exceeds the device's, or tiles whose accumulators cannot stay in registers would
fail with "out of resources" on a smaller GPU or spill, and a BLOCK_M far above the rows an
expert has only multiplies padding. The kernels' own resource models (``fits``) do the MLA
pruning, so that a heuristic and a sweep never disagree about what fits.
"""

import itertools

import torch

from ds_kernels import tuning

# (full, quick) spaces per (op, backend). fused_moe and grouped_mm run the same GEMM kernel.
_GEMM = (dict(BLOCK_M=[16, 32, 64, 128], BLOCK_N=[32, 64, 128, 256], BLOCK_K=[32, 64, 128],
              GROUP_M=[1, 8, 16], num_warps=[4, 8], num_stages=[2, 3, 4, 5]),
         dict(BLOCK_M=[16, 64, 128], BLOCK_N=[64, 128], BLOCK_K=[64], GROUP_M=[8],
              num_warps=[4, 8], num_stages=[3, 4]))
SPACES = {
    ("fused_moe", "triton"): _GEMM,
    ("grouped_mm", "triton"): _GEMM,
    ("mla_decode", "triton"): (
        # num_stages above 2 builds the same kernel (the page loop is not pipelined).
        dict(BLOCK_N=[16, 32, 64], min_split_tokens=[64, 128, 256, 512, 1024],
             num_warps=[4, 8], num_stages=[1, 2]),
        dict(BLOCK_N=[16, 32, 64], min_split_tokens=[128, 256, 512], num_warps=[8],
             num_stages=[2])),
    ("mla_prefill", "triton"): (
        dict(BLOCK_M=[16, 32, 64, 128], BLOCK_N=[16, 32, 64, 128], num_warps=[4, 8],
             num_stages=[1, 2, 3, 4]),
        dict(BLOCK_M=[32, 64, 128], BLOCK_N=[32, 64], num_warps=[4, 8], num_stages=[2, 3])),
    # The torch path's knobs (ds_kernels/cpu/*.py name them and say when each wins).
    ("route", "triton"): (dict(BLOCK_T=[1, 2, 4, 8, 16], num_warps=[1, 2, 4, 8]),
                          dict(BLOCK_T=[1, 4, 16], num_warps=[2, 4, 8])),
    ("route", "torch"): (dict(strategy=["numpy", "sort", "topk"]),) * 2,
    ("fused_moe", "torch"): (dict(strategy=["grouped_mm", "mm_loop", "expert_threads"]),) * 2,
    ("grouped_mm", "torch"): (dict(strategy=["grouped_mm", "mm_loop"]),) * 2,
    ("mla_decode", "torch"): (
        dict(chunk_elements=[1 << 16, 1 << 18, 1 << 19, 1 << 20, 1 << 21, 1 << 22, 1 << 24]),
        dict(chunk_elements=[1 << 18, 1 << 20, 1 << 22])),
    ("mla_prefill", "torch"): (
        dict(score_elements=[1 << 20, 1 << 22, 1 << 24], pieces=[1, 4, 8, 16],
             pack_elements=[1 << 14, 1 << 16, 1 << 18]),
        dict(score_elements=[1 << 20, 1 << 22], pieces=[4, 8], pack_elements=[1 << 16])),
}

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
