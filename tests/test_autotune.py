"""autotune: sweep on CPU end to end, rejection of wrong candidates and of wins that do not
repeat, the tuning files' safety (corrupt, malformed entries, FIFOs, unreadable folders,
concurrent writes, other versions), the vLLM import and the CLI's errors."""

import collections
import json
import logging
import multiprocessing
import os
import threading
import types

import numpy
import pytest
import torch

import ds_kernels
from autotune import __main__ as cli
from autotune import cases, spaces, store, sweep, vllm
from ds_kernels import tuning
from ds_kernels.cpu.route import SORT_BELOW_TOKENS

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def tuning_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_KERNELS_TUNING_DIR", str(tmp_path))
    tuning.forget_files()
    yield tmp_path
    tuning.forget_files()


def test_sweep_stores_what_the_op_then_uses(tuning_dir, monkeypatch, capsys):
    cli.main(["sweep", "--op", "route", "--tokens", "2", "300", "--quick"])
    out, err = capsys.readouterr()
    assert "| route | E=256 | 300 |" in out and "ds_kernels.route now finds 2 of 2 entries" in err
    [path] = tuning_dir.glob("route__torch__*.json")
    stored = json.loads(path.read_text())["entries"]["E=256"]
    assert set(stored) == {"2", "300"}

    calls = []
    original = ds_kernels.reference.route.route
    monkeypatch.setattr("ds_kernels.reference.route.route",
                        lambda *a: calls.append(1) or original(*a))
    g = torch.Generator().manual_seed(0)
    for n in (2, 300):
        calls.clear()
        with ds_kernels.use_backend("torch"):
            ds_kernels.route(torch.randn(n, 256, generator=g), 8, n_group=8, topk_group=4)
        heuristic = "numpy" if n < SORT_BELOW_TOKENS else "topk"
        assert bool(calls) == (stored[str(n)].get("strategy", heuristic) == "sort"), (n, stored)


def test_a_wrong_candidate_is_rejected_and_never_stored(tuning_dir, monkeypatch, capsys):
    import ds_kernels.cpu.fused_moe as cpu_moe

    # A bug in the per-expert strategies only: they skip the last expert with tokens.
    real_groups = cpu_moe.groups
    monkeypatch.setattr(cpu_moe, "groups", lambda offs: real_groups(offs)[:-1])
    rows = sweep.sweep("fused_moe", CPU, torch.float32, shapes=[dict(E=4, I=8, H=16, k=2)],
                       buckets=[5, 40], out_dir=tuning_dir)
    # At 5 tokens the survivor is the heuristic's own choice: stored as itself or as {}.
    assert rows[0]["rejected"] == 2 and rows[0]["best"] in ({"strategy": "grouped_mm"}, {})
    # At 40 (20 rows per expert) the heuristic picks mm_loop: reported wrong, and replaced.
    assert rows[1]["rejected"] == 2 and rows[1]["best"] == {"strategy": "grouped_mm"}
    assert [r["heuristic_ok"] for r in rows] == [True, False]
    err = capsys.readouterr().err
    assert "rejected {'strategy': 'mm_loop'}: wrong answer" in err
    assert "rejected {'strategy': 'expert_threads'}: wrong answer" in err
    assert "THE HEURISTIC IS WRONG at E=4,I=8,H=16,k=2 n=40" in err
    [path] = tuning_dir.glob("fused_moe__*.json")
    assert json.loads(path.read_text())["entries"]["E=4,I=8,H=16,k=2"] == {
        "5": rows[0]["best"], "40": rows[1]["best"]}


@pytest.mark.parametrize("times,stored", [
    ([100, 99, 120, 130], {}),                                 # within MIN_GAIN: noise
    ([100, 200, 300, 400], {}),                                # all slower
    ([100, 90, 95, 50] + [100, 50] * 3, {"strategy": "topk"}),  # confirmed
    ([100, 90, 95, 50] + [100, 100] * 3, {}),                  # a fluke: medians 100 vs 100
])
def test_only_a_clear_win_over_the_heuristic_is_stored(tuning_dir, monkeypatch, times, stored):
    """Timings scripted (all steady): the heuristic, the candidates numpy, sort and topk, then
    (for a win) pairs of heuristic and winner alternated."""
    clock = iter(times)
    monkeypatch.setattr(sweep, "time_once", lambda fn, device: sweep.Timing(next(clock), 1.0))
    rows = sweep.sweep("route", CPU, torch.float32, buckets=[8], out_dir=tuning_dir)
    assert rows[0]["best"] == stored
    assert _route_strategy(8, "default") == stored.get("strategy", "default")


class _Clock:
    """perf_counter for the sweep, in which each timed call of the op takes
    ``cost(strategy, i)`` seconds: strategy is the override in force (None: the heuristic's)
    and i the number of that strategy's earlier timed calls. The op itself still runs."""

    def __init__(self, cost):
        self.now, self.reads, self.cost, self.calls = 0.0, 0, cost, collections.Counter()

    def perf_counter(self):
        self.reads += 1
        if self.reads % 2 == 0:  # the read after a timed call
            strategy = tuning.forced_config().get("strategy")
            self.now += self.cost(strategy, self.calls[strategy])
            self.calls[strategy] += 1
        return self.now


