"""The sweep: for each shape, token bucket and kernel, check the heuristic and every candidate
against the reference, time the correct ones, and store the fastest if it clearly beats the
heuristic (again in each of several steady re-timings of both), else {} (keep the heuristic).
A wrong candidate is reported and never stored; a wrong heuristic is reported and replaced.
Unsteady timings (samples spread wide) are taken again and reported, with the machine's load
when it is busy."""

import os
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

import ds_kernels
from autotune import cases, store
from ds_kernels import testing, tuning

# A candidate is stored only if it beats the heuristic by more than this fraction in each of
# CONFIRM_PAIRS more timings of both, taken alternately: a "win" within noise (6% between two
# timings of one config was seen on a 2-core CPU) could as well be a loss on the next run, and
# one taken while the machine was busy (a 1331x "win" of 1 ms over a heuristic timed at 1.4 s
# was stored once) would not repeat.
MIN_GAIN = 0.02
CONFIRM_PAIRS = 3
# A timing whose samples spread wider than this (80th over 20th percentile) saw other work on
# the machine; quiet 2-core CPU timings stayed within 1.35. It is taken again, up to RETRIES
# more times, and a win confirmed only by such timings is not stored.
MAX_SPREAD = 1.5
RETRIES = 2


class Timing(NamedTuple):
    seconds: float  # median
    spread: float  # 80th over 20th percentile of the samples

    @property
    def steady(self) -> bool:
        return self.spread <= MAX_SPREAD


def time_once(fn, device) -> Timing:
    """``fn``'s timing: triton's do_bench on a GPU, repeated perf_counter on CPU."""
    if device.type == "cuda":
        import triton

        median, low, high = triton.testing.do_bench(fn, warmup=5, rep=40,
                                                    quantiles=[0.5, 0.2, 0.8])
        return Timing(median * 1e-3, high / low)
    fn()
    samples, spent = [], 0.0
    while len(samples) < 5 or (spent < 0.3 and len(samples) < 50):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
        spent += samples[-1]
    quintiles = statistics.quantiles(samples, n=5)
    return Timing(statistics.median(samples), quintiles[3] / quintiles[0])


def measure(fn, device) -> Timing:
    """``fn``'s timing, taken again while it is not steady (RETRIES times at most): the
    steadiest one."""
    timings = [time_once(fn, device)]
    while not timings[-1].steady and len(timings) <= RETRIES:
        timings.append(time_once(fn, device))
    return min(timings, key=lambda t: t.spread)


def busy() -> str | None:
    """Why timings on this machine are not to be trusted now, or None: a load average (runnable
    processes, this one included) above the cores this process may run on."""
    load, cores = os.getloadavg()[0], len(os.sched_getaffinity(0))
    if load > cores:
        return (f"the machine is busy (load average {load:.1f} on {cores} cores): timings are "
                "noisy, and a win that does not repeat is not stored; sweep on a quiet machine")
    return None


def progress(done: int, total: int, label: str):
    width = 30
    filled = width * done // max(total, 1)
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label[:100]:<100}",
          end="" if done < total else "\n", file=sys.stderr, flush=True)


