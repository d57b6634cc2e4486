"""The benchmark harness: timing, load sampling, noisy rows, speedups, JSON, table, plots;
and every benchmark module on toy shapes."""

import dataclasses
import functools
import re
import importlib
import json
import threading

import pytest
import torch

from bench import harness
from bench.__main__ import BENCHMARKS


@pytest.fixture(autouse=True)
def no_load_padding(monkeypatch):
    """These tests time for milliseconds; padding each load window to MIN_LOAD_CPU_S would only
    slow them down (test_time_fns_measures_the_load_of_its_window checks the padding)."""
    monkeypatch.setattr(harness, "MIN_LOAD_CPU_S", 0.0)


def _row(**fields):
    """A Row with made-up timings: 100 us median, p20-p80 95-105 us, unless given."""
    return harness.Row(**{**dict(op="tiny", impl="sum", shape=dict(T=1, n=32), dtype="float32",
                                 device="cpu", median_us=100.0, p20_us=95.0, p80_us=105.0,
                                 tokens_per_s=1e4, baseline="sum"), **fields})


def test_harness_reports_a_tiny_op(tmp_path):
    impls = [harness.Impl("sum", torch.sum),
             harness.Impl("cumsum", lambda x: x.cumsum(0), backend="reference")]
    g = torch.Generator().manual_seed(0)
    rows = []
    for T in (1, 8):
        x = torch.randn(T, 32, generator=g)
        rows += harness.compare(impls, (x,), op="tiny", shape=dict(T=T, n=32), dtype=x.dtype,
                                device="cpu", tokens=T, nbytes=x.nbytes, baseline="sum",
                                warmup=1, reps=5, budget_s=0.01)
    harness.add_speedups(rows)
    harness.flag_noisy(rows)

    assert [(r.impl, r.shape["T"]) for r in rows] == [("sum", 1), ("cumsum", 1), ("sum", 8),
                                                      ("cumsum", 8)]
    for r in rows:
        assert 0 < r.p20_us <= r.median_us <= r.p80_us
        assert r.others_cpu is None or 0 <= r.others_cpu <= 1
        assert isinstance(r.noisy, list)
        assert r.tokens_per_s == pytest.approx(r.shape["T"] / (r.median_us * 1e-6), rel=1e-3)
        assert r.speedup_vs == (1.0 if r.impl == "sum" else pytest.approx(
            next(b.median_us for b in rows if b.impl == "sum" and b.shape == r.shape)
            / r.median_us, rel=1e-3))

    load = dict(interval_s=1.0, others_cpu_mean=0.0, others_cpu_max=0.0, samples=[])
    json_path, md_path = harness.write_results(rows, tmp_path, "tiny", load=load)
    data = json.loads(json_path.read_text())
    assert {"cpu", "torch", "date", "device"} <= data["machine"].keys()
    assert data["load"] == load
    assert [(r["impl"], r["shape"]) for r in data["rows"]] == [(r.impl, r.shape) for r in rows]
    assert [harness.Row(**r) for r in data["rows"]] == rows
    text = md_path.read_text()
    assert "Load: other processes (our compilers too) used 0.0% of the CPU over the run" in text
    table = [line for line in text.splitlines() if line.startswith("| tiny |")]
    assert len(table) == len(rows)
    assert sum("| cumsum |" in line and "T=8 n=32" in line for line in table) == 1

    pytest.importorskip("matplotlib")
    png = harness.plot(rows, tmp_path / "tiny.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("op", list(BENCHMARKS))
def test_every_benchmark_module_has_run(op):
    assert callable(importlib.import_module(BENCHMARKS[op]).run)


def test_moe_benchmarks_on_tiny_shapes(monkeypatch, tmp_path):
    """bench_fused_moe and bench_grouped_mm end to end on CPU at toy sizes, timing cut short."""
    pytest.importorskip("transformers")
    from bench import bench_fused_moe, bench_grouped_mm

    fast = functools.partial(harness.compare, warmup=1, reps=harness.MIN_REPS, budget_s=0)
    for module in (bench_fused_moe, bench_grouped_mm):
        monkeypatch.setattr(module, "compare", fast)
    monkeypatch.setitem(bench_fused_moe.SHAPES, "cpu", dict(H=32, I=16, E=4, k=2))
    for mode in (bench_fused_moe.FORWARD, bench_fused_moe.BACKWARD):
        monkeypatch.setitem(bench_fused_moe.TOKENS, ("cpu", mode), ((3,), (3,)))
    monkeypatch.setitem(bench_grouped_mm.SHAPES, "cpu", dict(K=32, N=16, E=4))
    monkeypatch.setitem(bench_grouped_mm.ROWS, "cpu", ((8,), (8,)))

    rows = (bench_fused_moe.run(torch.device("cpu"), quick=True)
            + bench_grouped_mm.run(torch.device("cpu"), quick=True))
    harness.add_speedups(rows)

    got = {}
    for r in rows:
        got.setdefault((r.op, r.shape["mode"]), set()).add(r.impl)
    assert {"ds_kernels", "transformers[eager]", "transformers[grouped_mm]", "torch.grouped_mm",
            "reference"} <= got["fused_moe", "forward"]
    assert {"ds_kernels", "transformers[grouped_mm]", "torch.grouped_mm"} <= got[
        "fused_moe", "forward+backward"]
    assert {"ds_kernels", "torch.grouped_mm", "reference"} <= got["grouped_mm", "forward"]
    assert {"ds_kernels", "torch.grouped_mm"} <= got["grouped_mm", "forward+backward"]
    for r in rows:
        assert r.speedup_vs is not None and r.tflops_per_s > 0 and r.pct_of_peak is None
        if r.op == "fused_moe":
            assert r.baseline.startswith("transformers[")

    pytest.importorskip("matplotlib")
    for op in ("fused_moe", "grouped_mm"):  # grouped_mm's x axis is M: the shape's first entry
        harness.plot([r for r in rows if r.op == op], tmp_path / f"{op}.png")


def test_working_skips_impls_that_raise_and_fails_wrong_ones(capsys):
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))

    def boom(x):
        raise RuntimeError("no kernel for this layout")

    def missing(x):
        raise ImportError("needs the kernels package")

    def check(name, got):
        harness.assert_close(name, got, x, 1e-6)

    impls = [harness.Impl("ok", lambda x: x * 1.0), harness.Impl("boom", boom),
             harness.Impl("missing", missing)]
    unavailable = set()
    kept = harness.working(impls, (x,), check, op="tiny", shape=dict(T=4), unavailable=unavailable)
    assert [i.name for i in kept] == ["ok"] and unavailable == {"missing"}
    assert "boom SKIPPED: RuntimeError: no kernel for this layout" in capsys.readouterr().err
    with pytest.raises(AssertionError, match="relative error"):
        harness.working([harness.Impl("wrong", lambda x: x + 1e-3)], (x,), check, op="tiny",
                        shape=dict(T=4))


