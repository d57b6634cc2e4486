"""Kernel configs: tuned results on disk, heuristics, and an override for tests and benchmarks.

Tuned results are JSON files, one per (op, backend, device name, dtype, triton and torch
versions), under ``DS_KERNELS_TUNING_DIR`` (default ~/.cache/ds_kernels/tuning), with shipped
defaults for measured devices in ds_kernels/configs/. ``python -m autotune sweep`` writes them;
this module only reads them. A file is only used by the exact versions it was tuned with: a
Triton upgrade changes code generation, and a config tuned for another version can be slower
than the heuristic (a frequent complaint about vLLM's shipped configs). Such a file is reported
once, never silently reused. The files are data from outside (other machines, vLLM imports,
hand edits): only regular files are read, and each entry is checked against its op's rules
(tuning_spaces.py: types, ranges, powers of two, known strategies) as it is read; a bad one
is reported once and left out, and the heuristic runs in its place.

Token counts change every step, so entries are keyed on shapes (SHAPE_KEYS) and on a token
count's power-of-two bucket (rows for grouped_mm, sequences for mla_decode); a lookup takes
the nearest stored bucket. An empty entry records that no candidate beat the heuristic.
Nothing here synchronises with the device.
"""

import contextlib
import functools
import json
import logging
import math
import os
import platform
import re
import stat
from pathlib import Path

import torch

from ds_kernels import tuning_spaces

log = logging.getLogger("ds_kernels")
FORMAT = 1
SHIPPED_DIR = Path(__file__).parent / "configs"

# Process-wide, like ds_kernels.use_backend: CUDA backward passes run on autograd's threads.
_override: list[dict | None] = [None]
_files: dict[Path, dict | None] = {}  # valid entries of tuning files, None if unreadable
_resolved: dict[tuple, dict | None] = {}  # (op, backend, device, dtype, shape key) -> buckets
_said: set[str] = set()


# What a tuned entry is keyed on, per op (besides the bucket: T for fused_moe, route and
# mla_prefill, M for grouped_mm, B for mla_decode). The ops build these keys at run time and
# autotune stores under them. An op's kernels that are tuned apart (its backward; mla_prefill's
# three) prefix the key with their name: "backward:E=256,I=2048,H=7168,k=8".
SHAPE_KEYS = {
    "fused_moe": "E={E},I={I},H={H},k={k}",
    "grouped_mm": "E={E},N={N},K={K}",
    "route": "E={E}",
    "mla_decode": "Hq={Hq},Dc={Dc},Dr={Dr},page={page}",
    "sparse_mla": "Hq={Hq},Dc={Dc},Dr={Dr},page={page}",
    "mla_prefill": "H={H},Dqk={Dqk},Dv={Dv},causal={causal:d}",
    "quant_linear": "fmt={fmt},N={N},K={K}",
    "lightning_indexer": "H={H},D={D},page={page}",
}


def gemm_kernel(fmt: str | None, backward: bool, w8a8: bool = False) -> str | None:
    """The name under which the configs of a GEMM of grouped_mm / fused_moe are tuned apart,
    on every backend: None / "backward" for plain weights, "fp8" / "fp8-backward" (or mxfp4)
    for quantised ones, "fp8-w8a8" for FP8 weights times FP8-quantised activations."""
    parts = (fmt, "w8a8" if w8a8 else None, "backward" if backward else None)
    return "-".join(n for n in parts if n) or None


def shape_key(op: str, kernel: str | None = None, **dims) -> str:
    """``op``'s key for these dims (extra dims are ignored), for one of its kernels."""
    key = SHAPE_KEYS[op].format(**dims)
    return f"{kernel}:{key}" if kernel else key


def tuning_dir() -> Path:
    return Path(os.environ.get("DS_KERNELS_TUNING_DIR") or Path.home() / ".cache" / "ds_kernels"
                / "tuning")


@functools.cache
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine()
    return device.type


def shared_memory_bytes(device: torch.device) -> float:
    """Shared memory a CUDA block may opt into on ``device``; unbounded elsewhere (the Triton
    interpreter)."""
    if device.type != "cuda":
        return float("inf")
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"triton": triton_version, "torch": torch.__version__.split("+")[0]}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def file_name(op: str, backend: str, device: str, dtype, version: dict) -> str:
    """One file per op, backend, device, dtype and versions; versions in the name let configs
    for an old Triton stay beside new ones instead of being overwritten or reused."""
    dtype = str(dtype).replace("torch.", "")
    return "__".join([op, backend, _slug(device), dtype, f"triton-{version['triton']}",
                      f"torch-{version['torch']}"]) + ".json"


def bucket(n: float) -> int:
    """Power-of-two bucket of a row or token count (1, 2, 4, ...)."""
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _say_once(key: str, message: str, *args, level=logging.INFO):
    if key not in _said:
        _said.add(key)
        log.log(level, message, *args)


