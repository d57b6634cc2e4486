"""Timing, result rows, machine description, and the JSON / markdown / PNG reports."""

import dataclasses
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import ds_kernels
from ds_kernels import dispatch, tuning

# Fewer samples than this make the p20/p80 columns meaningless.
MIN_REPS = 5
# On CPU the contenders take turns in this many rounds (see time_fns).
ROUNDS = 5
QUANTILES = (0.5, 0.2, 0.8)


@dataclasses.dataclass
class Row:
    """One implementation of one op, timed at one shape."""

    op: str
    impl: str
    shape: dict
    dtype: str
    device: str
    median_us: float
    p20_us: float
    p80_us: float
    tokens_per_s: float
    gbytes_per_s: float | None = None
    baseline: str | None = None     # impl that speedup_vs compares against
    speedup_vs: float | None = None  # baseline median / this median; filled by add_speedups
    tflops_per_s: float | None = None  # for GEMM-bound ops: the useful flops per second
    # On a GPU: tflops_per_s (else gbytes_per_s) as a percentage of the peak measured at the
    # start of the run (measured_peaks).
    pct_of_peak: float | None = None


@dataclasses.dataclass(frozen=True)
class Impl:
    """A contender. A ``backend`` is forced on ds_kernels around each call; that costs ~1 us,
    so leave it None for ds_kernels' default path (what users get)."""

    name: str
    fn: Callable
    backend: str | None = None

    def __call__(self, *args):
        if self.backend is None:
            return self.fn(*args)
        with ds_kernels.use_backend(self.backend):
            return self.fn(*args)


def time_fn(fn: Callable, device, **timing) -> dict:
    """Median and p20/p80 time of ``fn()`` in microseconds; ``timing`` as for time_fns."""
    return time_fns({"fn": fn}, device, **timing)["fn"]


def time_fns(fns: dict[str, Callable], device, *, warmup: int = 3, reps: int = 1000,
             budget_s: float = 0.3) -> dict[str, dict]:
    """Median and p20/p80 time in microseconds of each zero-argument callable.

    Each gets ``warmup`` untimed calls, then up to ``reps`` timed calls, fewer when they would
    take longer than ``budget_s`` (but at least MIN_REPS), so slow shapes on a small CPU stay
    cheap. On CUDA, triton's do_bench times each in turn (CUDA events, L2 flushed). On CPU the
    timed calls of all fns are interleaved in ROUNDS rounds: a slow phase of a shared machine
    (another job, a throttled VM) then lands on every contender alike, not on one.
    """
    warmup = max(warmup, 1)  # the warm-up calls also size the timed phase
    if torch.device(device).type == "cuda":
        return {name: _time_cuda(fn, warmup, reps, budget_s) for name, fn in fns.items()}
    counts = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        for _ in range(warmup):
            fn()
        per_call = (time.perf_counter() - start) / warmup
        counts[name] = max(MIN_REPS, min(reps, int(budget_s / max(per_call, 1e-9))))
    samples = {name: [] for name in fns}
    for r in range(ROUNDS):
        for name, fn in fns.items():
            for _ in range(counts[name] * (r + 1) // ROUNDS - counts[name] * r // ROUNDS):
                start = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - start) * 1e6)
    return {name: _summary(s) for name, s in samples.items()}


def _summary(samples_us):
    cuts = statistics.quantiles(samples_us, n=100, method="inclusive")  # cuts[i]: p(i+1)
    return _us(statistics.median(samples_us), cuts[19], cuts[79])


def _time_cuda(fn, warmup, reps, budget_s):
    import triton.testing

    fn()  # Triton compilation and autotuning stay out of every window below
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(warmup):
        fn()
    end.record()
    torch.cuda.synchronize()
    per_call_ms = start.elapsed_time(end) / warmup
    # do_bench takes its warm-up and timed phases as windows in ms, not as call counts.
    rep_ms = min(reps * per_call_ms, budget_s * 1e3)
    ms = triton.testing.do_bench(fn, warmup=warmup * per_call_ms, rep=rep_ms,
                                 quantiles=list(QUANTILES))
    return _us(*(t * 1e3 for t in ms))


def _us(median, p20, p80):
    return dict(median_us=round(median, 3), p20_us=round(p20, 3), p80_us=round(p80, 3))