def test_norm_rope_benchmark_on_tiny_shapes(monkeypatch):
    pytest.importorskip("transformers")
    from bench import bench_norm_rope

    monkeypatch.setattr(bench_norm_rope, "compare", functools.partial(
        harness.compare, warmup=1, reps=harness.MIN_REPS, budget_s=0))
    monkeypatch.setattr(bench_norm_rope, "TOKENS", (3,))
    monkeypatch.setattr(bench_norm_rope, "HIDDEN", 48)
    monkeypatch.setattr(bench_norm_rope, "DC", 16)
    monkeypatch.setitem(bench_norm_rope.HEADS, "cpu", 2)
    rows = bench_norm_rope.run(torch.device("cpu"), quick=True)
    harness.add_speedups(rows)
    got = {(r.shape["kernel"], r.impl) for r in rows}
    assert {("rms_norm", i) for i in ("ds_kernels", "transformers", "F.rms_norm", "reference")} <= got
    assert {("apply_rope", i) for i in ("ds_kernels", "transformers", "reference")} <= got
    assert {("mla_cache_write", i) for i in ("ds_kernels", "ds_kernels unfused", "reference")} <= got
    assert {("index_cache_write", i)
            for i in ("ds_kernels", "torch unfused", "reference")} <= got
    assert all(r.op == "norm_rope" and r.speedup_vs is not None for r in rows)


