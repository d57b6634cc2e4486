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
import threading
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

# When a row's timing is unreliable (flag_noisy). In a quiet 2-core run (bench/results/
# cpu-2026-11-28-quick) 113 of 118 rows had p80/p20 under 1.19; wider means part of the samples
# ran in a slow phase (a stall, another job), so the median depends on how many did.
SPREAD_NOISY = 1.25
# torch's CPU ops use every core, so any other process's CPU time is taken from ours, and a
# multi-threaded op waits at its barrier for the thread that lost its core: a 10% share of the
# CPU can slow a GEMM far more than 10%. 5% stays clear of the rounding of the measurement
# (see MIN_LOAD_CPU_S) and of an idle machine's daemons (well under 1%).
OTHERS_NOISY = 0.05
# A load window spans at least this many CPU-seconds of the machine (0.5 s on 2 cores): /proc/stat
# counts in 10 ms ticks per core, so its rounding then moves the share by ~2%, not by 20% as
# over a 50 ms window. Shorter timings are padded by idling (_load_since).
MIN_LOAD_CPU_S = 1.0
# The run's load series (LoadSampler): fine enough to see a job come and go, and cheap (two
# small reads a second, on a thread that holds the GIL for microseconds).
SAMPLE_INTERVAL_S = 1.0


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
    # The share (0-1) of the machine's CPU time that other processes used while this row was
    # timed (others_cpu), in one window with the other impls of its compare call (on CPU
    # their calls interleave); None where it cannot be measured (no /proc/stat).
    others_cpu: float | None = None
    # Why this row's timing is unreliable, empty if it looks clean; filled by flag_noisy.
    noisy: list[str] = dataclasses.field(default_factory=list)
    # Further measurements of this row, by name (shown after its throughput).
    notes: dict[str, str] = dataclasses.field(default_factory=dict)


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


@dataclasses.dataclass(frozen=True)
class CpuTimes:
    """CPU seconds since boot, summed over the machine's cores: all of them (busy or idle), the
    busy ones, and this process's own (all its threads)."""

    total_s: float
    busy_s: float
    own_s: float


def read_cpu_times() -> CpuTimes | None:
    """The machine's CPU times from /proc/stat and ours; None without /proc (not Linux)."""
    try:
        with open("/proc/stat") as f:
            line = f.readline()
    except OSError:
        return None
    return parse_proc_stat(line, time.process_time())


def parse_proc_stat(line: str, own_s: float) -> CpuTimes:
    """CpuTimes from /proc/stat's first line, "cpu  user nice system idle iowait irq softirq
    steal guest guest_nice" in clock ticks. Guest time is already in user and nice; steal (a
    hypervisor running another VM on our cores) counts as busy: it is contention too."""
    ticks = [int(v) for v in line.split()[1:9]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = ticks[3] + ticks[4]  # iowait is idle: nothing was running on that core
    return CpuTimes(total_s=sum(ticks) / hz, busy_s=(sum(ticks) - idle) / hz, own_s=own_s)


def others_cpu(before: CpuTimes | None, after: CpuTimes | None) -> float | None:
    """The share (0-1) of the machine's CPU time between two readings that other processes
    used: busy time minus our own. This process's threads load the machine too, so the plain
    busy fraction or the load average would call every benchmark contended."""
    if before is None or after is None or after.total_s <= before.total_s:
        return None
    others = (after.busy_s - before.busy_s) - (after.own_s - before.own_s)
    # The machine's ticks round down, our own time does not: a quiet window can come out a tick
    # below zero.
    return round(min(max(others / (after.total_s - before.total_s), 0.0), 1.0), 4)


class LoadSampler:
    """Samples others_cpu every ``interval_s`` on a background thread, from entering the
    ``with`` block to leaving it; ``summary()`` is the run's load for results.json."""

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S,
                 read: Callable[[], CpuTimes | None] = read_cpu_times):
        self.interval_s = interval_s
        self._read = read
        self._samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="load-sampler", daemon=True)

    def __enter__(self):
        self._start = time.monotonic()
        self._first = self._last = self._read()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        # The stretch since the thread's last sample is left out: it can be milliseconds long,
        # too short for /proc/stat's ticks to resolve (see MIN_LOAD_CPU_S).
        self._stop.set()
        self._thread.join()

    def _loop(self):
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        """Record the load since the previous sample."""
        now = self._read()
        share = others_cpu(self._last, now)
        if share is None:
            return
        own = (now.own_s - self._last.own_s) / (now.total_s - self._last.total_s)
        self._samples.append(dict(t_s=round(time.monotonic() - self._start, 2),
                                  others_cpu=share, own_cpu=round(own, 4)))
        self._last = now

    def summary(self) -> dict:
        """Others' share of the CPU over the whole run and at its worst sample, and the series
        (t_s: seconds since the start; own_cpu: this process's share)."""
        return dict(interval_s=self.interval_s,
                    others_cpu_mean=others_cpu(self._first, self._last),
                    others_cpu_max=max((s["others_cpu"] for s in self._samples), default=None),
                    samples=list(self._samples))


