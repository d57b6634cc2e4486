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
    for n in (2, 300):
        calls.clear()
        with ds_kernels.use_backend("torch"):
            ds_kernels.route(torch.randn(n, 256), 8, n_group=8, topk_group=4)
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
    """Timings scripted: the heuristic, the candidates numpy, sort and topk, then (for a win)
    pairs of heuristic and winner alternated."""
    clock = iter(times)
    monkeypatch.setattr(sweep, "time_once", lambda fn, device: next(clock))
    rows = sweep.sweep("route", CPU, torch.float32, buckets=[8], out_dir=tuning_dir)
    assert rows[0]["best"] == stored
    assert _route_strategy(8, "default") == stored.get("strategy", "default")


def _route_strategy(n, default):
    return tuning.config("route", "torch", "E=256", n, torch.float32, CPU,
                         dict(strategy=default))["strategy"]


def _file(tuning_dir, op="route", version=None):
    return tuning_dir / tuning.file_name(op, "torch", tuning.device_name(CPU), torch.float32,
                                         version or tuning.versions())


@pytest.mark.parametrize("content", ["{not json", '{"format": 1, "entries": {"E=256": {"1": ',
                                     '{"format": 99, "entries": {}}', "[]"])
def test_corrupt_or_partial_files_are_reported_once_and_ignored(tuning_dir, caplog, content):
    _file(tuning_dir).write_text(content)
    with caplog.at_level(logging.WARNING, logger="ds_kernels"):
        for _ in range(3):
            assert _route_strategy(8, "topk") == "topk"
            with ds_kernels.use_backend("torch"):
                ds_kernels.route(torch.randn(8, 256), 8, n_group=8, topk_group=4)
    assert sum("ignoring tuning file" in r.getMessage() for r in caplog.records) == 1


def test_configs_of_other_versions_are_detected_not_reused(tuning_dir, caplog):
    old = dict(tuning.versions(), triton="3.0.0")
    _file(tuning_dir, version=old).write_text(json.dumps(
        {"format": 1, "entries": {"E=256": {"8": {"strategy": "sort"}}}}))
    with caplog.at_level(logging.WARNING, logger="ds_kernels"):
        assert _route_strategy(8, "topk") == "topk"
    assert any("tuned for other triton/torch versions" in r.getMessage() for r in caplog.records)


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

    monkeypatch.setitem(spaces.SPACES, ("route", "triton"), (None, dict(
        BLOCK_T=[1, 4], num_warps=[4])))
    shape = dict(E=16, n_group=4, topk_group=2, k=3)
    [row] = sweep.sweep("route", CPU, torch.float32, shapes=[shape], buckets=[6], quick=True,
                        out_dir=tuning_dir, backend="triton")
    assert row["heuristic_ok"] and row["rejected"] == 0 and row["candidates"] == 2
    heuristic = dict(BLOCK_T=8, num_warps=4)  # 6 tokens: the next power of two
    assert route._config(6, 16, 16, torch.float32, CPU) == {**heuristic, **row["best"]}


def _tiny_triton_spaces(monkeypatch):
    """Two candidates per Triton kernel: the interpreter runs each a few times."""
    small_gemm = dict(BLOCK_M=[16], BLOCK_N=[16, 32], BLOCK_K=[16], GROUP_M=[1], num_warps=[4],
                      num_stages=[1])
    for op, space in [("mla_decode", dict(BLOCK_N=[16, 32], min_split_tokens=[16], num_warps=[4],
                                          num_stages=[1])),
                      ("mla_prefill", dict(BLOCK_M=[16, 32], BLOCK_N=[16], num_warps=[4],
                                           num_stages=[1])),
                      ("fused_moe", small_gemm), ("grouped_mm", small_gemm)]:
        monkeypatch.setitem(spaces.SPACES, (op, "triton"), (None, space))


TINY = {"mla_decode": (dict(Hq=4, Dc=32, Dr=16, page=16, context=100), 3),
        "mla_prefill": (dict(H=2, Dqk=24, Dv=16, causal=1, seqs=2), 40),
        "fused_moe": (dict(E=4, I=8, H=16, k=2), 5),
        "grouped_mm": (dict(E=3, N=16, K=24), 7)}
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
