"""Tile configs for the GEMM kernels: a heuristic, the hook where tuned configs plug in, and an
override for tests and benchmarks.

Per-expert row counts change every step, so configs are keyed on shapes only (E, N, K, dtype
and the average rows per expert T*k/E, bucketed by powers of two) - never on the routing
itself, and never with a device synchronisation.
"""

import contextlib
import threading

_override = threading.local()
# (op, bucket key) -> config; filled by tuned-config files (the autotune issue).
TUNED: dict[tuple, dict] = {}


@contextlib.contextmanager
def override(**config):
    """Use ``config`` (keys of the heuristic's dicts; missing keys keep the heuristic's) for
    every GEMM launched inside the block."""
    previous = getattr(_override, "config", None)
    _override.config = config
    try:
        yield
    finally:
        _override.config = previous


def rows_bucket(rows_per_expert: float) -> int:
    """Power-of-two bucket of the average rows per expert (1, 2, 4, ...)."""
    bucket = 1
    while bucket < rows_per_expert:
        bucket *= 2
    return bucket


def gemm_config(op: str, rows_per_expert: float, E: int, N: int, K: int, dtype) -> dict:
    """BLOCK_M/N/K, GROUP_M, num_warps, num_stages for a grouped GEMM launch."""
    bucket = rows_bucket(rows_per_expert)
    config = TUNED.get((op, bucket, E, N, K, str(dtype)))
    if config is None:
        config = _heuristic(bucket, N, K, dtype)
    forced = getattr(_override, "config", None)
    return {**config, **forced} if forced else config


def _heuristic(bucket: int, N: int, K: int, dtype) -> dict:
    # BLOCK_M follows the rows an expert really has: a decode step (a few rows per expert) gets
    # 16-row tiles, the smallest tl.dot takes, instead of padding each expert to 64 rows.
    block_m = 16 if bucket <= 16 else 32 if bucket <= 32 else 64 if bucket <= 256 else 128
    wide = dtype.itemsize <= 2
    block_n = 128 if (wide and N >= 128 and block_m >= 64) else 64
    block_k = 64 if (wide or K < 64) else 32
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
                num_warps=8 if block_m * block_n >= 128 * 128 else 4,
                num_stages=3 if block_m >= 64 else 4)
