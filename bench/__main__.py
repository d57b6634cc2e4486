"""python -m bench [--ops OP ...] [--device cpu|cuda] [--quick] [--out DIR]

Runs each op's benchmark, prints progress to stderr and the table to stdout, and writes
results.json, results.md and <op>.png (time and speedup vs T, log-log) to DIR. The machine's
load is sampled through the run; rows timed while other processes used the CPU, or with a wide
spread, are flagged noisy in all three (see bench/harness.py: flag_noisy).
"""

import argparse
import importlib
import os
from pathlib import Path

import torch

from bench import harness

# op -> module whose run(device, quick) returns its rows; a new benchmark is one more line.
BENCHMARKS = {
    "route": "bench.bench_route",
    "moe_align": "bench.bench_moe_align",
    "fused_moe": "bench.bench_fused_moe",
    "grouped_mm": "bench.bench_grouped_mm",
    "norm_rope": "bench.bench_norm_rope",
    "mla_decode": "bench.bench_mla_decode",
    "mla_prefill": "bench.bench_mla_prefill",
    "quant_linear": "bench.bench_quant_linear",
    "model": "bench.bench_model",
    "expert_parallel": "bench.bench_expert_parallel",
    "lightning_indexer": "bench.bench_lightning_indexer",
    "sparse_mla": "bench.bench_sparse_mla",
    "speculative": "bench.bench_speculative",
    "mhc": "bench.bench_mhc",
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer shapes, no CPU torch.compile")
    parser.add_argument("--out", type=Path, help="default: bench/results/latest-<device>")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if os.environ.get("DS_KERNELS_BACKEND"):
        # The "ds_kernels" rows are meant to be what users get by default; each benchmark forces
        # other backends itself, for its own rows only.
        parser.error("unset DS_KERNELS_BACKEND: it would override ds_kernels' default backend")
    device = torch.device(args.device)
    out = args.out or Path(__file__).parent / "results" / f"latest-{device.type}"

    machine = harness.machine_info(device)  # before our own load shows in its load average
    rows = []
    with harness.LoadSampler() as load:
        for op in args.ops:
            rows += importlib.import_module(BENCHMARKS[op]).run(device, args.quick)
    harness.add_speedups(rows)
    harness.flag_noisy(rows)
    harness.write_results(rows, out, "results", machine, load.summary())
    for op in args.ops:  # a benchmark's PLOT_X: the shape entry its curves run along
        harness.plot([r for r in rows if r.op == op], out / f"{op}.png",
                     getattr(importlib.import_module(BENCHMARKS[op]), "PLOT_X", None))
    print(harness.format_table(rows))
    print(harness.describe_load(rows, load.summary()))


if __name__ == "__main__":
    main()