def test_expert_parallel_benchmark_on_a_toy_layer(monkeypatch, tmp_path):
    """bench_expert_parallel on 1 and 2 gloo ranks at a toy size: the bytes each token sends
    to the other rank match the analytic figures (uniform routing, so within sampling noise),
    dispatch and combine, in each wire format; the tiny model's rows come after the layer's."""
    from bench import bench_expert_parallel as ep

    monkeypatch.setattr(ep, "SHAPE", dict(H=256, I=16, E=8, k=4, n_group=2, topk_group=2))
    monkeypatch.setattr(ep, "WORLDS", (1, 2))
    monkeypatch.setattr(ep, "TOKENS", ((64,), (64,)))
    monkeypatch.setattr(ep, "REPS", 3)
    monkeypatch.setattr(ep, "MODEL", dict(preset="tiny", batch=2, prompt_len=4, new_tokens=2))
    monkeypatch.setattr(ep, "MODEL_REPS", 3)
    rows = ep.run(torch.device("cpu"), quick=True)
    assert [(r.impl, r.shape["W"]) for r in rows] == [
        ("MoE (one process)", 1), ("ep native", 1), ("ep fp8", 1), ("ep native", 2),
        ("ep fp8", 2), ("tiny model (one process)", 1), ("tiny model ep", 1),
        ("tiny model ep", 2)]
    for row in rows[1:5]:
        for way in ("dispatch/token", "combine/token"):
            sent, analytic = (float(n) for n in re.fullmatch(
                r"([\d.]+) KiB \(analytic ([\d.]+) KiB\)", row.notes[way]).groups())
            if row.shape["W"] == 1:
                assert sent == analytic == 0
            else:
                assert abs(sent - analytic) <= 0.25 * analytic, (row.impl, way)
    # FP8 rows: 256 + 2 x 4 scale bytes and an 8-byte index, where fp32 takes 1024 + 8.
    native, fp8 = (float(rows[i].notes["dispatch/token"].split()[0]) for i in (3, 4))
    assert fp8 / native == pytest.approx((256 + 8 + 8) / (1024 + 8), rel=0.01)
    assert {"no overlap", "shared expert", "overlap saves", "comm"} <= set(rows[3].notes)
    assert "encode+decode" in rows[4].notes
    assert all(r.median_us > 0 and r.tokens_per_s > 0 for r in rows)
    pytest.importorskip("matplotlib")
    harness.plot(rows, tmp_path / "expert_parallel.png", ep.PLOT_X)


def test_lightning_indexer_benchmark_on_toy_shapes(monkeypatch):
    """Decode and prefill rows, ours against the dense peer (checked as sets first)."""
    from bench import bench_lightning_indexer as li

    monkeypatch.setattr(li, "H", 4)
    monkeypatch.setattr(li, "D", 128)  # FP8 rows: a multiple of 128
    monkeypatch.setattr(li, "TOP_K", 32)
    monkeypatch.setattr(li, "PAGE", 16)
    monkeypatch.setattr(li, "CONTEXTS", {"cpu": ((20, 100), (20, 100))})  # 20 < top_k
    monkeypatch.setattr(li, "PREFILL_CONTEXTS", {"cpu": ((80,), (80,))})
    monkeypatch.setattr(li, "PREFILL_QUERIES", 8)
    monkeypatch.setattr(li, "DENSE_MAX_BYTES", 10_000)  # the prefill's dense scores: skipped
    monkeypatch.setattr(li, "compare", functools.partial(harness.compare, reps=3, warmup=0))
    rows = li.run(torch.device("cpu"), quick=True)
    assert [(r.shape["phase"], r.impl) for r in rows] == [
        ("decode", "ds_kernels"), ("decode", li.FP8), ("decode", li.BASELINE)] * 2 + [
        ("prefill", "ds_kernels"), ("prefill", li.FP8)]
    assert all(r.tflops_per_s > 0 and r.gbytes_per_s > 0 for r in rows)