def sweep(op: str, device: torch.device, dtype, *, shapes=None, buckets=None, quick=False,
          backward=False, routing=None, out_dir: Path | None = None,
          backend: str | None = None, weights: str | None = None) -> list[dict]:
    """Tune ``op`` (and with ``backward`` its backward kernels) for activations in ``dtype``
    and, with ``weights`` "fp8" or "mxfp4", on weights in that format; returns one summary row
    per (shape, bucket, kernel) and writes the tuning file. ``backend`` defaults to the
    device's (triton on a GPU; the tests also sweep the Triton kernels in the interpreter)."""
    backend = backend or ("triton" if device.type == "cuda" else "torch")
    cases.check_weights(op, backend, weights)
    shapes = shapes or cases.SHAPES[op][device.type]
    buckets = buckets or cases.BUCKETS[op][device.type][1 if quick else 0]
    if min(buckets) < 1:
        raise ValueError(f"token buckets must be positive, got {min(buckets)}")
    for shape in shapes:  # every shape checked before any is tuned
        cases.check_shape(op, shape, routing, weights)
        cases.check_memory(op, shape, max(buckets), device, dtype)
    if message := busy():
        print(f"autotune: {message}", file=sys.stderr)
    summary, entries = [], {}
    for shape in shapes:
        for n in buckets:
            for case in cases.make_cases(op, shape, n, backend, device, dtype, quick=quick,
                                         backward=backward, routing=routing, weights=weights):
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
    default = measure(case.run, device)
    timings, best, rejected = [default], None, []
    for i, candidate in enumerate(case.candidates):
        progress(i, len(case.candidates),
                 f"{label} " + ",".join(f"{k}={v}" for k, v in candidate.items()))
        with tuning.override(**candidate, **only):
            problem = _problem(case, dtype)
            if problem:
                rejected.append((candidate, problem))
                continue
            timings.append(measure(case.run, device))
        if best is None or timings[-1].seconds < best[1]:
            best = (candidate, timings[-1].seconds)
    progress(len(case.candidates), len(case.candidates), f"{case.op} {label}")
    for candidate, why in rejected:
        print(f"  rejected {candidate}: {why}", file=sys.stderr)
    default_seconds = default.seconds
    # A wrong heuristic is replaced by the fastest correct candidate, however slow.
    if best is not None and not heuristic_problem:
        config, seconds, default_seconds, retimed = _confirmed(case, label, best, default_seconds,
                                                               device, only)
        best = (config, seconds)
        timings += retimed
    unsteady = sum(not t.steady for t in timings)
    if unsteady:
        print(f"  {label}: {unsteady} of {len(timings)} timings stayed unsteady (80th over 20th "
              f"percentile above {MAX_SPREAD}); {busy() or 'other work may hold the machine'}",
              file=sys.stderr)
    row = dict(op=case.op, shape=case.shape_key, bucket=case.bucket,
               candidates=len(case.candidates), rejected=len(rejected),
               heuristic_ok=not heuristic_problem, default_us=default_seconds * 1e6,
               unsteady=unsteady)
    if best is not None:
        row.update(best=best[0], best_us=best[1] * 1e6, speedup=default_seconds / best[1])
    return row


def _problem(case, dtype) -> str | None:
    """Why the op's output (under the current override) is not the reference's, or None."""
    try:
        out = case.run()
    except Exception as error:  # noqa: BLE001 - a failing candidate is data
        return f"{type(error).__name__}: {error}"[:200]
    problem = testing.mismatches(out, case.expected, dtype, case.reduction)
    return f"wrong answer: {problem}"[:200] if problem else None


def _confirmed(case, label, best, default, device, only):
    """(config to store, its seconds, the heuristic's seconds, the re-timings): the fastest
    candidate ``best`` if it beat the heuristic by MIN_GAIN in each of CONFIRM_PAIRS pairs of
    steady timings, each pair taken back to back so that both see the same load; else {} (the
    heuristic is kept)."""
    config, seconds = best
    if seconds * (1 + MIN_GAIN) > default:
        return {}, default, default, []
    pairs = []
    for _ in range(CONFIRM_PAIRS):
        heuristic = measure(case.run, device)
        with tuning.override(**config, **only):
            pairs.append((heuristic, measure(case.run, device)))
    retimed = [t for pair in pairs for t in pair]
    retimed_default = statistics.median(h.seconds for h, _ in pairs)
    if all(h.steady and c.steady and c.seconds * (1 + MIN_GAIN) <= h.seconds for h, c in pairs):
        return config, statistics.median(c.seconds for _, c in pairs), retimed_default, retimed
    print(f"  {label}: the {default / seconds:.2f}x win of {config} did not repeat in "
          f"{CONFIRM_PAIRS} steady re-timings; the heuristic is kept", file=sys.stderr)
    return {}, retimed_default, retimed_default, retimed


def format_summary(rows: list[dict]) -> str:
    lines = ["| op | shape | bucket | candidates | rejected | unsteady timings | heuristic "
             "| heuristic us | best us | speedup | best |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        start = (f"| {r['op']} | {r['shape']} | {r['bucket']} | {r['candidates']} | "
                 f"{r['rejected']} | {r['unsteady']} | {'ok' if r['heuristic_ok'] else 'WRONG'} | "
                 f"{r['default_us']:.1f} | ")
        if "best" not in r:
            lines.append(start + "- | - | none correct, heuristic kept |")
        else:
            best = r["best"] or "none faster, heuristic kept"
            lines.append(start + f"{r['best_us']:.1f} | {r['speedup']:.2f}x | {best} |")
    return "\n".join(lines)