def time_fn(fn: Callable, device, **timing) -> dict:
    """Median and p20/p80 time of ``fn()`` in microseconds, and the load; ``timing`` as for
    time_fns."""
    return time_fns({"fn": fn}, device, **timing)["fn"]


def time_fns(fns: dict[str, Callable], device, *, warmup: int = 3, reps: int = 1000,
             budget_s: float = 0.3) -> dict[str, dict]:
    """Median and p20/p80 time in microseconds of each zero-argument callable, and others_cpu:
    the share of the CPU that other processes used while they were timed.

    Each gets ``warmup`` untimed calls, then up to ``reps`` timed calls, fewer when they would
    take longer than ``budget_s`` (but at least MIN_REPS), so slow shapes on a small CPU stay
    cheap. On CUDA, triton's do_bench times each in turn (CUDA events, L2 flushed). On CPU the
    timed calls of all fns are interleaved in ROUNDS rounds: a slow phase of a shared machine
    (another job, a throttled VM) then lands on every contender alike, not on one. The load is
    measured over the timed calls of all fns together, padded by idling to MIN_LOAD_CPU_S.
    """
    warmup = max(warmup, 1)  # the warm-up calls also size the timed phase
    if torch.device(device).type == "cuda":
        for fn in fns.values():
            # Triton compiles and autotunes here, out of the timed and load windows (ptxas runs
            # as another process).
            fn()
        before, start = read_cpu_times(), time.monotonic()
        times = {name: _time_cuda(fn, warmup, reps, budget_s) for name, fn in fns.items()}
    else:
        counts = _rep_counts(fns, warmup, reps, budget_s)
        before, start = read_cpu_times(), time.monotonic()
        times = _time_interleaved(fns, counts)
    load = _load_since(before, start)
    return {name: dict(t, others_cpu=load) for name, t in times.items()}


def _rep_counts(fns, warmup, reps, budget_s):
    """Timed calls per fn on CPU, from the time of its ``warmup`` calls."""
    counts = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        for _ in range(warmup):
            fn()
        per_call = (time.perf_counter() - start) / warmup
        counts[name] = max(MIN_REPS, min(reps, int(budget_s / max(per_call, 1e-9))))
    return counts


def _time_interleaved(fns, counts):
    samples = {name: [] for name in fns}
    for r in range(ROUNDS):
        for name, fn in fns.items():
            for _ in range(counts[name] * (r + 1) // ROUNDS - counts[name] * r // ROUNDS):
                start = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - start) * 1e6)
    return {name: _summary(s) for name, s in samples.items()}


def _load_since(before, start):
    """others_cpu from ``before``, read at time.monotonic() ``start``, to now. A window shorter
    than MIN_LOAD_CPU_S of the machine's CPU is padded first by idling; other processes may then
    get more CPU than while we competed, which can raise the share on a busy machine, never on
    a quiet one."""
    time.sleep(max(0.0, MIN_LOAD_CPU_S / os.cpu_count() - (time.monotonic() - start)))
    return others_cpu(before, read_cpu_times())


def _summary(samples_us):
    cuts = statistics.quantiles(samples_us, n=100, method="inclusive")  # cuts[i]: p(i+1)
    return _us(statistics.median(samples_us), cuts[19], cuts[79])


def _time_cuda(fn, warmup, reps, budget_s):
    import triton.testing

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


def flag_noisy(rows: list[Row]) -> None:
    """Fill noisy: why each row's timing is unreliable. A row is noisy when its spread p80/p20
    passes SPREAD_NOISY, or when other processes used more than OTHERS_NOISY of the CPU while
    it was timed."""
    for row in rows:
        row.noisy = []
        if _wide(row):
            row.noisy.append(f"p80/p20 {row.p80_us / row.p20_us:.2f}")
        if _contended(row):
            row.noisy.append(f"other processes used {row.others_cpu:.0%} of the CPU")