def test_sparse_mla_benchmark_on_toy_shapes(monkeypatch):
    """Dense decode, DSA, sparse_mla alone and the masked dense peer (checked against DSA)."""
    from bench import bench_sparse_mla as sm

    for name, value in dict(DC=32, DR=16, IH=4, ID=16, TOP_K=24, PAGE=16,
                            CONTEXTS={"cpu": ((40,), (40,))}, BATCH={"cpu": 2},
                            HEADS={"cpu": 3}).items():
        monkeypatch.setattr(sm, name, value)
    monkeypatch.setattr(sm, "compare", functools.partial(harness.compare, reps=3, warmup=0))
    rows = sm.run(torch.device("cpu"), quick=True)
    assert [r.impl for r in rows] == [sm.BASELINE, sm.DSA, "sparse_mla alone",
                                      "transformers (dense indexer, masked dense attention)"]
    assert [r.notes["attended keys"] for r in rows] == [40, 24, 24, 40]


def test_model_benchmark_on_a_toy_config(monkeypatch, tmp_path):
    """bench_model end to end on CPU at a toy size, timing cut short; a full run, so that the
    captured step's rows (checked against eager decode first) are in."""
    pytest.importorskip("transformers")
    from bench import bench_model
    monkeypatch.setattr(bench_model, "time_fns",
                        functools.partial(harness.time_fns, reps=harness.MIN_REPS, budget_s=0))
    monkeypatch.setattr(bench_model, "CONFIG", {**bench_model.CONFIG, "hidden_size": 64,
                                                "num_hidden_layers": 2, "vocab_size": 256})
    # 24 tokens: past the V3.2 model's index_topk, so its selection prunes.
    monkeypatch.setattr(bench_model, "CONTEXTS",
                        dict.fromkeys(bench_model.FAMILIES, ((24,), (24,))))
    # (64 index heads kept: with few, keys whose every head's relu is 0 tie at score 0, and
    # transformers' topk breaks those ties in no stated order.)
    monkeypatch.setitem(bench_model.FAMILIES, "deepseek_v32", {
        **bench_model.FAMILIES["deepseek_v32"], "index_topk": 16})
    rows = bench_model.run(torch.device("cpu"), quick=False)
    harness.add_speedups(rows)
    assert sorted((r.shape["model"], r.shape["phase"], r.impl) for r in rows) == [
        (model, phase, impl) for model in ("deepseek_v3", "deepseek_v32")
        for phase, impl in [("decode", "ds_model"), ("decode", "ds_model[compile]"),
                            ("decode", "transformers"), ("prefill", "ds_model"),
                            ("prefill", "transformers")]]
    assert all(r.op == "model" and r.speedup_vs is not None and r.median_us > 0 for r in rows)
    pytest.importorskip("matplotlib")
    harness.plot(rows, tmp_path / "model.png")


def test_the_device_run_fits_its_budget_and_names_what_exists(tmp_path):
    from autotune import cases
    from bench import device_run

    steps = device_run.steps(tmp_path)
    assert sum(limit for _, _, limit in steps) <= 8 * 60
    for name, command, _ in steps:
        for word in command:
            if word.startswith("tests/"):
                assert (device_run.ROOT / word).is_file(), word
        if "autotune" in command:
            assert command[command.index("--op") + 1] in cases.SHAPES


def test_percent_of_the_measured_peak_is_of_flops_else_of_bytes():
    peaks = dict(bf16_tflops=500.0, copy_gbytes_per_s=4000.0)
    assert harness.pct_of_peak(250.0, 100.0, peaks) == 50.0      # compute-bound: TFLOP/s
    assert harness.pct_of_peak(None, 1000.0, peaks) == 25.0      # memory-bound: GB/s
    assert harness.pct_of_peak(None, None, peaks) is None
    assert harness.pct_of_peak(250.0, 100.0, None) is None       # off a GPU: nothing measured
    assert harness.measured_peaks(torch.device("cpu")) is None


# --- load sampling --------------------------------------------------------------------------

def test_proc_stat_counts_steal_as_busy_and_iowait_as_idle(monkeypatch):
    monkeypatch.setattr(harness.os, "sysconf", lambda name: 100)   # clock ticks per second
    #         user nice system idle iowait irq softirq steal guest guest_nice
    line = "cpu  600 10 200 1000 50 5 15 20 300 0\n"
    got = harness.parse_proc_stat(line, own_s=4.0)
    assert got == harness.CpuTimes(total_s=19.0, busy_s=8.5, own_s=4.0)  # guest is in user