def compare(impls: list[Impl], args: tuple, *, op: str, shape: dict, dtype, device,
            tokens: int, nbytes: int | None = None, baseline: str | None = None,
            flops: float | None = None, **timing) -> list[Row]:
    """Time every impl on the same ``args`` (see time_fns for ``timing``): one Row each.

    ``tokens``, ``nbytes`` (the bytes an ideal implementation moves) and ``flops`` (the useful
    floating-point operations) give the throughputs; on a GPU, the percentage of its measured
    peak: of TFLOP/s where ``flops`` is given, else of GB/s.
    """
    peaks = measured_peaks(torch.device(device))
    times = time_fns({i.name: functools.partial(i, *args) for i in impls}, device, **timing)
    rows = []
    for name, t in times.items():
        seconds = t["median_us"] * 1e-6
        tflops = None if flops is None else flops / seconds / 1e12
        gbps = None if nbytes is None else nbytes / seconds / 1e9
        rows.append(Row(op=op, impl=name, shape=dict(shape),
                        dtype=str(dtype).replace("torch.", ""), device=str(device),
                        tokens_per_s=round(tokens / seconds, 1),
                        gbytes_per_s=None if gbps is None else round(gbps, 6),
                        baseline=baseline,
                        # significant digits, not decimals: toy shapes must not round to 0
                        tflops_per_s=None if tflops is None else float(f"{tflops:.6g}"),
                        pct_of_peak=pct_of_peak(tflops, gbps, peaks),
                        **t))
        print(f"[{op}] {format_shape(shape)} {name} {t['median_us']:.1f} us", file=sys.stderr,
              flush=True)
    return rows


def pct_of_peak(tflops: float | None, gbps: float | None, peaks: dict | None) -> float | None:
    """``tflops`` as a percentage of the peak bf16 TFLOP/s, else ``gbps`` of the peak GB/s."""
    if peaks is None:
        return None
    if tflops is not None:
        return round(100 * tflops / peaks["bf16_tflops"], 3)
    if gbps is not None:
        return round(100 * gbps / peaks["copy_gbytes_per_s"], 3)
    return None


@functools.cache
def measured_peaks(device: torch.device) -> dict | None:
    """What this GPU really reaches, measured once per run (None off a GPU): a bf16 matmul of
    8192^3 and a device-to-device copy of 1 GiB (bytes read plus written). Spec-sheet peaks
    assume boost clocks that no sustained kernel holds, so percentages of them flatter no one."""
    if device.type != "cuda":
        return None
    import triton.testing

    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    mm_ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300)
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    copy_ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=300)
    peaks = dict(bf16_tflops=round(2 * n**3 / mm_ms / 1e9, 1),
                 copy_gbytes_per_s=round(2 * x.numel() / copy_ms / 1e6, 1))
    del a, b, x, y
    torch.cuda.empty_cache()
    return peaks


def skip(op: str, shape: dict, impl: str, reason: str) -> None:
    """Say on stderr that ``impl`` has no row at this shape, and why."""
    print(f"[{op}] {format_shape(shape)} {impl} SKIPPED: {reason}", file=sys.stderr, flush=True)


def working(impls: list[Impl], args: tuple, check: Callable, *, op: str, shape: dict,
            unavailable: set[str] | None = None) -> list[Impl]:
    """The impls that run on ``args``, each called once (which also warms it up) and its result
    passed to ``check(name, result)``, which raises on a wrong answer. An impl that raises
    (unsupported here, out of memory, a missing kernel package) is skipped, not fatal; one that
    raises ImportError joins ``unavailable`` and is not tried again."""
    kept = []
    unavailable = set() if unavailable is None else unavailable
    for impl in impls:
        if impl.name in unavailable:
            continue
        try:
            result = impl(*args)
        except Exception as error:  # noqa: BLE001 - any failure to run means no row, not a crash
            message = str(error).strip().splitlines()
            reason = f"{type(error).__name__}: {message[0] if message else ''}"[:300]
            if isinstance(error, ImportError):
                unavailable.add(impl.name)
                reason += " (not tried again)"
            skip(op, shape, impl.name, reason)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        check(impl.name, result)
        del result
        kept.append(impl)
    return kept


_CHUNK = 1 << 24


def assert_close(what: str, got, want, tol: float) -> None:
    """``got`` matches ``want`` (tensors, or tuples of them) to ``tol`` in norm, relative to
    ``want``'s norm: robust to the rounding of different summation orders, not to a wrong
    answer, and meaningful for entries near 0."""
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    if len(got) != len(want):
        raise AssertionError(f"{what}: {len(got)} results, expected {len(want)}")
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            raise AssertionError(f"{what}[{i}]: shape {tuple(g.shape)}, expected {tuple(w.shape)}")
        g, w = g.detach().reshape(-1), w.detach().reshape(-1)
        diff2 = ref2 = 0.0
        for start in range(0, w.numel(), _CHUNK):  # in slices: a weight gradient can be 30 GB
            gs, ws = g[start:start + _CHUNK].double(), w[start:start + _CHUNK].double()
            diff2 += float((gs - ws).square().sum())
            ref2 += float(ws.square().sum())
        error = (diff2 / max(ref2, 1e-60)) ** 0.5
        if not error <= tol:  # also catches NaN
            raise AssertionError(f"{what}[{i}]: relative error {error:.3g} > {tol:g}")


