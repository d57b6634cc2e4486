"""Import vLLM's tuned fused_moe files ("E=256,N=256,device_name=NVIDIA_H200.json", one entry
per batch size: BLOCK_SIZE_M/N/K, GROUP_SIZE_M, num_warps, num_stages) as ds_kernels tuning
files. vLLM's N is the expert intermediate size (per tensor-parallel shard); its files do not
record the hidden size, top-k or Triton version, so the importer is told them."""

import re
from pathlib import Path

from autotune import store
from ds_kernels import tuning, tuning_spaces

_NAME = re.compile(r"E=(?P<E>\d+),N=(?P<N>\d+),device_name=(?P<device>[^,]+?)(,dtype=(?P<dtype>[^,]+?))?"
                   r"(,block_shape=\[.*\])?\.json$")
_KEYS = {"BLOCK_SIZE_M": "BLOCK_M", "BLOCK_SIZE_N": "BLOCK_N", "BLOCK_SIZE_K": "BLOCK_K",
         "GROUP_SIZE_M": "GROUP_M", "num_warps": "num_warps", "num_stages": "num_stages"}


def parse(path: Path) -> tuple[dict, dict[str, dict]]:
    """(what the file name says, {batch size: our config}) of one vLLM file."""
    match = _NAME.search(path.name)
    if match is None:
        raise ValueError(f"{path.name}: not a vLLM fused_moe config name (E=..,N=..,device_name=...json)")
    if match["dtype"]:
        raise ValueError(f"{path.name}: dtype={match['dtype']} configs are for quantized "
                         "weights, which ds_kernels' fused_moe does not run")
    table = tuning.load_json(path)
    if not isinstance(table, dict):
        raise ValueError(f"{path.name}: expected {{batch size: config}}, got {table!r:.80}")
    configs = {}
    for batch, entry in table.items():
        missing = set(_KEYS) - set(entry if isinstance(entry, dict) else ())
        if missing:
            raise ValueError(f"{path.name}: batch size {batch} lacks {sorted(missing)}")
        config = {ours: entry[theirs] for theirs, ours in _KEYS.items()}
        # Checked as ds_kernels will check it when reading, so nothing unusable is written.
        problem = tuning.bucket_problem(batch) or tuning_spaces.problem("fused_moe", "triton",
                                                                        config)
        if problem:
            raise ValueError(f"{path.name}: batch size {batch}: {problem}")
        configs[batch] = config
    return dict(E=int(match["E"]), I=int(match["N"]), device=match["device"]), configs


def import_file(path: Path, *, hidden_size: int, top_k: int, dtype, out_dir: Path) -> Path:
    meta, configs = parse(path)
    key = f"E={meta['E']},I={meta['I']},H={hidden_size},k={top_k}"
    device = meta["device"].replace("_", " ")
    return store.write(out_dir, "fused_moe", "triton", device, dtype, tuning.versions(),
                       {key: configs}, source=f"imported from vLLM file {path.name}")