def test_others_cpu_is_busy_time_minus_our_own_over_all_cores():
    before = harness.CpuTimes(total_s=100.0, busy_s=50.0, own_s=10.0)
    # 2 s of wall time on 2 cores: 3 CPU-seconds busy, 2 of them ours.
    after = harness.CpuTimes(total_s=104.0, busy_s=53.0, own_s=12.0)
    assert harness.others_cpu(before, after) == 0.25
    # Tick rounding can make the machine look less busy than we were: 0, not negative.
    assert harness.others_cpu(before, dataclasses.replace(after, busy_s=51.9)) == 0.0
    assert harness.others_cpu(before, None) is None                  # no /proc/stat
    assert harness.others_cpu(before, before) is None                # no time passed


def test_read_cpu_times_reads_this_machine():
    got = harness.read_cpu_times()
    if got is None:
        pytest.skip("no /proc/stat here")
    assert 0 <= got.busy_s <= got.total_s and got.own_s > 0


def _fake_cpu(others_share=0.25, own_share=0.5):
    """A reader whose every call is one more second of a 2-core machine, ``others_share`` and
    ``own_share`` of it used by others and by us."""
    calls = []

    def read():
        calls.append(None)
        n = len(calls)
        return harness.CpuTimes(total_s=2.0 * n, busy_s=2.0 * n * (others_share + own_share),
                                own_s=2.0 * n * own_share)
    return read, calls


def test_load_sampler_records_a_series_and_a_summary():
    read, _ = _fake_cpu()
    with harness.LoadSampler(interval_s=3600, read=read) as sampler:   # the thread never fires
        sampler.sample()
        sampler.sample()
    summary = sampler.summary()
    assert [(s["others_cpu"], s["own_cpu"]) for s in summary["samples"]] == [(0.25, 0.5)] * 2
    assert all(s["t_s"] >= 0 for s in summary["samples"])
    assert summary["others_cpu_mean"] == summary["others_cpu_max"] == 0.25
    assert summary["interval_s"] == 3600


def test_load_sampler_samples_on_its_thread():
    read, calls = _fake_cpu()
    sampled = threading.Event()

    def read_and_tell():
        got = read()
        if len(calls) >= 3:       # the first reading, then two samples on the thread
            sampled.set()
        return got

    with harness.LoadSampler(interval_s=0.001, read=read_and_tell) as sampler:
        assert sampled.wait(timeout=30)
    assert len(sampler.summary()["samples"]) >= 2


def test_load_sampler_without_proc_stat_measures_nothing():
    with harness.LoadSampler(interval_s=3600, read=lambda: None) as sampler:
        sampler.sample()
    assert sampler.summary() == dict(interval_s=3600, others_cpu_mean=None, others_cpu_max=None,
                                     samples=[])


def test_time_fns_measures_the_load_of_its_window(monkeypatch):
    read, calls = _fake_cpu(others_share=0.3)
    monkeypatch.setattr(harness, "read_cpu_times", read)
    slept = []
    monkeypatch.setattr(harness.time, "sleep", slept.append)
    monkeypatch.setattr(harness, "MIN_LOAD_CPU_S", 1.0)
    times = harness.time_fns({"a": lambda: None, "b": lambda: None}, "cpu", warmup=1,
                             reps=harness.MIN_REPS, budget_s=0)
    assert len(calls) == 2                      # one window for both contenders
    assert {t["others_cpu"] for t in times.values()} == {0.3}
    # Microseconds of timing: the window is padded to MIN_LOAD_CPU_S of the machine's CPU.
    assert len(slept) == 1 and 0 < slept[0] <= 1.0 / harness.os.cpu_count()


# --- noisy rows -----------------------------------------------------------------------------