def _sweep_route_with(monkeypatch, tuning_dir, cost):
    clock = _Clock(cost)
    monkeypatch.setattr(sweep, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    return sweep.sweep("route", CPU, torch.float32, buckets=[8], out_dir=tuning_dir)


def test_a_one_off_win_from_a_busy_machine_is_not_stored(tuning_dir, monkeypatch, capsys):
    """The heuristic really takes as long as "numpy" (1.05 ms); a stall slowed it to 1.4 s for
    its first ten timed calls (its first timing and its first re-timing): a 1331.68x "win"."""
    numpy_seconds = 1.4 / 1331.68

    def cost(strategy, i):
        if strategy is None:
            return 1.4 if i < 10 else numpy_seconds
        return numpy_seconds if strategy == "numpy" else 2e-3
    [row] = _sweep_route_with(monkeypatch, tuning_dir, cost)
    assert row["best"] == {} and row["speedup"] == pytest.approx(1)
    assert row["default_us"] == pytest.approx(numpy_seconds * 1e6)
    assert _route_strategy(8, "default") == "default"
    assert "the 1331.68x win of {'strategy': 'numpy'} did not repeat" in capsys.readouterr().err


def test_unsteady_timings_are_retaken_and_a_win_they_show_is_not_stored(tuning_dir, monkeypatch,
                                                                        capsys):
    """Every other call of the heuristic is slowed 3x (another process on the cores): its
    timings stay unsteady however often they are taken, and the sweep says the machine is
    busy."""
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    clock_calls = []

    def cost(strategy, i):
        clock_calls.append(strategy)
        if strategy is None:
            return 3e-3 if i % 2 else 1e-3
        return 0.5e-3 if strategy == "numpy" else 5e-3
    [row] = _sweep_route_with(monkeypatch, tuning_dir, cost)
    assert row["best"] == {} and row["unsteady"] == 1 + sweep.CONFIRM_PAIRS
    # Each unsteady timing of the heuristic was taken 1 + RETRIES times (50 calls each).
    assert clock_calls.count(None) == (1 + sweep.CONFIRM_PAIRS) * (1 + sweep.RETRIES) * 50
    err = capsys.readouterr().err
    assert "the machine is busy (load average 9.0 on" in err
    assert "4 of 10 timings stayed unsteady" in err
    assert "| route | E=256 | 8 | 3 | 0 | 4 |" in sweep.format_summary([row])


def _route_strategy(n, default):
    return tuning.config("route", "torch", "E=256", n, torch.float32, CPU,
                         dict(strategy=default))["strategy"]


def _file(tuning_dir, op="route", version=None):
    return tuning_dir / tuning.file_name(op, "torch", tuning.device_name(CPU), torch.float32,
                                         version or tuning.versions())


@pytest.mark.parametrize("content", ["{not json", '{"format": 1, "entries": {"E=256": {"1": ',
                                     '{"format": 99, "entries": {}}', "[]", "\xff\xfe",
                                     "[" * 100_000])  # deeper than json's recursion
def test_corrupt_or_partial_files_are_reported_once_and_ignored(tuning_dir, caplog, content):
    _file(tuning_dir).write_text(content, encoding="latin-1")
    logits = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO, logger="ds_kernels"):
        for _ in range(3):
            assert _route_strategy(8, "topk") == "topk"
            with ds_kernels.use_backend("torch"):
                ds_kernels.route(logits, 8, n_group=8, topk_group=4)
    messages = [r.getMessage() for r in caplog.records]
    assert sum(f"ignoring corrupt or unreadable tuning file {_file(tuning_dir)}" in m
               for m in messages) == 1
    # It is the current versions' file: corrupt, not "tuned for other versions".
    assert not any("other triton/torch versions" in m for m in messages)


def test_configs_of_other_versions_are_detected_not_reused(tuning_dir, caplog):
    old = dict(tuning.versions(), triton="3.0.0")
    _file(tuning_dir, version=old).write_text(json.dumps(
        {"format": 1, "entries": {"E=256": {"8": {"strategy": "sort"}}}}))
    with caplog.at_level(logging.WARNING, logger="ds_kernels"):
        assert _route_strategy(8, "topk") == "topk"
    assert any("tuned for other triton/torch versions" in r.getMessage() for r in caplog.records)


def test_a_current_file_without_the_shape_says_so_and_is_not_called_stale(tuning_dir, caplog):
    store.write(tuning_dir, "route", "torch", tuning.device_name(CPU), torch.float32,
                tuning.versions(), {"E=64": {"8": {"strategy": "sort"}}}, source="test")
    with caplog.at_level(logging.INFO, logger="ds_kernels"):
        assert _route_strategy(8, "topk") == "topk"
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"{_file(tuning_dir)} has no entry for E=256" in m for m in messages)
    assert not any("other triton/torch versions" in m for m in messages)


