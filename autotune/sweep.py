"""The sweep: for each shape and token bucket, check every candidate against the reference,
time the correct ones, and store the fastest."""

import statistics
import sys
import time
from pathlib import Path

import torch

import ds_kernels
from autotune import cases, store
from ds_kernels import testing, tuning

# A candidate is stored only if it beats the heuristic by more than this fraction, in medians
# over CONFIRM_PAIRS more alternated timings of both: a "win" within noise (6% between two
# timings of one config was seen on a 2-core CPU) could as well be a loss on the next run.
MIN_GAIN = 0.02
CONFIRM_PAIRS = 3


def time_once(fn, device) -> float:
    """Median seconds of ``fn``: triton's do_bench on a GPU, repeated perf_counter on CPU."""
    if device.type == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=5, rep=40) * 1e-3
    fn()
    samples, spent = [], 0.0
    while len(samples) < 5 or (spent < 0.3 and len(samples) < 50):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
        spent += samples[-1]
    return statistics.median(samples)


def progress(done: int, total: int, label: str):
    width = 30
    filled = width * done // max(total, 1)
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label[:100]:<100}",
          end="" if done < total else "\n", file=sys.stderr, flush=True)


def sweep(op: str, device: torch.device, dtype, *, shapes=None, buckets=None, quick=False,
          routing=None, out_dir: Path | None = None, backend: str | None = None) -> list[dict]:
    """Tune ``op``; returns one summary row per (shape, bucket, kernel) and writes the tuning
    file. ``backend`` defaults to the device's (triton on a GPU; the tests also sweep the
    Triton kernels in the interpreter)."""
    backend = backend or ("triton" if device.type == "cuda" else "torch")
    shapes = shapes or cases.SHAPES[op][device.type]
    buckets = buckets or cases.BUCKETS[op][device.type][1 if quick else 0]
    summary, entries = [], {}
    for shape in shapes:
        for case in (c for n in buckets for c in cases.make_cases(
                op, shape, n, backend, device, dtype, quick=quick, routing=routing)):
            n = case.bucket
            only = {"kernel": case.kernel} if case.kernel else {}
            best, rejected = None, []
            with ds_kernels.use_backend(backend):
                default = time_once(case.run, device)
                for i, candidate in enumerate(case.candidates):
                    progress(i, len(case.candidates), f"{case.shape_key} n={n} "
                             + ",".join(f"{k}={v}" for k, v in candidate.items()))
                    with tuning.override(**candidate, **only):
                        try:
                            out = case.run()
                        except Exception as error:  # noqa: BLE001 - a failing candidate is data
                            rejected.append((candidate, f"{type(error).__name__}: {error}"[:200]))
                            continue
                        problem = testing.mismatches(out, case.expected, dtype, case.reduction)
                        if problem:
                            rejected.append((candidate, f"wrong answer: {problem}"[:200]))
                            continue
                        seconds = time_once(case.run, device)
                    if best is None or seconds < best[1]:
                        best = (candidate, seconds)
                progress(len(case.candidates), len(case.candidates), f"{op} {case.shape_key} n={n}")
            for candidate, why in rejected:
                print(f"  rejected {candidate}: {why}", file=sys.stderr)
            row = dict(op=op, shape=case.shape_key, bucket=n, candidates=len(case.candidates),
                       rejected=len(rejected), default_us=default * 1e6)
            if best is not None and best[1] * (1 + MIN_GAIN) <= default:
                default, seconds = _confirm(case, best, default, device, only)
                best = (best[0], seconds)
            if best is not None:
                if best[1] * (1 + MIN_GAIN) > default:  # {}: the heuristic stays
                    best = ({}, default)
                entries.setdefault(case.shape_key, {})[str(n)] = best[0]
                row.update(best=best[0], best_us=best[1] * 1e6, speedup=default / best[1])
            summary.append(row)
    if entries:
        path = store.write(out_dir or tuning.tuning_dir(), op, backend,
                           tuning.device_name(device), dtype, tuning.versions(), entries,
                           source="python -m autotune sweep")
        print(f"autotune: wrote {path}", file=sys.stderr)
    return summary


def _confirm(case, best, default, device, only) -> tuple[float, float]:
    """Medians of the heuristic's and the best candidate's timings, each with CONFIRM_PAIRS
    more taken alternately, so that both see the same machine load."""
    defaults, bests = [default], [best[1]]
    for _ in range(CONFIRM_PAIRS):
        defaults.append(time_once(case.run, device))
        with tuning.override(**best[0], **only):
            bests.append(time_once(case.run, device))
    return statistics.median(defaults), statistics.median(bests)


def format_summary(rows: list[dict]) -> str:
    lines = ["| op | shape | bucket | candidates | rejected | default us | best us | speedup | best |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        start = (f"| {r['op']} | {r['shape']} | {r['bucket']} | {r['candidates']} | "
                 f"{r['rejected']} | {r['default_us']:.1f} | ")
        if "best" not in r:
            lines.append(start + "- | - | none correct, heuristic kept |")
        else:
            best = r["best"] or "none faster, heuristic kept"
            lines.append(start + f"{r['best_us']:.1f} | {r['speedup']:.2f}x | {best} |")
    return "\n".join(lines)
