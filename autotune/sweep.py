"""The sweep: for each shape, token bucket and kernel, check the heuristic and every candidate
against the reference, time the correct ones, and store the fastest if it clearly beats the
heuristic (confirmed by alternated timings), else {} (keep the heuristic). A wrong candidate
is reported and never stored; a wrong heuristic is reported and replaced."""

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
          backward=False, routing=None, out_dir: Path | None = None,
          backend: str | None = None) -> list[dict]:
    """Tune ``op`` (and with ``backward`` its backward kernels); returns one summary row per
    (shape, bucket, kernel) and writes the tuning file. ``backend`` defaults to the device's
    (triton on a GPU; the tests also sweep the Triton kernels in the interpreter)."""
    backend = backend or ("triton" if device.type == "cuda" else "torch")
    shapes = shapes or cases.SHAPES[op][device.type]
    buckets = buckets or cases.BUCKETS[op][device.type][1 if quick else 0]
    summary, entries = [], {}
    for shape in shapes:
        for n in buckets:
            for case in cases.make_cases(op, shape, n, backend, device, dtype, quick=quick,
                                         backward=backward, routing=routing):
                with ds_kernels.use_backend(backend):
                    row = _tune(case, device, dtype)
                if "best" in row:
                    entries.setdefault(case.shape_key, {})[str(n)] = row["best"]
                summary.append(row)
    if entries:
        path = store.write(out_dir or tuning.tuning_dir(), op, backend,
                           tuning.device_name(device), dtype, tuning.versions(), entries,
                           source="python -m autotune sweep")
        print(f"autotune: wrote {path}", file=sys.stderr)
        _report_lookup(op, backend, device, dtype, entries, path.parent)
    return summary


def _report_lookup(op, backend, device, dtype, entries, folder):
    """Say whether ds_kernels now finds what was written (the op's own run-time lookup)."""
    if folder.resolve() not in (tuning.tuning_dir().resolve(), tuning.SHIPPED_DIR.resolve()):
        print(f"autotune: ds_kernels reads {tuning.tuning_dir()}, not {folder}: set "
              f"DS_KERNELS_TUNING_DIR={folder} to use these results", file=sys.stderr)
        return
    found = sum(tuning.tuned(op, backend, device, dtype, key, int(n)) == config
                for key, buckets in entries.items() for n, config in buckets.items())
    total = sum(len(buckets) for buckets in entries.values())
    print(f"autotune: ds_kernels.{op} now finds {found} of {total} entries written "
          "({} = the heuristic kept)", file=sys.stderr)


def _tune(case, device, dtype) -> dict:
    """The summary row of one case; its "best" (absent if no candidate is correct) is the
    config to store: {} keeps the heuristic."""
    label = f"{case.shape_key} n={case.bucket}"
    only = {"kernel": case.kernel} if case.kernel else {}
    # The heuristic is checked too: a wrong default is a bug, whatever the sweep finds.
    heuristic_problem = _problem(case, dtype)
    if heuristic_problem:
        print(f"  THE HEURISTIC IS WRONG at {label}: {heuristic_problem}", file=sys.stderr)
    default = time_once(case.run, device)
    best, rejected = None, []
    for i, candidate in enumerate(case.candidates):
        progress(i, len(case.candidates),
                 f"{label} " + ",".join(f"{k}={v}" for k, v in candidate.items()))
        with tuning.override(**candidate, **only):
            problem = _problem(case, dtype)
            if problem:
                rejected.append((candidate, problem))
                continue
            seconds = time_once(case.run, device)
        if best is None or seconds < best[1]:
            best = (candidate, seconds)
    progress(len(case.candidates), len(case.candidates), f"{case.op} {label}")
    for candidate, why in rejected:
        print(f"  rejected {candidate}: {why}", file=sys.stderr)
    # A wrong heuristic is replaced by the fastest correct candidate, however slow.
    if best is not None and not heuristic_problem:
        if best[1] * (1 + MIN_GAIN) <= default:
            default, seconds = _confirm(case, best, default, device, only)
            best = (best[0], seconds)
        if best[1] * (1 + MIN_GAIN) > default:  # {}: the heuristic stays
            best = ({}, default)
    row = dict(op=case.op, shape=case.shape_key, bucket=case.bucket,
               candidates=len(case.candidates), rejected=len(rejected),
               heuristic_ok=not heuristic_problem, default_us=default * 1e6)
    if best is not None:
        row.update(best=best[0], best_us=best[1] * 1e6, speedup=default / best[1])
    return row


def _problem(case, dtype) -> str | None:
    """Why the op's output (under the current override) is not the reference's, or None."""
    try:
        out = case.run()
    except Exception as error:  # noqa: BLE001 - a failing candidate is data
        return f"{type(error).__name__}: {error}"[:200]
    problem = testing.mismatches(out, case.expected, dtype, case.reduction)
    return f"wrong answer: {problem}"[:200] if problem else None


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
    lines = ["| op | shape | bucket | candidates | rejected | heuristic | heuristic us | best us "
             "| speedup | best |", "|---|---|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        start = (f"| {r['op']} | {r['shape']} | {r['bucket']} | {r['candidates']} | "
                 f"{r['rejected']} | {'ok' if r['heuristic_ok'] else 'WRONG'} | "
                 f"{r['default_us']:.1f} | ")
        if "best" not in r:
            lines.append(start + "- | - | none correct, heuristic kept |")
        else:
            best = r["best"] or "none faster, heuristic kept"
            lines.append(start + f"{r['best_us']:.1f} | {r['speedup']:.2f}x | {best} |")
    return "\n".join(lines)
