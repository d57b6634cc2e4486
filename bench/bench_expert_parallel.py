"""expert_parallel: one DeepSeek-V3-shaped MoE layer (ds_kernels.MoE, reduced H, I and E), and
the tiny model's generate, with the experts sharded over W gloo ranks on this CPU, W in 1, 2, 4,
against the unsharded layer (model) in one process. A simulation of the pattern, not of a
cluster: the ranks share this machine's cores (one thread each) and talk over loopback TCP, not
NVLink or InfiniBand.

The layer: each rank routes its own T tokens (uniformly random routers: every expert about
equally loaded). Rows per W, one per wire format (native fp32 rows, FP8 rows): the slowest
rank's median forward time (the layer waits for it), tokens/s of all ranks together (W * T over
that time), and in its notes the share of that time spent in the all-to-alls (the count
exchange, and waiting for the rows: the shared expert runs while they travel), that spent
encoding and decoding FP8 rows (quantisation, on this CPU), and the bytes a
token sends to other ranks per layer, dispatch and combine apart, beside the analytic figures:
each of its k assignments leaves its rank with probability (W - 1) / W, as one wire-format row
and an 8-byte expert index there, and H fp32 values back - DeepSeek-V3: 8 x 7168 x 2 bytes
each way in bf16. The native row's notes also hold the same layer run without the overlap (the
routed experts, then the shared expert) and the shared expert alone: what the overlap saves.

The model: the tiny preset's generate on each rank's own prompts (prefill and greedy decode),
tokens/s of all ranks together and the share of time in the all-to-alls.

The ranks are processes of their own: the run's load line counts them as other processes.
"""

import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench.harness import Row, format_shape
from ds_kernels import MoE, ranks
from ds_kernels.expert_wire import WIRES

OP = "expert_parallel"
# DeepSeek-V3's layer (H=7168, I=2048, E=256, k=8 of 8 groups, top 4 groups) at reduced H, I, E.
SHAPE = dict(H=1024, I=256, E=32, k=8, n_group=8, topk_group=4)
WORLDS = (1, 2, 4)
TOKENS = ((64, 256, 1024), (256,))  # per rank: (full, quick)
REPS = 10
# The tiny model: each rank's prompts, and the tokens each gets.
MODEL = dict(preset="tiny", batch=4, prompt_len=32, new_tokens=16)
MODEL_REPS = 3
PLOT_X = "W"  # bench/__main__.py: time against the world size, a curve per impl and T


def run(device: torch.device, quick: bool) -> list[Row]:
    if device.type != "cpu":
        print(f"[{OP}] SKIPPED on {device.type}: this benchmark simulates expert parallelism "
              "with gloo ranks on the CPU; multi-GPU runs are untested", file=sys.stderr)
        return []
    rows = []
    for T in TOKENS[quick]:
        rows += _series(_layer_rank, (T, SHAPE, REPS), lambda world, stats: _layer_rows(
            T, world, stats))
    rows += _series(_model_rank, (MODEL, MODEL_REPS), _model_rows)
    return rows