def add_speedups(rows: list[Row]) -> None:
    """Fill speedup_vs: baseline median / row median, at the same op, shape, dtype and device."""
    def key(row):
        return row.op, json.dumps(row.shape, sort_keys=True), row.dtype, row.device

    medians = {key(r) + (r.impl,): r.median_us for r in rows}
    for row in rows:
        base = medians.get(key(row) + (row.baseline,))
        row.speedup_vs = None if base is None else round(base / row.median_us, 4)


def machine_info(device="cpu") -> dict:
    """What the numbers were measured on (no hostname)."""
    device = torch.device(device)
    return dict(
        platform=platform.platform(),
        cpu=tuning.device_name(torch.device("cpu")),
        cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        # Other work on the machine shows up as stalls in CPU timings; this says if there was.
        load_average_1m=round(os.getloadavg()[0], 2),
        python=platform.python_version(),
        **{name: _version(name) for name in ("torch", "triton", "transformers", "numpy")},
        ds_kernels=ds_kernels.__version__,
        ds_kernels_default_backend=dispatch.preferred_backend(device),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        measured_peaks=measured_peaks(device),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def _version(package: str) -> str | None:
    # Package metadata, not an import: importing transformers alone takes seconds.
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def format_shape(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _si(x: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def format_table(rows: list[Row]) -> str:
    """A markdown table, one line per row."""
    lines = ["| op | shape | dtype | device | impl | median us | p20-p80 us | throughput "
             "| x vs baseline |",
             "|---|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        throughput = f"{_si(r.tokens_per_s)} tok/s"
        if r.gbytes_per_s is not None:
            throughput += f", {r.gbytes_per_s:.3g} GB/s"
        if r.tflops_per_s is not None:
            throughput += f", {r.tflops_per_s:.3g} TFLOP/s"
        if r.pct_of_peak is not None:
            throughput += f" ({r.pct_of_peak:.1f}% of peak)"
        speedup = "" if r.speedup_vs is None else f"{r.speedup_vs:.2f}x vs {r.baseline}"
        lines.append(f"| {r.op} | {format_shape(r.shape)} | {r.dtype} | {r.device} | {r.impl} "
                     f"| {r.median_us:.1f} | {r.p20_us:.1f}-{r.p80_us:.1f} | {throughput} "
                     f"| {speedup} |")
    return "\n".join(lines) + "\n"


def write_results(rows: list[Row], out_dir, name: str, machine: dict | None = None):
    """Write <name>.json ({"machine", "rows"}) and <name>.md; return both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine if machine is not None else machine_info(rows[0].device if rows else "cpu")
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(
        {"machine": machine, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1) + "\n")
    about = ", ".join(f"{k}: {v}" for k, v in machine.items())
    md_path.write_text(f"# {name}\n\n{about}\n\n{format_table(rows)}")
    return json_path, md_path


def plot(rows: list[Row], path, x_key: str | None = None, *, title: str | None = None):
    """Log-log median time vs shape[x_key] (default "T", else the shape's first entry), one line
    per impl, p20-p80 shaded.

    Rows whose other shape entries differ (say block_m) get separate lines, labelled with them.
    """
    if x_key is None:
        x_key = "T" if "T" in rows[0].shape else next(iter(rows[0].shape))
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on benchmark machines
    import matplotlib.pyplot as plt

    varying = [k for k in rows[0].shape if k != x_key
               and len({json.dumps(r.shape.get(k)) for r in rows}) > 1]
    impls = list(dict.fromkeys(r.impl for r in rows))
    variants = list(dict.fromkeys(tuple(r.shape.get(k) for k in varying) for r in rows))
    series: dict[tuple, list[Row]] = {}
    for r in rows:
        series.setdefault((r.impl, tuple(r.shape.get(k) for k in varying)), []).append(r)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (impl, variant), points in series.items():
        # Colour tells the impl, marker the variant: a one-point variant stays visible.
        color = colors[impls.index(impl) % len(colors)]
        marker = "osD^v<>"[variants.index(variant) % 7]
        label = " ".join([impl] + [f"{k}={v}" for k, v in zip(varying, variant)])
        points.sort(key=lambda r: r.shape[x_key])
        x = [r.shape[x_key] for r in points]
        ax.plot(x, [r.median_us for r in points], marker=marker, color=color, label=label,
                fillstyle="none" if variants.index(variant) else "full")
        ax.fill_between(x, [r.p20_us for r in points], [r.p80_us for r in points], color=color,
                        alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(x_key)
    ax.set_ylabel("median time (us)")
    ax.set_title(title or f"{rows[0].op} on {rows[0].device} ({rows[0].dtype})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