def _write_entries(tuning_dir, entries, op="route", backend="torch"):
    path = tuning_dir / tuning.file_name(op, backend, tuning.device_name(CPU), torch.float32,
                                         tuning.versions())
    path.write_text(json.dumps({"format": 1, "entries": entries}))
    return path


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# (op, backend, the key tuned, a valid value, a bad bucket or None, a bad config)
BAD_ENTRIES = [
    ("route", "torch", "strategy", "sort", "abc", {"strategy": "topk"}),
    ("route", "torch", "strategy", "sort", "0", {"strategy": "topk"}),
    ("route", "torch", "strategy", "sort", "-3", {"strategy": "topk"}),
    ("route", "torch", "strategy", "sort", "9" * 5000, {"strategy": "topk"}),  # int() refuses
    ("route", "torch", "strategy", "sort", None, "topk"),                     # not an object
    ("route", "torch", "strategy", "sort", None, {"strategy": "fastest"}),
    ("route", "torch", "strategy", "sort", None, {"strategy": ["topk"]}),
    ("route", "torch", "strategy", "sort", None, {"strategy": "topk", "BLOCK_T": 4}),
    ("mla_decode", "torch", "chunk_elements", 1 << 20, None, {"chunk_elements": "65536"}),
    ("mla_decode", "torch", "chunk_elements", 1 << 20, None, {"chunk_elements": 1e300}),
    ("mla_decode", "torch", "chunk_elements", 1 << 20, None, {"chunk_elements": True}),
    ("mla_decode", "torch", "chunk_elements", 1 << 20, None, {"chunk_elements": 0}),
    ("route", "triton", "BLOCK_T", 4, None, {"BLOCK_T": -4}),
    ("route", "triton", "BLOCK_T", 4, None, {"BLOCK_T": 3}),                  # tl.arange: 2**n
    ("route", "triton", "BLOCK_T", 4, None, {"BLOCK_T": "16"}),
    ("fused_moe", "triton", "GROUP_M", 8, None, {"GROUP_M": 0}),
    ("fused_moe", "triton", "GROUP_M", 8, None, {"GROUP_M": 8.0}),
    ("fused_moe", "triton", "BLOCK_N", 64, None, {"BLOCK_N": 8}),             # tl.dot: >= 16
    ("fused_moe", "triton", "num_warps", 4, None, {"num_warps": 6}),
]


@pytest.mark.parametrize("op,backend,key,good,bad_bucket,bad", BAD_ENTRIES)
def test_a_bad_entry_is_skipped_with_one_warning_and_the_rest_of_the_file_used(
        tuning_dir, caplog, op, backend, key, good, bad_bucket, bad):
    """Bucket 1 holds a valid config and bucket 8 (or a malformed bucket) a bad one: lookups
    near 8 take bucket 1's, a backward kernel's key is checked alike, and the bad entry is
    reported once, naming the file and the key."""
    bad_at = bad_bucket or "8"
    path = _write_entries(tuning_dir, {
        "E=256": {"1": {key: good}, bad_at: bad},
        "backward:E=256": {bad_at: bad},
        "E=512": "not {bucket: config}"}, op, backend)
    with caplog.at_level(logging.WARNING, logger="ds_kernels"):
        for _ in range(3):
            for n in (1, 8, 4096):
                assert tuning.config(op, backend, "E=256", n, torch.float32, CPU,
                                     {key: "heuristic"}) == {key: good}
                assert tuning.config(op, backend, "backward:E=256", n, torch.float32, CPU,
                                     {key: "heuristic"}, kernel="backward") == {key: "heuristic"}
            assert tuning.config(op, backend, "E=512", 8, torch.float32, CPU,
                                 {key: "heuristic"}) == {key: "heuristic"}
    warned = _warnings(caplog)
    for shape_key in ("E=256", "backward:E=256", "E=512"):
        assert sum(f"{path}, {shape_key}" in m for m in warned) == 1, warned
    assert len(warned) == 3


def test_route_runs_whatever_its_tuning_file_holds(tuning_dir):
    """Every entry malformed: the op runs its heuristic and gives the reference's answer."""
    _write_entries(tuning_dir, {"E=256": {"abc": {"strategy": "sort"}, "0": {}, "-3": {},
                                          "8": "sort", "16": {"strategy": 1e300}},
                                "E=64": "junk"})
    logits = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    with ds_kernels.use_backend("torch"):
        weights, ids = ds_kernels.route(logits, 8, n_group=8, topk_group=4)
    with ds_kernels.use_backend("reference"):
        expected_weights, expected_ids = ds_kernels.route(logits, 8, n_group=8, topk_group=4)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, expected_weights)


@pytest.mark.parametrize("config", [dict(GROUP_M=0), dict(BLOCK_M=16, GROUP_M=-1)])
def test_a_tuned_group_m_out_of_range_cannot_make_grouped_mm_wrong(tuning_dir, caplog, config):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(10, 16, generator=g), torch.randn(3, 16, 16, generator=g)
    offs = torch.tensor([3, 7, 10], dtype=torch.int32)
    _write_entries(tuning_dir, {tuning.shape_key("grouped_mm", E=3, N=16, K=16): {"16": config}},
                   "grouped_mm", "triton")
    with caplog.at_level(logging.WARNING, logger="ds_kernels"), ds_kernels.use_backend("triton"):
        out = ds_kernels.grouped_mm(a, b, offs)
    with ds_kernels.use_backend("reference"):
        torch.testing.assert_close(out, ds_kernels.grouped_mm(a, b, offs))
    assert any("GROUP_M" in m and "entry not used" in m for m in _warnings(caplog))


def test_a_tuned_gemm_config_too_big_for_this_gpu_falls_back_to_the_heuristic(
        tuning_dir, caplog, monkeypatch):
    """Valid by the rules, but built for more shared memory than this device has (a file from
    another GPU): the heuristic runs, with a warning, instead of "out of resources"."""
    monkeypatch.setattr(tuning, "shared_memory_bytes", lambda device: 99 * 1024)
    big = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=5)
    dims = dict(E=3, N=512, K=512)
    _write_entries(tuning_dir, {tuning.shape_key("grouped_mm", **dims): {"1024": big}},
                   "grouped_mm", "triton")
    with caplog.at_level(logging.WARNING, logger="ds_kernels"):
        chosen = tuning.gemm_config("grouped_mm", None, dims, 1024, 300, 512, 512,
                                    torch.float32, CPU)
    assert chosen == tuning.gemm_heuristic(tuning.bucket(300), 512, 512, torch.float32,
                                           99 * 1024)
    assert tuning.gemm_staged_bytes(chosen, torch.float32, 1) <= 99 * 1024
    assert any("more shared memory" in m for m in _warnings(caplog))


