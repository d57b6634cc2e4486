"""Smoke test of the benchmark harness on a tiny op: timing, speedups, JSON, table, plot."""

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
