"""Smoke test of the benchmark harness on a tiny op: timing, speedups, JSON, table, plot."""

import functools
import importlib
import json

import pytest
import torch

from bench import harness
from bench.__main__ import BENCHMARKS


def test_harness_reports_a_tiny_op(tmp_path):
    impls = [harness.Impl("sum", torch.sum),
             harness.Impl("cumsum", lambda x: x.cumsum(0), backend="reference")]
    rows = []
    for T in (1, 8):
        x = torch.randn(T, 32)
        rows += harness.compare(impls, (x,), op="tiny", shape=dict(T=T, n=32), dtype=x.dtype,
                                device="cpu", tokens=T, nbytes=x.nbytes, baseline="sum",
                                warmup=1, reps=5, budget_s=0.01)
    harness.add_speedups(rows)

    assert [(r.impl, r.shape["T"]) for r in rows] == [("sum", 1), ("cumsum", 1), ("sum", 8),
                                                      ("cumsum", 8)]
    for r in rows:
        assert 0 < r.p20_us <= r.median_us <= r.p80_us
        assert r.tokens_per_s == pytest.approx(r.shape["T"] / (r.median_us * 1e-6), rel=1e-3)
        assert r.speedup_vs == (1.0 if r.impl == "sum" else pytest.approx(
            next(b.median_us for b in rows if b.impl == "sum" and b.shape == r.shape)
            / r.median_us, rel=1e-3))

    json_path, md_path = harness.write_results(rows, tmp_path, "tiny")
    data = json.loads(json_path.read_text())
    assert {"cpu", "torch", "date", "device"} <= data["machine"].keys()
    assert [(r["impl"], r["shape"]) for r in data["rows"]] == [(r.impl, r.shape) for r in rows]
    table = [line for line in md_path.read_text().splitlines() if line.startswith("| tiny |")]
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
    x = torch.randn(4, 3)

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
    assert all(r.op == "norm_rope" and r.speedup_vs is not None for r in rows)


def test_model_benchmark_on_a_toy_config(monkeypatch, tmp_path):
    """bench_model end to end on CPU at a toy size, timing cut short."""
    pytest.importorskip("transformers")
    from bench import bench_model
    monkeypatch.setattr(bench_model, "time_fns",
                        functools.partial(harness.time_fns, reps=harness.MIN_REPS, budget_s=0))
    monkeypatch.setattr(bench_model, "CONFIG", {**bench_model.CONFIG, "hidden_size": 64,
                                                "num_hidden_layers": 2, "vocab_size": 256})
    monkeypatch.setattr(bench_model, "CONTEXTS", ((16,), (16,)))
    rows = bench_model.run(torch.device("cpu"), quick=True)
    harness.add_speedups(rows)
    assert sorted((r.shape["phase"], r.impl) for r in rows) == [
        ("decode", "ds_model"), ("decode", "transformers"), ("prefill", "ds_model"),
        ("prefill", "transformers")]
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