def test_a_row_is_noisy_when_its_spread_is_wide_or_others_used_the_cpu():
    rows = [_row(),                                                   # clean
            _row(p20_us=80.0, p80_us=120.0),                          # p80/p20 1.5
            _row(others_cpu=0.2),                                     # others took 20%
            _row(others_cpu=harness.OTHERS_NOISY),                    # at the threshold: clean
            _row(p20_us=90.0, p80_us=90.0 * harness.SPREAD_NOISY)]    # at the threshold: clean
    harness.flag_noisy(rows)
    assert [r.noisy for r in rows] == [[], ["p80/p20 1.50"],
                                       ["other processes used 20% of the CPU"], [], []]


def test_results_written_before_the_load_was_sampled_still_read():
    """A row of bench/results/cpu-2026-11-28-quick/results.json, which has no others_cpu or
    noisy: it loads, gets flagged on its spread alone, and goes into a table and a plot."""
    old = {"op": "route", "impl": "transformers", "shape": {"T": 1, "H": 1024, "E": 256, "k": 8},
           "dtype": "float32", "device": "cpu", "median_us": 75.222, "p20_us": 74.451,
           "p80_us": 97.585, "tokens_per_s": 13294.0, "gbytes_per_s": 13.995055,
           "baseline": "transformers", "speedup_vs": 1.0, "tflops_per_s": None,
           "pct_of_peak": None}
    rows = [harness.Row(**old)]
    harness.flag_noisy(rows)
    assert rows[0].others_cpu is None and rows[0].noisy == ["p80/p20 1.31"]
    assert "| yes: p80/p20 1.31 |" in harness.format_table(rows)
    assert harness.describe_load(rows, None) == (
        "Load: not measured. 1 of 1 rows noisy: 0 timed while other processes used more than 5% "
        "of the CPU, 1 with p80/p20 above 1.25 (marked in the last column).")


def test_the_table_marks_noisy_rows_and_the_summary_says_if_the_run_was_quiet():
    rows = [_row(), _row(impl="cumsum", others_cpu=0.4)]
    harness.flag_noisy(rows)
    table = harness.format_table(rows).splitlines()
    assert table[0].endswith("| noisy |")
    assert table[2].endswith("|  |")
    assert table[3].endswith("| yes: other processes used 40% of the CPU |")

    load = dict(interval_s=1.0, others_cpu_mean=0.004, others_cpu_max=0.2, samples=[])
    assert harness.describe_load(rows[:1], load) == (
        "Load: other processes (our compilers too) used 0.4% of the CPU over the run, at most "
        "20.0% in any 1 s sample. 0 of 1 rows noisy: 0 timed while other processes used more "
        "than 5% of the CPU, 0 with p80/p20 above 1.25 (marked in the last column). "
        "A quiet run.")   # the busy sample fell between timings
    assert harness.describe_load(rows, load).endswith(
        "1 of 2 rows noisy: 1 timed while other processes used more than 5% of the CPU, 0 with "
        "p80/p20 above 1.25 (marked in the last column). Not a quiet run.")


# --- plots ----------------------------------------------------------------------------------

def _plotted_rows():
    rows = []
    for mode in ("forward", "forward+backward"):
        for T, median in ((1, 10.0), (16, 40.0), (256, 500.0)):
            shape = dict(T=T, n=32, mode=mode)
            rows += [_row(impl="sum", shape=shape, median_us=median, p20_us=0.9 * median,
                          p80_us=1.1 * median),
                     _row(impl="cumsum", shape=shape, median_us=median / 2,
                          p20_us=0.45 * median, p80_us=0.55 * median,
                          others_cpu=0.5 if T == 16 else 0.0)]
    harness.add_speedups(rows)
    harness.flag_noisy(rows)
    return rows


