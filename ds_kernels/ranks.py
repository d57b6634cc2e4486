"""Running a function on W gloo ranks (CPU processes on this machine), bounded in time: how the
tests and the expert-parallel bench simulate a multi-rank job without a cluster.

Each rank runs ``fn(rank, world, *args)`` (a module-level function: ranks are spawned) inside
an initialised process group, single-threaded, and its result (or the text of its exception)
comes back through a file; a rank that fails, or has not finished by the deadline, ends the
run at once and all ranks are killed: a hang is an error, never a stuck CI.
"""

import datetime
import socket
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 120


class RankFailed(Exception):
    """A rank raised: its message names the rank and holds its traceback."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir, fn, args, group_timeout_s):
    torch.set_num_threads(1)  # W ranks share the CI machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world,
                            timeout=datetime.timedelta(seconds=group_timeout_s))
    path = Path(out_dir) / f"rank{rank}.pt"
    try:
        result = fn(rank, world, *args)
        torch.save({"ok": result}, path)
    except Exception:  # noqa: BLE001 - the test reads it
        torch.save({"error": traceback.format_exc()}, path)
    finally:
        dist.destroy_process_group()


def run(world: int, fn, *args, tmp_path: Path, timeout_s: float = TIMEOUT_S,
        group_timeout_s: float = TIMEOUT_S) -> list:
    """[fn's result on each rank]; raises RankFailed with the first failing rank's traceback
    as soon as one fails (the others, which may wait on it in a collective, are killed).
    tmp_path: a folder for the ranks' result files. group_timeout_s: the process group's own
    timeout (how long a collective waits for a missing rank)."""
    context = mp.start_processes(_worker, args=(world, _free_port(), str(tmp_path), fn, args,
                                                group_timeout_s),
                                 nprocs=world, join=False, start_method="spawn")
    paths = [tmp_path / f"rank{r}.pt" for r in range(world)]
    waited = 0.0
    try:
        while not context.join(timeout=0.5):
            failed = [(r, res) for r, res in enumerate(map(_result, paths)) if "error" in res]
            if failed:
                rank, result = failed[0]
                raise RankFailed(f"rank {rank} of {world}:\n{result['error']}")
            waited += 0.5
            if waited >= timeout_s:
                raise TimeoutError(f"{world} ranks did not finish within {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    results = [_result(p) for p in paths]
    for r, result in enumerate(results):
        if "error" in result:
            raise RankFailed(f"rank {r} of {world}:\n{result['error']}")
    return [result["ok"] for result in results]


def _result(path: Path) -> dict:
    """A rank's saved result; {} while it has not written it (or is writing it)."""
    try:
        return torch.load(path, weights_only=False)
    except (FileNotFoundError, RuntimeError, EOFError):
        return {}