def load_json(path: Path):
    """The JSON content of the regular file ``path``; raises OSError or ValueError."""
    # Opened without blocking, and checked on the open file: a FIFO named like a tuning file
    # would hang the op that looks it up.
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), encoding="utf-8") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise ValueError("not a regular file")
        try:
            return json.loads(file.read())
        except RecursionError:  # "[[[[..." deeper than the parser's recursion
            raise ValueError("JSON nested too deeply") from None


def read_file(path: Path, op: str, backend: str) -> dict | None:
    """The valid entries ({shape key: {bucket: config}}) of ``op``'s tuning file for
    ``backend``, or None (reported once) if it is unreadable or malformed. An entry that breaks
    the op's rules (ds_kernels/tuning_spaces.py) is reported once and left out."""
    if path not in _files:
        try:
            data = load_json(path)
            if not (isinstance(data, dict) and data.get("format") == FORMAT
                    and isinstance(data.get("entries"), dict)):
                raise ValueError(f"not a format-{FORMAT} tuning file")
            _files[path] = _valid_entries(path, op, backend, data["entries"])
        except (OSError, ValueError) as error:
            _say_once(str(path), "ds_kernels: ignoring corrupt or unreadable tuning file %s "
                      "(%s)", path, error, level=logging.WARNING)
            _files[path] = None
    return _files[path]


def bucket_problem(text) -> str | None:
    """Why ``text`` is not a stored bucket (a positive count in decimal), or None."""
    # 18 digits at most: int() refuses strings of thousands, and no count comes near 10**18.
    if not (isinstance(text, str) and re.fullmatch(r"[1-9][0-9]{0,17}", text)):
        return "a bucket must be a positive whole number of tokens, in decimal"
    return None


def _valid_entries(path, op, backend, entries) -> dict:
    valid = {}
    for shape_key, buckets in entries.items():
        if not isinstance(buckets, dict):
            _skip(path, shape_key, f"expected {{bucket: config}}, got {buckets!r:.80}")
            continue
        for n, config in buckets.items():
            problem = bucket_problem(n) or tuning_spaces.problem(op, backend, config)
            if problem:
                _skip(path, f"{shape_key} bucket {n!r:.80}", problem)
            else:
                valid.setdefault(shape_key, {})[n] = config
    return valid


def _skip(path, key, problem):
    _say_once(f"{path}:{key}", "ds_kernels: tuning file %s, %s: %s; entry not used", path, key,
              problem, level=logging.WARNING)


def forget_files():
    """Drop parsed files (after a sweep wrote new results, or in tests)."""
    _files.clear()
    _resolved.clear()
    _said.clear()


def tuned(op: str, backend: str, device: torch.device, dtype, shape_key: str,
          n: float) -> dict | None:
    """The stored config of the bucket nearest to ``n`` for ``shape_key``, or None."""
    key = (op, backend, device, dtype, shape_key)
    if key not in _resolved:
        _resolved[key] = _find(op, backend, device, dtype, shape_key)
    buckets = _resolved[key]
    if not buckets:
        return None
    nearest = min(buckets, key=lambda b: (abs(math.log2(int(b)) - math.log2(bucket(n))), int(b)))
    return buckets[nearest]


def _find(op, backend, device, dtype, shape_key) -> dict | None:
    """The {bucket: config} stored for this shape on this device and versions, if any."""
    name = device_name(device)
    wanted = file_name(op, backend, name, dtype, versions())
    listings = {folder: _names(folder) for folder in (tuning_dir(), SHIPPED_DIR)}
    for folder, names in listings.items():
        entries = read_file(folder / wanted, op, backend) if wanted in names else None
        if entries is None:
            continue
        if shape_key in entries:
            _say_once(f"{wanted}:{shape_key}", "ds_kernels.%s: tuned config from %s (%s)",
                      op, folder / wanted, shape_key)
            return entries[shape_key]
        _say_once(f"missing:{folder / wanted}:{shape_key}", "ds_kernels.%s: %s has no entry "
                  "for %s", op, folder / wanted, shape_key)
    others = wanted.split("__triton-")[0] + "__"
    for folder, names in listings.items():
        for other in names:
            if other.startswith(others) and other.endswith(".json") and other != wanted:
                _say_once(f"stale:{folder / other}", "ds_kernels.%s: %s was tuned for other "
                          "triton/torch versions and is not used; re-run `python -m autotune "
                          "sweep --op %s`", op, folder / other, op, level=logging.WARNING)
    _say_once(f"none:{wanted}:{shape_key}", "ds_kernels.%s: no tuned config for %s on %s; "
              "using the heuristic", op, shape_key, name)
    return None


def _names(folder: Path) -> list[str]:
    """The file names in a tuning folder: none if it does not exist, or (reported once) if it
    cannot be read."""
    try:
        return sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    except OSError as error:
        _say_once(f"folder:{folder}", "ds_kernels: cannot read tuning folder %s (%s); not "
                  "using it", folder, error, level=logging.WARNING)
        return []