def _series(rank_fn, args, to_rows) -> list[Row]:
    """The unsharded run (one process), then W ranks for each W; throughput against the first."""
    rows, single = [], None
    for world in (0, *WORLDS):  # 0: unsharded, one process
        with tempfile.TemporaryDirectory() as folder:
            # The ranks are spawned: they get the shape and counts as arguments.
            stats = ranks.run(max(world, 1), rank_fn, world > 0, *args, tmp_path=Path(folder))
        for row in to_rows(world, stats):
            single = single or row
            row.notes["tokens/s vs one process"] = f"{row.tokens_per_s / single.tokens_per_s:.2f}x"
            print(f"[{OP}] {format_shape(row.shape)} {row.impl} {row.median_us:.1f} us "
                  f"{row.notes}", file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def _layer(s: dict, **ep) -> MoE:
    moe = MoE(s["H"], s["I"], s["E"], s["k"], n_group=s["n_group"], topk_group=s["topk_group"],
              **ep)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(moe.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return moe


def _layer_rank(rank: int, world: int, sharded: bool, T: int, shape: dict, reps: int) -> dict:
    """This rank's timings of the layer: for each variant (a wire format; "no overlap"; the
    shared expert alone), per forward: its seconds, those in the all-to-alls, the bytes it
    sent to other ranks (dispatch, combine)."""
    x = torch.randn(T, shape["H"], generator=torch.Generator().manual_seed(1 + rank))
    if not sharded:
        moe = _layer(shape)
        return _timed({"native": lambda: moe(x)}, reps, rank, sharded)
    layers = {wire: _layer(shape, ep_group=dist.group.WORLD, ep_wire=wire) for wire in WIRES}
    native = layers["native"]

    def serial():
        weights, ids = native.gate(x)
        return native.experts(x, ids, weights) + native.shared_experts(x)

    variants = {wire: (lambda m=m: m(x)) for wire, m in layers.items()}
    variants.update({"no overlap": serial, "shared expert": lambda: native.shared_experts(x)})
    return _timed(variants, reps, rank, sharded)


def _model_rank(rank: int, world: int, sharded: bool, spec: dict, reps: int) -> dict:
    """This rank's timings of the tiny model's generate on its own prompts."""
    from ds_model import DeepSeekForCausalLM, ModelConfig

    config = ModelConfig.preset(spec["preset"])
    model = DeepSeekForCausalLM(config, ep_group=dist.group.WORLD if sharded else None)
    model.init_weights(generator=torch.Generator().manual_seed(0)).eval()
    g = torch.Generator().manual_seed(1 + rank)
    prompts = torch.randint(config.vocab_size, (spec["batch"], spec["prompt_len"]), generator=g)
    return _timed({"native": lambda: model.generate(prompts, spec["new_tokens"],
                                                    eos_token_id=[])}, reps, rank, sharded)


def _timed(variants: dict, reps: int, rank: int, sharded: bool) -> dict:
    """Median seconds (p20, p80), seconds in the all-to-alls and bytes sent of each variant,
    the variants interleaved rep by rep (all ranks in step: a barrier before each call)."""
    spent = dict(comm_s=0.0, codec_s=0.0, dispatch=0, combine=0)
    if sharded:
        _count_exchanges(rank, spent)
    samples = {name: [] for name in variants}
    with torch.no_grad():
        for rep in range(reps + 2):  # two warm-up calls
            for name, fn in variants.items():
                dist.barrier()
                spent.update(comm_s=0.0, codec_s=0.0, dispatch=0, combine=0)
                start = time.perf_counter()
                fn()
                if rep >= 2:
                    samples[name].append((time.perf_counter() - start, dict(spent)))
    stats = {}
    for name, runs in samples.items():
        times = [t for t, _ in runs]
        stats[name] = dict(seconds=statistics.median(times),
                           p20=statistics.quantiles(times, n=5)[0],
                           p80=statistics.quantiles(times, n=5)[3],
                           **{k: statistics.median(s[k] for _, s in runs) for k in spent})
    return stats


def _count_exchanges(rank, spent):
    """Time every all-to-all of ds_kernels.expert_parallel (the count exchange; starting and
    waiting for row transfers, less their wire format's encoding and decoding: codec_s) and
    count the bytes each row transfer sends to other ranks (this process only)."""
    from ds_kernels import expert_parallel

    class Counted(expert_parallel._Transfer):
        def __init__(self, wire, rows, extra, send_sizes, recv_sizes, group):
            start = time.perf_counter()
            super().__init__(_TimedWire(wire, spent), rows, extra, send_sizes, recv_sizes,
                             group)
            spent["comm_s"] += time.perf_counter() - start
            off_rank = sum(send_sizes) - send_sizes[rank]
            row_bytes = sum(math.prod(p.shape[1:]) * p.element_size() for p in self.received)
            spent["dispatch" if extra else "combine"] += off_rank * row_bytes

        def rows(self, dtype):
            start = time.perf_counter()
            got = super().rows(dtype)
            spent["comm_s"] += time.perf_counter() - start
            return got

    def counts(*args, **kwargs):  # the only synchronous all_to_all_single
        start = time.perf_counter()
        result = dist.all_to_all_single(*args, **kwargs)
        spent["comm_s"] += time.perf_counter() - start
        return result

    expert_parallel._Transfer = Counted
    expert_parallel.dist = _Patched(dist, all_to_all_single=counts)


class _TimedWire:
    """A wire format whose encoding and decoding add their seconds to spent["codec_s"] and
    not to spent["comm_s"]."""

    def __init__(self, wire, spent):
        self.wire, self.spent, self.name = wire, spent, wire.name

    def _timed(self, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        seconds = time.perf_counter() - start
        self.spent["codec_s"] += seconds
        self.spent["comm_s"] -= seconds
        return result

    def encode(self, rows):
        return self._timed(self.wire.encode, rows)

    def decode(self, parts, dtype):
        return self._timed(self.wire.decode, parts, dtype)


class _Patched:
    """A module with some functions replaced (this rank's process only)."""

    def __init__(self, module, **replaced):
        self._module, self._replaced = module, replaced

    def __getattr__(self, name):
        return self._replaced.get(name) or getattr(self._module, name)


def _slowest(stats, variant):
    return max((s[variant] for s in stats), key=lambda s: s["seconds"])


def _row(impl, shape, slowest, tokens, notes, baseline=None) -> Row:
    return Row(op=OP, impl=impl, shape=shape, dtype="float32", device="cpu",
               median_us=slowest["seconds"] * 1e6, p20_us=slowest["p20"] * 1e6,
               p80_us=slowest["p80"] * 1e6, tokens_per_s=tokens / slowest["seconds"],
               notes=notes, baseline=baseline)


def _kib(n: float) -> str:
    return f"{n / 1024:.2f} KiB"


def _layer_rows(T, world, stats) -> list[Row]:
    W, s = max(world, 1), SHAPE
    shape = dict(T=T, H=s["H"], I=s["I"], E=s["E"], k=s["k"], W=W)
    if not world:
        return [_row("MoE (one process)", shape, _slowest(stats, "native"), T, {})]
    leaving = s["k"] * (W - 1) / W  # assignments a token sends off its rank
    rows = []
    for wire in WIRES:
        slowest = _slowest(stats, wire)
        notes = {"comm": f"{slowest['comm_s'] / slowest['seconds']:.0%}"}
        if wire != "native":
            notes["encode+decode"] = f"{slowest['codec_s'] / slowest['seconds']:.0%}"
        for way, analytic in (("dispatch", WIRES[wire].row_bytes(s["H"], torch.float32) + 8),
                              ("combine", 4 * s["H"])):
            sent = statistics.mean(st[wire][way] for st in stats) / T
            notes[f"{way}/token"] = f"{_kib(sent)} (analytic {_kib(leaving * analytic)})"
        if wire == "native":
            serial, shared = _slowest(stats, "no overlap"), _slowest(stats, "shared expert")
            notes.update({"no overlap": f"{serial['seconds'] * 1e6:.0f} us",
                          "shared expert": f"{shared['seconds'] * 1e6:.0f} us",
                          "overlap saves": f"{(serial['seconds'] - slowest['seconds']) * 1e6:.0f}"
                                           " us"})
        rows.append(_row(f"ep {wire}", shape, slowest, W * T, notes,
                         baseline=None if wire == "native" else "ep native"))
    return rows


def _model_rows(world, stats) -> list[Row]:
    W, m = max(world, 1), MODEL
    shape = dict(model=m["preset"], batch=m["batch"], prompt=m["prompt_len"],
                 new=m["new_tokens"], W=W)
    slowest = _slowest(stats, "native")
    notes = {"comm": f"{slowest['comm_s'] / slowest['seconds']:.0%}"} if world else {}
    impl = f"{m['preset']} model " + ("ep" if world else "(one process)")
    return [_row(impl, shape, slowest, W * m["batch"] * m["new_tokens"], notes)]