def test_the_figure_names_its_shape_and_axes_and_keeps_the_legend_off_the_curves(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = harness.figure(_plotted_rows())
    time_ax, speed_ax = fig.axes
    assert fig._suptitle.get_text() == "tiny, n=32, float32, cpu"   # the fixed shape
    for ax in (time_ax, speed_ax):
        assert ax.get_xlabel() == "T = tokens per step"
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "16", "256"]
    assert time_ax.get_ylabel() == "time per call (µs, lower is better)"
    assert speed_ax.get_ylabel() == "speedup vs baseline (x, higher is better)"
    assert "baseline (1x, dashed): sum" == speed_ax.get_title()
    assert any(list(line.get_ydata()) == [1.0, 1.0] for line in speed_ax.get_lines())  # 1x
    # One legend entry per impl and mode, none on the axes, and its box clear of both panels.
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "sum mode=forward", "cumsum mode=forward", "sum mode=forward+backward",
        "cumsum mode=forward+backward"]
    assert time_ax.get_legend() is None and speed_ax.get_legend() is None
    assert "hollow points: noisy timing (2 of 12)" in legend.get_title().get_text()
    FigureCanvasAgg(fig).draw()
    box = legend.get_window_extent()
    assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes)
    # The noisy points (cumsum at T=16, once per mode) are hollow, in both panels.
    for ax in (time_ax, speed_ax):
        hollow = [line for line in ax.get_lines() if line.get_markerfacecolor() == "white"]
        assert [list(line.get_xdata()) for line in hollow] == [[16], [16]]

    png = harness.plot(_plotted_rows(), tmp_path / "tiny.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_figure_without_noisy_rows_says_so():
    pytest.importorskip("matplotlib")
    rows = [r for r in _plotted_rows() if not r.noisy]
    (legend,) = harness.figure(rows).legends
    assert "no noisy points" in legend.get_title().get_text()


def test_quant_linear_benchmark_on_tiny_shapes(monkeypatch):
    from bench import bench_quant_linear

    monkeypatch.setattr(bench_quant_linear, "compare", functools.partial(
        harness.compare, warmup=1, reps=harness.MIN_REPS, budget_s=0))
    monkeypatch.setitem(bench_quant_linear.SHAPES, ("cpu", True), dict(N=160, K=96))
    monkeypatch.setitem(bench_quant_linear.TOKENS, "cpu", (1, 33))
    rows = bench_quant_linear.run(torch.device("cpu"), quick=True)
    harness.add_speedups(rows)
    assert {r.impl for r in rows} == {"ds_kernels", "F.linear(dequantised)",
                                      "dequantize + F.linear", "reference"}
    assert {(r.shape["fmt"], r.shape["x"]) for r in rows} == {
        (f, x) for f in ("fp8", "mxfp4") for x in ("float32", "bfloat16")}
    assert all(r.gbytes_per_s for r in rows if r.impl != "reference")


def test_speculative_benchmark_on_a_toy_config(monkeypatch):
    """bench_speculative at a toy size: every MTP row checked equal to greedy, acceptance 1."""
    from bench import bench_speculative as sp
    monkeypatch.setattr(sp, "time_fns",
                        functools.partial(harness.time_fns, reps=harness.MIN_REPS, budget_s=0))
    monkeypatch.setattr(sp, "MODEL_CONFIG", {**sp.MODEL_CONFIG, "hidden_size": 64,
                                             "num_hidden_layers": 2, "vocab_size": 256})
    monkeypatch.setattr(sp, "PROMPT", 8)
    monkeypatch.setattr(sp, "NEW", 6)
    rows = sp.run(torch.device("cpu"), quick=True)
    harness.add_speedups(rows)
    assert [r.impl for r in rows] == [sp.BASELINE] + [f"mtp k={k}" for k in sp.DRAFTS]
    assert all(r.notes.get("acceptance") == "1.0" for r in rows[1:])
    assert all(r.speedup_vs is not None for r in rows)


def test_mhc_benchmark_on_a_toy_width(monkeypatch):
    """bench_mhc end to end on CPU, narrow streams, timing cut short: every impl checked
    against transformers first, then timed."""
    pytest.importorskip("transformers")
    from bench import bench_mhc
    monkeypatch.setattr(bench_mhc, "D", 64)
    monkeypatch.setattr(bench_mhc, "compare",
                        functools.partial(harness.compare, reps=harness.MIN_REPS, budget_s=0))
    rows = bench_mhc.run(torch.device("cpu"), quick=True)
    harness.add_speedups(rows)
    assert [(r.shape["T"], r.impl) for r in rows] == [
        (T, impl) for T in bench_mhc.QUICK_TOKENS
        for impl in ("transformers", "ds_kernels", "reference")]
    assert all(r.speedup_vs is not None and r.median_us > 0 for r in rows)
