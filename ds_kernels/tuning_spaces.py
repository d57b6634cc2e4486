"""What a tuned config may hold, per op and backend: the sweep's candidates (SPACES) and the
limits every stored value is checked against when a tuning file is read (``problem``).

A tuning file is data from outside: a sweep on another machine, an import of vLLM's files, a
hand edit. Used unchecked, GROUP_M 0 gave wrong fused_moe results and BLOCK_T -4 made route
return garbage ids, so ds_kernels.tuning drops an entry that breaks these rules. autotune
builds its candidates from SPACES (autotune/spaces.py); this module holds only data and the
check, since ds_kernels imports nothing from autotune.
"""

# (full, quick) spaces per (op, backend). fused_moe and grouped_mm run the same GEMM kernel.
_GEMM = (dict(BLOCK_M=[16, 32, 64, 128], BLOCK_N=[32, 64, 128, 256], BLOCK_K=[32, 64, 128],
              GROUP_M=[1, 8, 16], num_warps=[4, 8], num_stages=[2, 3, 4, 5]),
         dict(BLOCK_M=[16, 64, 128], BLOCK_N=[64, 128], BLOCK_K=[64], GROUP_M=[8],
              num_warps=[4, 8], num_stages=[3, 4]))
SPACES = {
    ("fused_moe", "triton"): _GEMM,
    ("grouped_mm", "triton"): _GEMM,
    ("quant_linear", "triton"): _GEMM,
    ("mla_decode", "triton"): (
        # num_stages above 2 builds the same kernel (the page loop is not pipelined).
        dict(BLOCK_N=[16, 32, 64], min_split_tokens=[64, 128, 256, 512, 1024],
             num_warps=[4, 8], num_stages=[1, 2]),
        dict(BLOCK_N=[16, 32, 64], min_split_tokens=[128, 256, 512], num_warps=[8],
             num_stages=[2])),
    # sparse_mla runs mla_decode's kernel over the rows its slots name: the same knobs.
    ("sparse_mla", "triton"): (
        dict(BLOCK_N=[16, 32, 64], min_split_tokens=[64, 128, 256, 512, 1024],
             num_warps=[4, 8], num_stages=[1, 2]),
        dict(BLOCK_N=[16, 32, 64], min_split_tokens=[128, 256, 512], num_warps=[8],
             num_stages=[2])),
    # The running top keys take registers whatever BLOCK_N; the page loop is not pipelined.
    ("lightning_indexer", "triton"): (
        dict(BLOCK_N=[16, 32, 64, 128], min_split_keys=[512, 1024, 2048, 4096, 8192],
             num_warps=[4, 8], num_stages=[1]),
        dict(BLOCK_N=[32, 64], min_split_keys=[1024, 4096], num_warps=[4, 8], num_stages=[1])),
    ("mla_prefill", "triton"): (
        dict(BLOCK_M=[16, 32, 64, 128], BLOCK_N=[16, 32, 64, 128], num_warps=[4, 8],
             num_stages=[1, 2, 3, 4]),
        dict(BLOCK_M=[32, 64, 128], BLOCK_N=[32, 64], num_warps=[4, 8], num_stages=[2, 3])),
    ("route", "triton"): (dict(BLOCK_T=[1, 2, 4, 8, 16], num_warps=[1, 2, 4, 8]),
                          dict(BLOCK_T=[1, 4, 16], num_warps=[2, 4, 8])),
    # The torch path's knobs (ds_kernels/cpu/*.py name them and say when each wins).
    ("route", "torch"): (dict(strategy=["numpy", "sort", "topk"]),) * 2,
    ("fused_moe", "torch"): (dict(strategy=["grouped_mm", "mm_loop", "expert_threads"]),) * 2,
    ("grouped_mm", "torch"): (dict(strategy=["grouped_mm", "mm_loop"]),) * 2,
    ("quant_linear", "torch"): (dict(chunk_elements=[1 << 16, 1 << 18, 1 << 20]),) * 2,
    ("mla_decode", "torch"): (
        dict(chunk_elements=[1 << 16, 1 << 18, 1 << 19, 1 << 20, 1 << 21, 1 << 22, 1 << 24]),
        dict(chunk_elements=[1 << 18, 1 << 20, 1 << 22])),
    ("lightning_indexer", "torch"): (
        dict(chunk_elements=[1 << 18, 1 << 20, 1 << 22, 1 << 24]),
        dict(chunk_elements=[1 << 20, 1 << 22])),
    ("sparse_mla", "torch"): (
        dict(chunk_elements=[1 << 18, 1 << 20, 1 << 22, 1 << 24]),
        dict(chunk_elements=[1 << 20, 1 << 22])),
    ("mla_prefill", "torch"): (
        dict(score_elements=[1 << 20, 1 << 22, 1 << 24], pieces=[1, 4, 8, 16],
             pack_elements=[1 << 14, 1 << 16, 1 << 18]),
        dict(score_elements=[1 << 20, 1 << 22], pieces=[4, 8], pack_elements=[1 << 16])),
}

# What a stored integer may be, per key: (smallest, largest, power of two). These are the
# kernels' limits, wider than the sweep's candidates: vLLM's files (autotune import-vllm) hold
# tiles of 16 to 256, GROUP_SIZE_M up to 64 and num_stages up to 5. A key not listed here is
# categorical (a strategy): its value must be one its space lists.
_TILE = (16, 256, True)  # tl.arange takes powers of two, tl.dot at least 16 a side
_COUNT = (1, 1 << 40, False)  # the torch path's sizes: any positive count works
LIMITS = {
    "BLOCK_M": _TILE, "BLOCK_N": _TILE, "BLOCK_K": _TILE,
    # route's tokens a program: a tl.arange length; one token is a valid tile.
    "BLOCK_T": (1, 256, True),
    # Rows of tiles sharing B's column tiles: any count, but 0 divides by zero in the kernel.
    "GROUP_M": (1, 256, False),
    "num_warps": (1, 32, True),  # Triton's rule; 32 warps are 1024 threads
    "num_stages": (1, 8, False),
    "min_split_tokens": _COUNT, "min_split_keys": _COUNT,
    "chunk_elements": _COUNT, "score_elements": _COUNT, "pack_elements": _COUNT,
    "pieces": _COUNT,
}


def problem(op: str, backend: str, config) -> str | None:
    """Why ``config`` cannot be a stored config of ``op`` on ``backend`` (its space names the
    keys it may set), or None if it can."""
    if not isinstance(config, dict):
        return f"a config must be an object of keys, got {config!r:.80}"
    if (op, backend) not in SPACES:
        return f"{op} has no tunable config on the {backend} backend"
    space = SPACES[op, backend][0]
    for key, value in config.items():
        if key not in space:
            return f"unknown key {key!r} (an {op} {backend} config takes {', '.join(space)})"
        if key not in LIMITS:
            if not isinstance(value, str) or value not in space[key]:
                return f"{key}={value!r:.80}: expected one of {space[key]}"
            continue
        low, high, power_of_two = LIMITS[key]
        # bool is an int to Python, and JSON floats (1e300, 16.0) are no tile sizes.
        if (type(value) is not int or not low <= value <= high
                or (power_of_two and value & (value - 1))):
            kind = "a power of two" if power_of_two else "an integer"
            return f"{key}={value!r:.80}: expected {kind} from {low} to {high}"
    return None
