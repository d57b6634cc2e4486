"""autotune: sweep on CPU end to end, rejection of wrong candidates, the tuning files' safety
(corrupt, concurrent, other versions) and the vLLM import."""

import json
import logging
import multiprocessing

import pytest
import torch

import ds_kernels
from autotune import __main__ as cli
from autotune import spaces, store, sweep, vllm
from ds_kernels import tuning

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def tuning_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_KERNELS_TUNING_DIR", str(tmp_path))
    tuning.forget_files()
    yield tmp_path
    tuning.forget_files()


def test_sweep_stores_what_the_op_then_uses(tuning_dir, monkeypatch, capsys):
    cli.main(["sweep", "--op", "route", "--tokens", "2", "300", "--quick"])
    assert "| route | E=256 | 300 |" in capsys.readouterr().out
    [path] = tuning_dir.glob("route__torch__*.json")
    stored = json.loads(path.read_text())["entries"]["E=256"]
    assert set(stored) == {"2", "300"}

    calls = []
    original = ds_kernels.reference.route.route
    monkeypatch.setattr("ds_kernels.reference.route.route",
                        lambda *a: calls.append(1) or original(*a))
    for n in (2, 300):
        calls.clear()
        with ds_kernels.use_backend("torch"):
            ds_kernels.route(torch.randn(n, 256), 8, n_group=8, topk_group=4)
        assert bool(calls) == (stored[str(n)]["strategy"] == "sort"), (n, stored)


def test_a_wrong_candidate_is_rejected_and_never_stored(tuning_dir, monkeypatch, capsys):
    import ds_kernels.cpu.fused_moe as cpu_moe

    # A bug in the per-expert strategies only: they skip the last expert with tokens.
    real_groups = cpu_moe.groups
    monkeypatch.setattr(cpu_moe, "groups", lambda offs: real_groups(offs)[:-1])
    rows = sweep.sweep("fused_moe", CPU, torch.float32, shapes=[dict(E=4, I=8, H=16, k=2)],
                       buckets=[5], out_dir=tuning_dir)
    assert rows[0]["rejected"] == 2 and rows[0]["best"] == {"strategy": "grouped_mm"}
    err = capsys.readouterr().err
    assert "rejected {'strategy': 'mm_loop'}: wrong answer" in err
    assert "rejected {'strategy': 'expert_threads'}: wrong answer" in err
    [path] = tuning_dir.glob("fused_moe__*.json")
    assert json.loads(path.read_text())["entries"]["E=4,I=8,H=16,k=2"] == {
        "5": {"strategy": "grouped_mm"}}


def _file(tuning_dir, op="route", version=None):
    return tuning_dir / tuning.file_name(op, "torch", tuning.device_name(CPU), torch.float32,
                                         version or tuning.versions())


@pytest.mark.parametrize("content", ["{not json", '{"format": 1, "entries": {"E=256": {"1": ',
                                     '{"format": 99, "entries": {}}', "[]"])
def test_corrupt_or_partial_files_are_reported_once_and_ignored(tuning_dir, caplog, content):
    _file(tuning_dir).write_text(content)
    with caplog.at_level(logging.WARNING, logger="ds_kernels"):
        for _ in range(3):
            assert tuning.strategy("route", "E=256", 8, torch.float32, CPU, "topk") == "topk"
            with ds_kernels.use_backend("torch"):
                ds_kernels.route(torch.randn(8, 256), 8, n_group=8, topk_group=4)
    assert sum("ignoring tuning file" in r.getMessage() for r in caplog.records) == 1


def test_configs_of_other_versions_are_detected_not_reused(tuning_dir, caplog):
    old = dict(tuning.versions(), triton="3.0.0")
    _file(tuning_dir, version=old).write_text(json.dumps(
        {"format": 1, "entries": {"E=256": {"8": {"strategy": "sort"}}}}))
    with caplog.at_level(logging.WARNING, logger="ds_kernels"):
        assert tuning.strategy("route", "E=256", 8, torch.float32, CPU, "topk") == "topk"
    assert any("tuned for other triton/torch versions" in r.getMessage() for r in caplog.records)


def test_nearest_bucket_is_used(tuning_dir):
    store.write(tuning_dir, "route", "torch", tuning.device_name(CPU), torch.float32,
                tuning.versions(), {"E=256": {"1": {"strategy": "sort"},
                                              "4096": {"strategy": "topk"}}}, source="test")
    pick = [tuning.strategy("route", "E=256", n, torch.float32, CPU, "?") for n in (1, 30, 3000)]
    assert pick == ["sort", "sort", "topk"]


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
    config = tuning.gemm_config("fused_moe", "E=8,I=16,H=32,k=2", 50, 50 * 2 / 8, 32, 32,
                                torch.bfloat16, torch.device("cuda"))
    assert config == dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, num_warps=4,
                          num_stages=3)


@pytest.mark.parametrize("name,match", [("E=8,N=16,device_name=X,dtype=fp8_w8a8.json", "quantized"),
                                        ("fused_moe_E8.json", "not a vLLM")])
def test_vllm_files_that_cannot_apply_are_refused(tmp_path, name, match):
    (tmp_path / name).write_text("{}")
    with pytest.raises(ValueError, match=match):
        vllm.parse(tmp_path / name)


def test_static_pruning_keeps_only_what_fits():
    small_gpu = spaces.gemm_candidates(2, 4096, 7168, torch.bfloat16, CPU, quick=False)
    assert small_gpu and all(c["BLOCK_M"] <= 16 for c in small_gpu)  # 2 rows per expert
    for c in spaces.gemm_candidates(4096, 4096, 7168, torch.bfloat16, CPU, quick=False,
                                    swiglu=True):
        staged = c["num_stages"] * (c["BLOCK_M"] * c["BLOCK_K"] + 2 * c["BLOCK_K"] * c["BLOCK_N"]) * 2
        assert staged <= spaces.shared_memory_bytes(CPU)