def test_a_tuned_negative_block_t_cannot_make_route_return_garbage(tuning_dir, caplog):
    logits = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    _write_entries(tuning_dir, {"E=16": {"8": {"BLOCK_T": -4}}}, "route", "triton")
    with caplog.at_level(logging.WARNING, logger="ds_kernels"), ds_kernels.use_backend("triton"):
        weights, ids = ds_kernels.route(logits, 2)
    with ds_kernels.use_backend("reference"):
        expected_weights, expected_ids = ds_kernels.route(logits, 2)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, expected_weights)
    assert any("BLOCK_T=-4" in m for m in _warnings(caplog))


def test_a_fifo_named_like_a_tuning_file_is_skipped_not_waited_on(tuning_dir, caplog):
    path = _file(tuning_dir)
    os.mkfifo(path)
    results = []
    with caplog.at_level(logging.WARNING, logger="ds_kernels"):
        lookup = threading.Thread(target=lambda: results.append(_route_strategy(8, "topk")),
                                  daemon=True)
        lookup.start()
        lookup.join(timeout=20)
        if lookup.is_alive():  # blocked opening the FIFO: a writer end frees it
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            lookup.join()
            pytest.fail("the lookup waited on a FIFO")
    assert results == ["topk"]
    assert any(str(path) in m and "not a regular file" in m for m in _warnings(caplog))


def _unreadable(tmp_path, how):
    if how == "name too long":
        return tmp_path / ("x" * 300)
    if how == "a file in the path":
        (tmp_path / "file").write_text("")
        return tmp_path / "file" / "tuning"
    folder = tmp_path / "locked"
    folder.mkdir(mode=0)
    return folder


@pytest.mark.parametrize("how", ["name too long", "a file in the path", pytest.param(
    "no permission", marks=pytest.mark.skipif(os.geteuid() == 0, reason="root reads it"))])