@contextlib.contextmanager
def override(**config):
    """Use ``config`` inside the block: keys of an op's config dict (BLOCK_M, strategy, ...;
    missing keys keep the chosen config's, and those of an enclosing override). With
    ``kernel=NAME`` it applies only to the launches of that kernel of a multi-kernel op (a
    sweep of one of mla_prefill's backward kernels)."""
    previous = _override[0]
    _override[0] = {**(previous or {}), **config}
    try:
        yield
    finally:
        _override[0] = previous


def forced_config() -> dict:
    """The keys set by enclosing ``override`` blocks (empty outside them)."""
    return dict(_override[0] or {})


def config(op: str, backend: str, shape_key: str, n: float, dtype, device: torch.device,
           default: dict, *, kernel: str | None = None) -> dict:
    """``default`` (the heuristic's choice), with each of its keys taken from the tuned entry
    of ``shape_key`` at the bucket nearest ``n`` if there is one, then from an override."""
    stored = tuned(op, backend, device, dtype, shape_key, n) or {}
    forced = forced_config()
    if forced.get("kernel", kernel) != kernel:
        forced = {}
    return {key: forced.get(key, stored.get(key, value)) for key, value in default.items()}


def gemm_config(op: str, kernel: str | None, dims: dict, n: float, rows_per_expert: float,
                N: int, K: int, dtype, device: torch.device) -> dict:
    """BLOCK_M/N/K, GROUP_M, num_warps, num_stages for the grouped GEMM launches of ``op``'s
    forward (``kernel`` None) or backward ("backward")."""
    # fused_moe's forward (plain or quantised weights) loads a gate and an up tile (SwiGLU).
    b_tiles = 2 if op == "fused_moe" and not (kernel or "").endswith("backward") else 1
    shared = shared_memory_bytes(device)
    default = gemm_heuristic(bucket(rows_per_expert), N, K, dtype, shared, b_tiles)
    key = shape_key(op, kernel, **dims)
    chosen = config(op, "triton", key, n, dtype, device, default, kernel=kernel)
    # A stored config from another GPU (or a hand edit) may be valid yet need more shared
    # memory than this one has: it would fail at launch with "out of resources".
    if gemm_staged_bytes(chosen, dtype, b_tiles) > shared:
        _say_once(f"too big:{op}:{key}:{chosen}", "ds_kernels.%s: tuned config %s for %s needs "
                  "more shared memory than this device's %d bytes; using the heuristic", op,
                  chosen, key, shared, level=logging.WARNING)
        return default
    return chosen


def with_block_k(config: dict, block_k: int, dtype, b_tiles: int, device) -> dict:
    """``config`` with BLOCK_K = block_k (a kernel that needs its K tiles to be one scale
    group), dropping pipeline stages, then narrowing BLOCK_N, until it fits shared memory."""
    config = dict(config, BLOCK_K=block_k)
    shared = shared_memory_bytes(device)
    while gemm_staged_bytes(config, dtype, b_tiles) > shared:
        if config["num_stages"] > 1:
            config["num_stages"] -= 1
        elif config["BLOCK_N"] > 16:
            config["BLOCK_N"] //= 2
        else:
            break
    return config


def gemm_staged_bytes(config: dict, dtype, b_tiles: int) -> int:
    """Shared memory of a grouped GEMM's pipeline: an A tile and ``b_tiles`` B tiles a stage."""
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    return config["num_stages"] * (bm * bk + b_tiles * bk * bn) * dtype.itemsize


def gemm_heuristic(rows_bucket: int, N: int, K: int, dtype, shared_bytes: float = float("inf"),
                   b_tiles: int = 1) -> dict:
    # BLOCK_M follows the rows an expert really has: a decode step (a few rows per expert) gets
    # 16-row tiles, the smallest tl.dot takes, instead of padding each expert to 64 rows.
    block_m = 16 if rows_bucket <= 16 else 32 if rows_bucket <= 32 else 64 if rows_bucket <= 256 else 128
    wide = dtype.itemsize <= 2
    block_n = 128 if (wide and N >= 128 and block_m >= 64) else 64
    block_k = 64 if (wide or K < 64) else 32
    config = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
                  num_warps=8 if block_m * block_n >= 128 * 128 else 4,
                  num_stages=3 if block_m >= 64 else 4)
    # A GPU with less shared memory than Hopper's (~100 KB on consumer cards) gets fewer
    # stages, then narrower tiles, rather than "out of resources" at launch.
    while gemm_staged_bytes(config, dtype, b_tiles) > shared_bytes:
        if config["num_stages"] > 2:
            config["num_stages"] -= 1
        elif config["BLOCK_N"] > 32:
            config["BLOCK_N"] //= 2
        elif config["BLOCK_M"] > 16:
            config["BLOCK_M"] //= 2
        else:
            break
    return config