def _wide(row: Row) -> bool:
    return row.p80_us / row.p20_us > SPREAD_NOISY


def _contended(row: Row) -> bool:
    return row.others_cpu is not None and row.others_cpu > OTHERS_NOISY


def machine_info(device="cpu") -> dict:
    """What the numbers were measured on (no hostname)."""
    device = torch.device(device)
    return dict(
        platform=platform.platform(),
        cpu=tuning.device_name(torch.device("cpu")),
        cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        # Before the run (it counts our own threads once we run); the load through the run is
        # results.json's "load", each row's its others_cpu.
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
    """A markdown table, one line per row; the last column says why a row is noisy."""
    lines = ["| op | shape | dtype | device | impl | median us | p20-p80 us | throughput "
             "| x vs baseline | noisy |",
             "|---|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        throughput = f"{_si(r.tokens_per_s)} tok/s"
        if r.gbytes_per_s is not None:
            throughput += f", {r.gbytes_per_s:.3g} GB/s"
        if r.tflops_per_s is not None:
            throughput += f", {r.tflops_per_s:.3g} TFLOP/s"
        if r.pct_of_peak is not None:
            throughput += f" ({r.pct_of_peak:.1f}% of peak)"
        throughput += "".join(f"; {name} {value}" for name, value in r.notes.items())
        speedup = "" if r.speedup_vs is None else f"{r.speedup_vs:.2f}x vs {r.baseline}"
        noisy = f"yes: {'; '.join(r.noisy)}" if r.noisy else ""
        lines.append(f"| {r.op} | {format_shape(r.shape)} | {r.dtype} | {r.device} | {r.impl} "
                     f"| {r.median_us:.1f} | {r.p20_us:.1f}-{r.p80_us:.1f} | {throughput} "
                     f"| {speedup} | {noisy} |")
    return "\n".join(lines) + "\n"


def describe_load(rows: list[Row], load: dict | None) -> str:
    """One line on how far a run can be trusted: what other processes used of the CPU (from
    LoadSampler.summary()), which rows are noisy and why, and whether the run was quiet: no row
    timed while other processes used the CPU. Between the timed windows our own compilers
    (g++ for torch.compile, ptxas for Triton) run as other processes: they show in the run's
    load, not in any row's."""
    contended = sum(_contended(r) for r in rows)
    noisy = (f"{sum(bool(r.noisy) for r in rows)} of {len(rows)} rows noisy: {contended} timed "
             f"while other processes used more than {OTHERS_NOISY:.0%} of the CPU, "
             f"{sum(_wide(r) for r in rows)} with p80/p20 above {SPREAD_NOISY:g} (marked in "
             f"the last column).")
    if load is None or load["others_cpu_mean"] is None:
        return f"Load: not measured. {noisy}"
    return (f"Load: other processes (our compilers too) used {load['others_cpu_mean']:.1%} of "
            f"the CPU over the run, at most {load['others_cpu_max'] or 0.0:.1%} in any "
            f"{load['interval_s']:g} s sample. {noisy} "
            + ("A quiet run." if contended == 0 else "Not a quiet run."))


def write_results(rows: list[Row], out_dir, name: str, machine: dict | None = None,
                  load: dict | None = None):
    """Write <name>.json ({"machine", "load", "rows"}; load from LoadSampler.summary()) and
    <name>.md; return both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine if machine is not None else machine_info(rows[0].device if rows else "cpu")
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(
        {"machine": machine, "load": load, "rows": [dataclasses.asdict(r) for r in rows]},
        indent=1) + "\n")
    about = ", ".join(f"{k}: {v}" for k, v in machine.items())
    md_path.write_text(f"# {name}\n\n{about}\n\n{describe_load(rows, load)}\n\n"
                       f"{format_table(rows)}")
    return json_path, md_path


# What a plot's x axis counts, by its shape key.
X_LABELS = {"T": "T = tokens per step",
            "M": "M = rows of a (token-expert pairs, split among the E groups)",
            "ctx": "ctx = context length (cached tokens per sequence)"}


def plot(rows: list[Row], path, x_key: str | None = None):
    """Write figure(rows, x_key) to ``path`` (a PNG); return the path."""
    fig = figure(rows, x_key)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # "tight" takes in the legend at the right
    return path


def figure(rows: list[Row], x_key: str | None = None):
    """Time per call (median, p20-p80 shaded) and speedup vs the baseline, log-log against
    shape[x_key] (default "T", else the shape's first entry), one line per impl and variant.

    The shape entries equal in every row go in the title; those that differ (say mode) make
    variants, told apart by marker and dash. Noisy rows (flag_noisy) are hollow points. The
    legend lies outside both panels.
    """
    import matplotlib
    import matplotlib.ticker
    from matplotlib.figure import Figure  # no pyplot: no display, no global figure list
    from matplotlib.lines import Line2D

    if x_key is None:
        x_key = "T" if "T" in rows[0].shape else next(iter(rows[0].shape))
    keys = [k for k in dict.fromkeys(k for r in rows for k in r.shape) if k != x_key]
    fixed = {k: rows[0].shape[k] for k in keys
             if all(k in r.shape and r.shape[k] == rows[0].shape[k] for r in rows)}
    series: dict[tuple, list[Row]] = {}
    for r in rows:
        variant = tuple((k, r.shape[k]) for k in keys if k in r.shape and k not in fixed)
        series.setdefault((r.impl, variant), []).append(r)
    impls = list(dict.fromkeys(impl for impl, _ in series))
    variants = list(dict.fromkeys(variant for _, variant in series))

    fig = Figure(figsize=(12, 4.8))
    time_ax, speed_ax = fig.subplots(1, 2)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = []
    for (impl, variant), points in series.items():
        # Colour tells the impl; marker and dash the variant (a one-point variant stays visible).
        style = dict(color=colors[impls.index(impl) % len(colors)],
                     marker="osD^v<>"[variants.index(variant) % 7],
                     linestyle=("-", "--", ":", "-.")[variants.index(variant) % 4])
        points.sort(key=lambda r: r.shape[x_key])
        _draw(time_ax, points, x_key, "median_us", style)
        time_ax.fill_between([r.shape[x_key] for r in points], [r.p20_us for r in points],
                             [r.p80_us for r in points], color=style["color"], alpha=0.15)
        _draw(speed_ax, [r for r in points if r.speedup_vs is not None], x_key, "speedup_vs",
              style)
        handles.append(Line2D([], [], label=" ".join([impl] + [f"{k}={v}" for k, v in variant]),
                              **style))

    xs = sorted({r.shape[x_key] for r in rows})
    for ax in (time_ax, speed_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])  # the measured points, not powers of two
        ax.set_xlabel(X_LABELS.get(x_key, x_key))
        ax.grid(True, which="both", alpha=0.3)
    time_ax.set_yscale("log")
    time_ax.set_ylabel("time per call (µs, lower is better)")
    speed_ax.set_yscale("log", base=2)  # ticks at 0.5x, 1x, 2x, ...
    speed_ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.3g}x"))
    speed_ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    speed_ax.set_ylabel("speedup vs baseline (x, higher is better)")
    baselines = sorted({r.baseline for r in rows if r.speedup_vs is not None})
    speed_ax.set_title(f"baseline (1x, dashed): {', '.join(baselines)}", fontsize="small")
    r0 = rows[0]
    fig.suptitle(", ".join([r0.op] + ([format_shape(fixed)] if fixed else [])
                           + [r0.dtype, r0.device]))
    n_noisy = sum(bool(r.noisy) for r in rows)
    noise = (f"hollow points: noisy timing ({n_noisy} of {len(rows)})" if n_noisy
             else "no noisy points")
    fig.tight_layout()
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize="small",
               title=f"shaded: p20-p80\n{noise}", title_fontsize="small")
    return fig


def _draw(ax, points, x_key, field, style):
    """``field`` of ``points`` against shape[x_key]: a line, filled markers for clean rows,
    hollow ones for noisy rows."""
    x, y = [r.shape[x_key] for r in points], [getattr(r, field) for r in points]
    ax.plot(x, y, color=style["color"], linestyle=style["linestyle"])
    for noisy in (False, True):
        picked = [(xi, yi) for xi, yi, r in zip(x, y, points) if bool(r.noisy) == noisy]
        if picked:
            ax.plot(*zip(*picked), linestyle="none", marker=style["marker"],
                    color=style["color"], markerfacecolor="white" if noisy else style["color"])