def test_an_unreadable_tuning_folder_is_reported_once_and_ignored(tmp_path, monkeypatch, caplog,
                                                                   how):
    folder = _unreadable(tmp_path, how)
    monkeypatch.setenv("DS_KERNELS_TUNING_DIR", str(folder))
    g = torch.Generator().manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="ds_kernels"), ds_kernels.use_backend("torch"):
        for n in (1, 8, 300):
            ds_kernels.route(torch.randn(n, 256, generator=g), 8, n_group=8, topk_group=4)
            a, b = torch.randn(n, 8, generator=g), torch.randn(2, 8, 4, generator=g)
            ds_kernels.grouped_mm(a, b, torch.tensor([n // 2, n], dtype=torch.int32))
    warned = _warnings(caplog)
    assert sum(f"cannot read tuning folder {folder}" in m for m in warned) == 1, warned


def test_nearest_bucket_is_used(tuning_dir):
    store.write(tuning_dir, "route", "torch", tuning.device_name(CPU), torch.float32,
                tuning.versions(), {"E=256": {"1": {"strategy": "sort"},
                                              "4096": {"strategy": "topk"}}}, source="test")
    pick = [_route_strategy(n, "?") for n in (1, 30, 3000)]
    assert pick == ["sort", "sort", "topk"]


def test_shipped_configs_are_used_and_a_users_own_sweep_wins(tuning_dir, tmp_path, monkeypatch):
    shipped = tmp_path / "shipped"
    monkeypatch.setattr(tuning, "SHIPPED_DIR", shipped)
    for folder, choice in ((shipped, "sort"), (tuning_dir, "topk")):
        store.write(folder, "route", "torch", tuning.device_name(CPU), torch.float32,
                    tuning.versions(), {"E=256": {"8": {"strategy": choice}}}, source="test")
        assert _route_strategy(8, "default") == choice
        tuning.forget_files()


def _write_many(folder, key, count):
    for i in range(count):
        store.write(folder, "route", "torch", "cpu", torch.float32, tuning.versions(),
                    {key: {str(i): {"strategy": "sort"}}}, source="test")


def test_two_concurrent_sweeps_keep_both_results(tuning_dir):
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_many, args=(tuning_dir, f"E={e}", 30))
               for e in (8, 16)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    [path] = tuning_dir.glob("route__*.json")
    entries = json.loads(path.read_text())["entries"]
    assert {k: len(v) for k, v in entries.items()} == {"E=8": 30, "E=16": 30}
    assert not list(tuning_dir.glob("*.tmp"))


def test_vllm_files_import_and_are_looked_up(tuning_dir, monkeypatch):
    source = tuning_dir / "vllm" / "E=8,N=16,device_name=NVIDIA_H200.json"
    source.parent.mkdir()
    entry = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=64, GROUP_SIZE_M=1,
                 num_warps=4, num_stages=3)
    source.write_text(json.dumps({"1": entry, "64": dict(entry, BLOCK_SIZE_M=64)}))
    cli.main(["import-vllm", str(source), "--hidden-size", "32", "--top-k", "2"])

    monkeypatch.setattr(tuning, "device_name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(tuning, "shared_memory_bytes", lambda device: 227 * 1024)
    config = tuning.gemm_config("fused_moe", None, dict(E=8, I=16, H=32, k=2), 50, 50 * 2 / 8, 32, 32,
                                torch.bfloat16, torch.device("cuda"))
    assert config == dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, num_warps=4,
                          num_stages=3)


def test_vllm_configs_at_the_edges_of_their_range_are_kept(tuning_dir, monkeypatch):
    """vLLM ships GROUP_SIZE_M up to 64, 256-wide tiles and 5 stages: all within the rules."""
    source = tuning_dir / "E=8,N=16,device_name=NVIDIA_H200.json"
    entry = dict(BLOCK_SIZE_M=256, BLOCK_SIZE_N=256, BLOCK_SIZE_K=128, GROUP_SIZE_M=64,
                 num_warps=8, num_stages=5)
    source.write_text(json.dumps({"4096": entry}))
    cli.main(["import-vllm", str(source), "--hidden-size", "32", "--top-k", "2"])
    monkeypatch.setattr(tuning, "device_name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(tuning, "shared_memory_bytes", lambda device: float("inf"))
    config = tuning.gemm_config("fused_moe", None, dict(E=8, I=16, H=32, k=2), 4096, 1024, 32,
                                32, torch.bfloat16, torch.device("cuda"))
    assert config == dict(BLOCK_M=256, BLOCK_N=256, BLOCK_K=128, GROUP_M=64, num_warps=8,
                          num_stages=5)


@pytest.mark.parametrize("entry,match", [(dict(GROUP_SIZE_M=0), "GROUP_M=0"),
                                         (dict(BLOCK_SIZE_K=24), "BLOCK_K=24"),
                                         (dict(num_stages=2.5), "num_stages=2.5")])
def test_vllm_entries_the_kernel_cannot_run_are_refused(tuning_dir, entry, match, capsys):
    source = tuning_dir / "E=8,N=16,device_name=NVIDIA_H200.json"
    good = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=64, GROUP_SIZE_M=1, num_warps=4,
                num_stages=3)
    source.write_text(json.dumps({"1": good, "64": dict(good, **entry)}))
    with pytest.raises(SystemExit, match="1 of 1 files not imported"):
        cli.main(["import-vllm", str(source)])
    assert f"batch size 64: {match}" in capsys.readouterr().err
    assert not list(tuning_dir.glob("fused_moe__*.json"))


def test_import_vllm_of_a_missing_file_exits_non_zero(tuning_dir, capsys):
    missing = tuning_dir / "E=8,N=16,device_name=NVIDIA_H200.json"
    with pytest.raises(SystemExit) as exit:
        cli.main(["import-vllm", str(missing)])
    assert exit.value.code not in (0, None)
    assert f"skipped {missing}" in capsys.readouterr().err


def test_tuning_files_are_readable_by_others(tuning_dir):
    path = store.write(tuning_dir, "route", "torch", "cpu", torch.float32, tuning.versions(),
                       {"E=256": {"8": {}}}, source="test")
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("name,match", [("E=8,N=16,device_name=X,dtype=fp8_w8a8.json", "quantized"),
                                        ("fused_moe_E8.json", "not a vLLM")])
def test_vllm_files_that_cannot_apply_are_refused(tmp_path, name, match):
    (tmp_path / name).write_text("{}")
    with pytest.raises(ValueError, match=match):
        vllm.parse(tmp_path / name)


def _gemm_candidates(rows, N, K, swiglu=False):
    return spaces.candidates("fused_moe", "triton", quick=False, fits=lambda c: spaces.gemm_fits(
        c, rows, N, K, torch.bfloat16, CPU, swiglu=swiglu))


def test_static_pruning_keeps_only_what_fits():
    small_gpu = _gemm_candidates(2, 4096, 7168)
    assert small_gpu and all(c["BLOCK_M"] <= 16 for c in small_gpu)  # 2 rows per expert
    for c in _gemm_candidates(4096, 4096, 7168, swiglu=True):
        staged = c["num_stages"] * (c["BLOCK_M"] * c["BLOCK_K"] + 2 * c["BLOCK_K"] * c["BLOCK_N"]) * 2
        assert staged <= spaces.shared_memory_bytes(CPU)


@pytest.mark.parametrize("rows", [1, 16, 64, 256, 1024])
def test_the_gemm_heuristic_fits_a_gpu_with_100_kb_of_shared_memory(rows):
    small, hopper = 99 * 1024, 227 * 1024
    for b_tiles in (1, 2):  # SwiGLU's first GEMM loads two B tiles
        config = tuning.gemm_heuristic(rows, 4096, 7168, torch.bfloat16, small, b_tiles)
        assert tuning.gemm_staged_bytes(config, torch.bfloat16, b_tiles) <= small
        assert (tuning.gemm_heuristic(rows, 4096, 7168, torch.bfloat16, hopper, b_tiles)
                == tuning.gemm_heuristic(rows, 4096, 7168, torch.bfloat16))  # unchanged there


def test_mla_pruning_follows_the_kernels_resource_models():
    from ds_kernels.kernels import mla_decode, mla_prefill

    decode = spaces.candidates("mla_decode", "triton", quick=False, fits=lambda c: mla_decode.fits(
        c, 512, 64, torch.bfloat16, CPU))
    # Registers: 64-token tiles over 4 warps spilled in the sm_90 and sm_80 builds.
    assert {(c["BLOCK_N"], c["num_warps"]) for c in decode} == {(16, 4), (32, 4), (16, 8),
                                                                (32, 8), (64, 8)}
    for kind in ("fwd", "dkdv", "dq"):
        kept = spaces.candidates("mla_prefill", "triton", quick=False,
                                 fits=lambda c: mla_prefill.fits(kind, c, 192, 128,
                                                                 torch.bfloat16, CPU))
        assert kept and len(kept) < len(spaces.candidates("mla_prefill", "triton", quick=False))
        assert mla_prefill._heuristic(kind, 192, 128, torch.bfloat16, CPU) in kept


def test_the_triton_route_sweep_stores_what_the_kernel_then_uses(tuning_dir, monkeypatch):
    from ds_kernels.kernels import route

    tiny = dict(BLOCK_T=[1, 4], num_warps=[4])
    monkeypatch.setitem(spaces.SPACES, ("route", "triton"), (tiny, tiny))
    shape = dict(E=16, n_group=4, topk_group=2, k=3)
    [row] = sweep.sweep("route", CPU, torch.float32, shapes=[shape], buckets=[6], quick=True,
                        out_dir=tuning_dir, backend="triton")
    assert row["heuristic_ok"] and row["rejected"] == 0 and row["candidates"] == 2
    heuristic = dict(BLOCK_T=8, num_warps=4)  # 6 tokens: the next power of two
    assert route._config(6, 16, 16, torch.float32, CPU) == {**heuristic, **row["best"]}


def _tiny_triton_spaces(monkeypatch):
    """Two candidates per Triton kernel: the interpreter runs each a few times. (The full
    space is also what ds_kernels checks stored configs' keys against.)"""
    small_gemm = dict(BLOCK_M=[16], BLOCK_N=[16, 32], BLOCK_K=[16], GROUP_M=[1], num_warps=[4],
                      num_stages=[1])
    for op, space in [("mla_decode", dict(BLOCK_N=[16, 32], min_split_tokens=[16], num_warps=[4],
                                          num_stages=[1])),
                      ("mla_prefill", dict(BLOCK_M=[16, 32], BLOCK_N=[16], num_warps=[4],
                                           num_stages=[1])),
                      ("sparse_mla", dict(BLOCK_N=[16, 32], min_split_tokens=[16],
                                          num_warps=[4], num_stages=[1])),
                      ("lightning_indexer", dict(BLOCK_N=[16, 32], min_split_keys=[16],
                                                 num_warps=[4], num_stages=[1])),
                      ("fused_moe", small_gemm), ("grouped_mm", small_gemm),
                      ("quant_linear", small_gemm)]:
        monkeypatch.setitem(spaces.SPACES, (op, "triton"), (space, space))


TINY = {"mla_decode": (dict(Hq=4, Dc=32, Dr=16, page=16, context=100), 3),
        "mla_prefill": (dict(H=2, Dqk=24, Dv=16, causal=1, seqs=2), 40),
        "fused_moe": (dict(E=4, I=8, H=16, k=2), 5),
        "grouped_mm": (dict(E=3, N=16, K=24), 7),
        "sparse_mla": (dict(Hq=4, Dc=32, Dr=16, page=16, top_k=40), 3),
        "lightning_indexer": (dict(H=4, D=16, page=16, top_k=16, context=40), 2)}
KERNELS = {("mla_prefill", "triton"): ["fwd", "dkdv", "dq"],
           ("mla_prefill", "torch"): ["fwd", "bwd"],
           **{(op, b): [None, "backward"] for op in ("fused_moe", "grouped_mm")
              for b in ("triton", "torch")}}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", list(TINY))
def test_sweeps_of_forward_and_backward_store_what_lookups_then_return(tuning_dir, monkeypatch,
                                                                       backend, op):
    """Space -> check -> time -> store, on the torch path and on the Triton kernels (in the
    interpreter), for every kernel tuned apart; then the lookup returns each stored entry."""
    _tiny_triton_spaces(monkeypatch)
    shape, bucket = TINY[op]
    rows = sweep.sweep(op, CPU, torch.float32, shapes=[shape], buckets=[bucket], quick=True,
                       backward=True, out_dir=tuning_dir, backend=backend)
    kernels = KERNELS.get((op, backend), [None])
    assert [r["shape"] for r in rows] == [tuning.shape_key(op, k, **shape) for k in kernels]
    assert all(r["heuristic_ok"] and r["rejected"] == 0 and "best" in r for r in rows)
    [path] = tuning_dir.glob(f"{op}__{backend}__*.json")
    entries = json.loads(path.read_text())["entries"]
    default = dict.fromkeys(spaces.SPACES[op, backend][1], "heuristic")
    for row, kernel in zip(rows, kernels):
        assert entries[row["shape"]] == {str(bucket): row["best"]}
        used = tuning.config(op, backend, row["shape"], bucket, torch.float32, CPU, default,
                             kernel=kernel)
        assert used == {**default, **row["best"]}


QUANTISED_TINY = {"fused_moe": (dict(E=3, I=32, H=32, k=2), 3),
                  "grouped_mm": (dict(E=3, N=16, K=64), 5),
                  "quant_linear": (dict(N=24, K=64), 3)}


# The interpreter's grouped GEMMs take seconds a run: those get one format (both formats share
# the key scheme and the kernel; test_fused_moe / test_grouped_mm test the numerics of each).
@pytest.mark.parametrize("backend, op, weights", [
    ("triton", "fused_moe", "fp8"), ("triton", "grouped_mm", "mxfp4"),
    *[(backend, op, weights) for backend, op in [("triton", "quant_linear"),
                                                 ("torch", "fused_moe"), ("torch", "quant_linear")]
      for weights in ("fp8", "mxfp4")]])
def test_sweeps_on_quantised_weights_store_under_the_keys_the_ops_look_up(tuning_dir, monkeypatch,
                                                                          backend, op, weights):
    """A --dtype fp8 / mxfp4 sweep tunes the kernels the op runs on such weights, forward and
    backward, apart from the unquantised ones; running the op on quantised weights looks up
    exactly the stored keys, and each lookup returns what was stored. (Timings are faked: the
    keys are under test here, and the interpreter would time each candidate for seconds.)"""
    _tiny_triton_spaces(monkeypatch)
    monkeypatch.setattr(sweep, "measure", lambda fn, device: sweep.Timing(1e-3, 1.0))
    shape, bucket = QUANTISED_TINY[op]
    rows = sweep.sweep(op, CPU, torch.float32, shapes=[shape], buckets=[bucket], quick=True,
                       backward=True, out_dir=tuning_dir, backend=backend, weights=weights)
    if op == "quant_linear":
        kernels = [None, "backward"] if backend == "triton" else [None]
    else:
        kernels = [weights, f"{weights}-backward"]
    keys = [tuning.shape_key(op, k, fmt=weights, **shape) for k in kernels]
    assert [r["shape"] for r in rows] == keys
    assert all(r["heuristic_ok"] and r["rejected"] == 0 and "best" in r for r in rows)
    if backend == "torch" and op == "fused_moe":  # grouped_mm would run mm_loop again
        assert all(r["candidates"] == 2 for r in rows)

    looked_up = []
    real_config = tuning.config

    def recording(op_, backend_, key, *args, **kwargs):
        looked_up.append((op_, backend_, key))
        return real_config(op_, backend_, key, *args, **kwargs)
    monkeypatch.setattr(tuning, "config", recording)
    # The last case is the backward where it is tuned apart; it runs the forward too.
    case = cases.make_cases(op, shape, bucket, backend, CPU, torch.float32, quick=True,
                            backward=True, weights=weights)[-1]
    with ds_kernels.use_backend(backend):
        case.run()
    assert set(looked_up) >= {(op, backend, key) for key in keys}
    monkeypatch.setattr(tuning, "config", real_config)
    entries = json.loads(next(tuning_dir.glob(f"{op}__{backend}__*.json")).read_text())["entries"]
    default = dict.fromkeys(spaces.SPACES[op, backend][1], "heuristic")
    for row, kernel in zip(rows, kernels):
        assert entries[row["shape"]] == {str(bucket): row["best"]}
        assert tuning.config(op, backend, row["shape"], bucket, torch.float32, CPU, default,
                             kernel=kernel) == {**default, **row["best"]}


@pytest.mark.parametrize("args, match", [
    (("grouped_mm", "torch", dict(E=3, N=16, K=64), "fp8"), "sweep --op quant_linear"),
    (("quant_linear", "torch", dict(N=24, K=64), None), "--dtype fp8 or --dtype mxfp4"),
    (("quant_linear", "triton", dict(N=24, K=48), "mxfp4"), "groups of 32, but K=48"),
    (("route", "triton", dict(E=16, n_group=4, topk_group=2, k=3), "fp8"), "ops with one"),
])
def test_a_sweep_that_cannot_apply_to_its_weights_is_named(tuning_dir, args, match):
    op, backend, shape, weights = args
    with pytest.raises(ValueError, match=match):
        sweep.sweep(op, CPU, torch.float32, shapes=[shape], buckets=[2], quick=True,
                    out_dir=tuning_dir, backend=backend, weights=weights)


def test_the_cli_takes_fp8_weights_and_their_activations_dtype(tuning_dir, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(sweep, "sweep", lambda op, device, dtype, **kw: seen.update(
        dtype=dtype, weights=kw["weights"]) or [])
    cli.main(["sweep", "--op", "quant_linear", "--dtype", "fp8", "--activations", "bfloat16"])
    assert seen == dict(dtype=torch.bfloat16, weights="fp8")
    cli.main(["sweep", "--op", "fused_moe", "--dtype", "mxfp4"])
    assert seen == dict(dtype=torch.float32, weights="mxfp4")
    with pytest.raises(SystemExit):
        cli.main(["sweep", "--op", "fused_moe", "--dtype", "float16", "--activations", "float32"])
    assert "--activations goes with --dtype fp8 or mxfp4" in capsys.readouterr().err


def test_stored_cpu_knobs_change_what_the_op_does(tuning_dir, monkeypatch):
    """A stored chunk size of one page makes the torch mla_decode gather page by page (two
    GEMMs a chunk), with the same answer."""
    from test_mla_decode import make_cache

    g = torch.Generator().manual_seed(0)
    kv_cache, block_table, lens = make_cache(g, [80, 33], 16, 48, torch.float32)
    q_nope, q_pe = torch.randn(2, 4, 32, generator=g), torch.randn(2, 4, 16, generator=g)
    bmm_calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: bmm_calls.append(1) or real_bmm(*a, **k))

    def run():
        bmm_calls.clear()
        with ds_kernels.use_backend("torch"):
            out = ds_kernels.mla_decode(q_nope, q_pe, kv_cache, block_table, lens, 0.2)[0]
        return out, len(bmm_calls)

    before, calls_before = run()
    store.write(tuning_dir, "mla_decode", "torch", tuning.device_name(CPU), torch.float32,
                tuning.versions(), {tuning.shape_key("mla_decode", Hq=4, Dc=32, Dr=16, page=16):
                                    {"2": {"chunk_elements": 1}}}, source="test")
    after, calls_after = run()
    assert (calls_before, calls_after) == (2, 2 * 5)  # 80 tokens: 5 pages of 16
    torch.testing.assert_close(after, before)


def test_a_shape_with_wrong_dims_is_named(capsys):
    with pytest.raises(SystemExit, match="a mla_decode shape needs exactly Dc, Dr, Hq, context, "
                                         "page; got E"):
        cli.main(["sweep", "--op", "mla_decode", "--shapes", "E=4", "--quick"])


def test_a_bucket_below_one_token_is_named(capsys):
    with pytest.raises(SystemExit, match="token buckets must be positive, got 0"):
        cli.main(["sweep", "--op", "route", "--tokens", "0", "8", "--quick"])


def test_a_recorded_model_routing_is_replayed(tuning_dir, tmp_path, monkeypatch, capsys):
    """ds_model records the experts its MoE layers chose; the sweep replays exactly those."""
    from safetensors.torch import load_file

    from ds_model.__main__ import main as generate

    path = tmp_path / "routing.safetensors"
    generate(["generate", "--batch", "2", "--prompt-len", "5", "--max-new-tokens", "3",
              "--record-routing", str(path)])
    recorded = load_file(path)
    # tiny: two MoE layers (the first is dense), each saw 2 x 5 prompt tokens + 2 x 2 decoded.
    assert recorded["topk_ids"].shape == (2 * 14, 4) and len(recorded) == 3
    assert "routing: (28, 4) topk_ids" in capsys.readouterr().err

    seen = []
    real = ds_kernels.fused_moe
    monkeypatch.setattr(ds_kernels, "fused_moe", lambda *a: seen.append(a[4]) or real(*a))
    tiny_moe = "E=16,I=64,H=128,k=4"
    cli.main(["sweep", "--op", "fused_moe", "--routing", str(path), "--shapes", tiny_moe,
              "--tokens", "30", "--quick"])
    replay = recorded["topk_ids"][torch.arange(30) % 28]
    assert seen and all(torch.equal(ids.cpu().int(), replay) for ids in seen)
    with pytest.raises(SystemExit, match="the recorded routing uses expert 15, but E=8"):
        cli.main(["sweep", "--op", "fused_moe", "--routing", str(path), "--shapes",
                  "E=8,I=64,H=128,k=4", "--tokens", "30"])


def test_a_recorded_routing_with_another_k_is_named_with_the_shape_to_pass(tmp_path):
    path = tmp_path / "ids.npy"
    numpy.save(path, numpy.array([[0, 1], [2, 3], [1, 0]], dtype=numpy.int32))
    with pytest.raises(SystemExit, match=r"the recorded routing has k=2 experts per token, but "
                       r"the shape E=8,I=16,H=32,k=4 has k=4; .* --shapes E=8,I=16,H=32,k=2$"):
        cli.main(["sweep", "--op", "fused_moe", "--routing", str(path), "--shapes",
                  "E=8,I=16,H=32,k=4", "--tokens", "4"])


def test_a_missing_routing_file_is_one_clear_line(tmp_path):
    with pytest.raises(SystemExit, match=r"--routing .*absent\.npy: no such file"):
        cli.main(["sweep", "--op", "fused_moe", "--routing", str(tmp_path / "absent.npy")])


def test_shapes_too_large_for_the_device_are_refused_before_allocating(tuning_dir, monkeypatch):
    with pytest.raises(SystemExit, match=r"fused_moe at E=256,I=65536,H=65536,k=8 with 16 tokens "
                       r"needs at least 12288\.0 GiB for its inputs, but cpu has .* GiB free"):
        cli.main(["sweep", "--op", "fused_moe", "--shapes", "E=256,I=65536,H=65536,k=8",
                  "--tokens", "1", "16"])
    # Against the memory the device has now.
    monkeypatch.setattr(cases, "free_memory_bytes", lambda device: 2**30)
    with pytest.raises(SystemExit, match="needs at least 2.0 GiB for its inputs, but cpu has "
                       "1.0 GiB free; sweep smaller --shapes or --tokens"):
        cli.main(["sweep", "--op", "grouped_mm", "--shapes", "E=4,N=16384,K=8192", "--tokens",
                  "64"])


@pytest.mark.parametrize("kernel,b_tiles", [(None, 2), ("fp8", 2), ("mxfp4", 2),
                                             ("backward", 1), ("fp8-backward", 1)])
def test_fused_moe_forward_configs_fit_both_swiglu_tiles(monkeypatch, kernel, b_tiles):
    """The SwiGLU forward loads a gate and an up tile of B for plain and quantised weights
    alike: the heuristic sizes its pipeline for both on a ~100 KB GPU."""
    monkeypatch.setattr(tuning, "shared_memory_bytes", lambda device: 99 * 1024)
    chosen = tuning.gemm_config("fused_moe", kernel, dict(E=8, I=2048, H=7168, k=8), 4096, 4096,
                                4096, 7168, torch.bfloat16, CPU)
    assert tuning.gemm_staged_bytes(chosen, torch.bfloat16, b_tiles) <= 99 * 1024
    assert (tuning.gemm_staged_bytes(chosen, torch.bfloat16, 2) > 99 * 1024) == (b_tiles == 1)
