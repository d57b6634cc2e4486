"""expert_parallel: one DeepSeek-V3-shaped MoE layer (ds_kernels.MoE, reduced H, I and E) with
its experts sharded over W gloo ranks on this CPU, W in 1, 2, 4, against the unsharded layer in
one process. A simulation of the pattern, not of a cluster: the ranks share this machine's cores
(one thread each) and talk over loopback TCP, not NVLink or InfiniBand.

Each rank routes its own T tokens (uniformly random routers: every expert about equally
loaded). A row per W: the slowest rank's median forward time (the layer waits for it), tokens/s
of all ranks together (W * T over that time), and in its notes the share of that time spent in
the all-to-alls and the bytes a token sends to other ranks per layer, beside the analytic figure:
each of its k assignments leaves its rank with probability (W - 1) / W, as H values there
(dispatch) and back (combine), plus an 8-byte expert index - DeepSeek-V3: 8 x 7168 x 2 bytes
each way in bf16. The ranks are processes of their own: the run's load line counts them as
other processes.
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench.harness import Row, format_shape
from ds_kernels import MoE, ranks

OP = "expert_parallel"
# DeepSeek-V3's layer (H=7168, I=2048, E=256, k=8 of 8 groups, top 4 groups) at reduced H, I, E.
SHAPE = dict(H=1024, I=256, E=32, k=8, n_group=8, topk_group=4)
WORLDS = (1, 2, 4)
TOKENS = ((64, 256, 1024), (256,))  # per rank: (full, quick)
REPS = 10


def run(device: torch.device, quick: bool) -> list[Row]:
    if device.type != "cpu":
        print(f"[{OP}] SKIPPED on {device.type}: this benchmark simulates expert parallelism "
              "with gloo ranks on the CPU; multi-GPU runs are untested", file=sys.stderr)
        return []
    rows = []
    for T in TOKENS[quick]:
        single = None
        for world in (0, *WORLDS):  # 0: the unsharded layer, one process
            with tempfile.TemporaryDirectory() as folder:
                # The ranks are spawned: they get the shape and counts as arguments.
                stats = ranks.run(max(world, 1), _rank, T, world > 0, SHAPE, REPS,
                                  tmp_path=Path(folder))
            row = _row(T, world, stats)
            # W ranks serve W x T tokens: compare throughput, not time.
            single = single or row
            row.notes["tokens/s vs one process"] = f"{row.tokens_per_s / single.tokens_per_s:.2f}x"
            print(f"[{OP}] {format_shape(row.shape)} {row.impl} {row.median_us:.1f} us "
                  f"{row.notes}", file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def _layer(sharded: bool, s: dict) -> MoE:
    moe = MoE(s["H"], s["I"], s["E"], s["k"], n_group=s["n_group"], topk_group=s["topk_group"],
              ep_group=dist.group.WORLD if sharded else None)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(moe.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return moe


def _rank(rank: int, world: int, T: int, sharded: bool, shape: dict, reps: int) -> dict:
    """Timings of one rank: per forward, its seconds, those inside the all-to-alls, and the
    bytes it sent to other ranks."""
    moe = _layer(sharded, shape)
    x = torch.randn(T, shape["H"], generator=torch.Generator().manual_seed(1 + rank))
    spent = {"comm_s": 0.0, "bytes": 0}
    if sharded:
        _count_all_to_alls(rank, spent)
    times, comm, sent = [], [], []
    with torch.no_grad():
        for rep in range(reps + 2):  # two warm-up calls
            dist.barrier()
            spent.update(comm_s=0.0, bytes=0)
            start = time.perf_counter()
            moe(x)
            if rep >= 2:
                times.append(time.perf_counter() - start)
                comm.append(spent["comm_s"])
                sent.append(spent["bytes"])
    return dict(seconds=statistics.median(times), p20=statistics.quantiles(times, n=5)[0],
                p80=statistics.quantiles(times, n=5)[3], comm_s=statistics.median(comm),
                bytes=statistics.median(sent), tokens=T)


def _count_all_to_alls(rank, spent):
    """Time every all_to_all_single of ds_kernels.expert_parallel and count the bytes it sends
    to other ranks (the row exchanges go through torch.distributed.nn.functional's)."""
    from ds_kernels import expert_parallel

    def wrap(collective, output_arg, input_arg, splits_arg):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = collective(*args, **kwargs)
            spent["comm_s"] += time.perf_counter() - start
            tensor = args[input_arg]
            splits = args[splits_arg] if len(args) > splits_arg else None
            rows = tensor.shape[0]
            per_row = tensor[0].numel() * tensor.element_size() if rows else 0
            if splits is None:  # even split: one row a rank
                splits = [rows // dist.get_world_size()] * dist.get_world_size()
            spent["bytes"] += (sum(splits) - splits[rank]) * per_row
            return result
        return timed

    # (output, input, output_split_sizes, input_split_sizes): input at 1, its splits at 3.
    expert_parallel.dist = _Patched(dist, all_to_all_single=wrap(dist.all_to_all_single, 0, 1, 3))
    expert_parallel._exchange = wrap(expert_parallel._exchange, 0, 1, 3)


class _Patched:
    """A module with some functions replaced (this rank's process only)."""

    def __init__(self, module, **replaced):
        self._module, self._replaced = module, replaced

    def __getattr__(self, name):
        return self._replaced.get(name) or getattr(self._module, name)


def _row(T, world, stats) -> Row:
    slowest = max(stats, key=lambda s: s["seconds"])
    W = max(world, 1)
    s = SHAPE
    shape = dict(T=T, H=s["H"], I=s["I"], E=s["E"], k=s["k"], W=W)
    notes = {}
    if world:
        sent = statistics.mean(st["bytes"] for st in stats) / T
        analytic = s["k"] * (W - 1) / W * (2 * s["H"] * 4 + 8)  # fp32 rows, int64 index
        notes = {"comm": f"{slowest['comm_s'] / slowest['seconds']:.0%}",
                 "sent/token": f"{sent / 1024:.1f} KiB", "analytic": f"{analytic / 1024:.1f} KiB"}
    return Row(op=OP, impl=f"ep W={W}" if world else "MoE (one process)", shape=shape,
               dtype="float32", device="cpu", median_us=slowest["seconds"] * 1e6,
               p20_us=slowest["p20"] * 1e6, p80_us=slowest["p80"] * 1e6,
               tokens_per_s=W * T / slowest["seconds"], notes=notes)
