"""Expert parallelism: MoE(ep_group=...) on 2 and 4 gloo ranks against the unsharded layer
(outputs, d input, each rank's expert gradients, the replicated router's and shared expert's),
with a rank without tokens, all tokens on one rank's experts and replicated experts; placement
errors, and ranks given different maps."""

import pytest
import torch
import torch.distributed as dist

from ds_kernels import MoE, ranks
from ds_kernels.expert_parallel import placement
from numerics import assert_close

H, I, E, K = 16, 8, 8, 2


def _layer(**ep):
    """A tiny DeepSeek-V3 MoE layer with deterministic random parameters (the same on every
    rank): 8 experts, top-2 of 2 groups, one shared expert."""
    moe = MoE(H, I, E, K, n_group=2, topk_group=2, routed_scaling_factor=2.5, **ep)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(moe.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return moe


def _ep_against_unsharded(rank, world, counts, expert_map, hot):
    """One rank: the EP layer on its tokens, and (for comparison) the unsharded layer on every
    rank's tokens in this process, with the loss sum_r (out_r * grad_r).sum(). ``hot``: experts
    every token picks (their correction bias lifted), or None."""
    full = _layer()
    if hot is not None:
        with torch.no_grad():
            full.gate.e_score_correction_bias[hot] += 100.0
    ep = _layer(ep_group=dist.group.WORLD, expert_map=expert_map)
    ep.load_state_dict(full.state_dict())
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, H, generator=g) for n in counts]
    grads = [torch.randn(n, H, generator=g) for n in counts]

    x = xs[rank].clone().requires_grad_()
    out = ep(x)
    (out * grads[rank]).sum().backward()
    leaves = [t.clone().requires_grad_() for t in xs]
    sum((full(t) * d).sum() for t, d in zip(leaves, grads)).backward()
    experts = {n: p.grad for n, p in ep.experts.named_parameters()}
    # state_dict() holds this rank's experts under the unsharded keys, and loads back.
    own = ep.state_dict()
    again = _layer(ep_group=dist.group.WORLD, expert_map=expert_map)
    again.load_state_dict(own)
    return dict(
        own_rows=own["experts.gate_up_proj"].shape[0], reloaded=again(xs[rank]).detach(),
        out=out.detach(), want=full(xs[rank]).detach(), d_x=x.grad, want_d_x=leaves[rank].grad,
        local_ids=ep.experts.local_ids, experts=experts,
        want_experts={n: p.grad for n, p in full.experts.named_parameters()},
        replicated={n: p.grad for n, p in ep.named_parameters() if not n.startswith("experts.")},
        want_replicated={n: p.grad for n, p in full.named_parameters()
                         if not n.startswith("experts.")})


def _check(results, world):
    rank0 = results[0]
    for r, res in enumerate(results):
        assert_close(res["out"], res["want"], torch.float32, reduction=H + I, what=f"rank {r} out")
        assert res["own_rows"] == len(res["local_ids"]) and torch.equal(res["reloaded"],
                                                                       res["out"])
        assert_close(res["d_x"], res["want_d_x"], torch.float32, reduction=2 * (H + I),
                     what=f"rank {r} d x")
    # Expert gradients: each expert's (summed over its replicas) equals the unsharded one.
    for name, want in rank0["want_experts"].items():
        got = torch.zeros_like(want)
        for res in results:
            got[res["local_ids"]] += res["experts"][name]
        assert_close(got, want, torch.float32, reduction=sum(len(r["out"]) for r in results),
                     what=f"d {name}")
    # Replicated parameters (router, shared expert): the ranks' gradients sum to the unsharded.
    for name, want in rank0["want_replicated"].items():
        got = sum(res["replicated"][name] for res in results)
        assert_close(got, want, torch.float32, reduction=64, what=f"d {name}")


@pytest.mark.parametrize("world, counts", [(2, [6, 3]), (4, [5, 0, 3, 7])])
def test_ep_moe_equals_the_unsharded_layer(tmp_path, world, counts):
    """World 2 and 4, ragged token counts and a rank with no tokens at all."""
    results = ranks.run(world, _ep_against_unsharded, counts, None, None,
                              tmp_path=tmp_path)
    _check(results, world)
    assert [res["local_ids"] for res in results] == placement(E, world)


def test_all_tokens_on_one_ranks_experts(tmp_path):
    """Every token's two experts are among rank 0's: rank 1 serves nothing."""
    results = ranks.run(2, _ep_against_unsharded, [7, 4], None, [1, 2],
                              tmp_path=tmp_path)
    _check(results, 2)
    assert results[1]["experts"]["gate_up_proj"].abs().sum() == 0


def test_replicated_experts_give_the_same_numbers(tmp_path):
    """Hot experts 3 and 4 on both ranks (replicas): their assignments split between them."""
    expert_map = [[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]]
    results = ranks.run(2, _ep_against_unsharded, [9, 6], expert_map, [3, 4],
                              tmp_path=tmp_path)
    _check(results, 2)
    assert results[1]["experts"]["gate_up_proj"][2:].abs().sum() == 0  # 5, 6, 7: idle
    # Both replicas served assignments (rank 0 holds 3, 4 at rows 3, 4; rank 1 at rows 0, 1).
    assert results[0]["experts"]["gate_up_proj"][3:5].abs().sum(dim=(1, 2)).min() > 0
    assert results[1]["experts"]["gate_up_proj"][0:2].abs().sum(dim=(1, 2)).min() > 0


def _wrong_backend(rank, world):
    """The check that the group's backend takes the tensors' device, against the backends a
    GPU or NPU run would have (this machine's group is gloo)."""
    from ds_kernels import expert_parallel

    layer = _layer(ep_group=dist.group.WORLD)
    out = layer(torch.randn(3, H)).shape  # gloo, CPU tensors: fine
    errors = []
    for backend, device in [("nccl", "cpu"), ("gloo", "cuda"), ("cpu:gloo,cuda:nccl", "cuda"),
                            ("cpu:nccl", "cpu")]:
        expert_parallel.dist.get_backend = lambda group, b=backend: b
        try:
            expert_parallel.check_backend(dist.group.WORLD, torch.device(device))
            errors.append(None)
        except ValueError as error:
            errors.append(str(error))
    return out, errors


def test_a_group_of_the_wrong_backend_for_the_device_is_named(tmp_path):
    (shape, errors), = ranks.run(1, _wrong_backend, tmp_path=tmp_path)
    assert shape == (3, H)
    assert "the ep_group's backend 'nccl' cannot exchange cpu tensors" in errors[0]
    assert "use a group of backend gloo or mpi" in errors[0]
    assert "backend 'gloo' cannot exchange cuda tensors" in errors[1] and "nccl" in errors[1]
    assert errors[2] is None  # a mixed group: NCCL for CUDA tensors
    assert "'cpu:nccl' cannot exchange cpu tensors" in errors[3]


def _fp8_wire(rank, world, counts):
    """The layer with FP8 dispatch on this rank's tokens, beside the unsharded layer whose
    routed experts see them FP8-quantised (straight through for d input); and the order of one
    forward's events."""
    from ds_kernels import expert_parallel
    from ds_kernels.cpu.quantize import fake_quantize_fp8_activations

    full = _layer()
    ep = _layer(ep_group=dist.group.WORLD, ep_wire="fp8")
    ep.load_state_dict(full.state_dict())
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, H, generator=g) * 3 for n in counts]
    grads = [torch.randn(n, H, generator=g) for n in counts]
    events = []
    transfer = expert_parallel._Transfer
    sent = {}

    class Logged(transfer):
        def __init__(self, wire, rows, *args):
            events.append(f"send {wire.name}")
            super().__init__(wire, rows, *args)
            sent.setdefault(wire.name, [p.dtype for p in wire.encode(rows)])

        def rows(self, dtype):
            events.append("arrive")
            return super().rows(dtype)

    expert_parallel._Transfer = Logged
    ep.shared_experts.register_forward_hook(lambda *_: events.append("shared"))
    x = xs[rank].clone().requires_grad_()
    out = ep(x)
    forward_events = list(events)
    (out * grads[rank]).sum().backward()
    expert_parallel._Transfer = transfer

    leaf = xs[rank].clone().requires_grad_()
    weights, ids = full.gate(leaf)
    quantised = leaf + (fake_quantize_fp8_activations(leaf) - leaf).detach()
    want = full.experts(quantised, ids, weights) + full.shared_experts(leaf)
    (want * grads[rank]).sum().backward()
    return dict(out=out.detach(), want=want.detach(), d_x=x.grad, want_d_x=leaf.grad,
                unquantised=full(xs[rank]).detach(), events=forward_events, sent=sent)


@pytest.mark.parametrize("counts", [[6, 5], [4, 0]])
def test_fp8_dispatch_equals_the_layer_on_quantised_tokens(tmp_path, counts):
    """ep_wire="fp8": the routed experts get each token's e4m3 codes and per-128-column scales
    (1 byte a value on the wire, not 4), d input passes the quantisation straight through; the
    shared expert runs after the rows leave and before they are awaited."""
    for r, res in enumerate(ranks.run(2, _fp8_wire, counts, tmp_path=tmp_path)):
        assert_close(res["out"], res["want"], torch.float32, reduction=H + I, what=f"rank {r}")
        assert_close(res["d_x"], res["want_d_x"], torch.float32, reduction=2 * (H + I),
                     what=f"rank {r} d x")
        if counts[r]:  # the quantisation is felt
            assert (res["out"] - res["unquantised"]).abs().max() > 1e-3
        assert res["events"] == ["send fp8", "shared", "arrive", "send native", "arrive"]
        assert res["sent"] == {"fp8": [torch.uint8, torch.float32], "native": [torch.float32]}


def _mismatched_maps(rank, world):
    expert_map = [[0, 1, 2, 3], [4, 5, 6, 7]] if rank == 0 else [[0, 1, 2, 4], [3, 5, 6, 7]]
    _layer(ep_group=dist.group.WORLD, expert_map=expert_map)


def test_ranks_given_different_maps_fail_at_construction(tmp_path):
    with pytest.raises(ranks.RankFailed, match="placement differs from that of ranks"):
        ranks.run(2, _mismatched_maps, tmp_path=tmp_path)


@pytest.mark.parametrize("args, match", [
    ((10, 4, None), "10 experts do not split evenly over 4 ranks: pass an expert_map"),
    ((8, 2, [[0, 1, 2, 3]]), "must list the experts of each of the 2 ranks, got 1"),
    ((8, 2, [[0, 1, 2, 3], [4, 5, 6]]), r"places no rank on experts \[7\]"),
    ((8, 2, [[0, 1, 2, 3], []]), r"expert_map\[1\] is empty"),
    ((8, 2, [[0, 1, 1, 3], [4, 5, 6, 7, 2]]), "must hold distinct expert ids"),
    ((8, 2, [[0, 1, 2, 3], [4, 5, 6, 8]]), r"in \[0, 8\)"),
])
def test_bad_placements_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        placement(*args)


def test_ep_arguments_need_their_group():
    with pytest.raises(ValueError, match="sharded over the ranks of an ep_group: pass one"):
        MoE(H, I, E, K, expert_map=[[0, 1, 2, 3], [4, 5, 6, 7]])
    with pytest.raises(ValueError, match="sharded over the ranks of an ep_group: pass one"):
        MoE(H, I, E, K, ep_wire="fp8")
    with pytest.raises(ValueError, match=r"unknown expert-parallel wire format 'int4'; known: "
                                         r"\['fp8', 'native'\]"):
        MoE(H, I, E, K, ep_group=object(), ep_wire="int4")
    with pytest.raises(TypeError, match="lacks \\['decode', 'row_bytes'\\]"):
        MoE(H, I, E, K, ep_group=object(), ep_wire=type("Half", (), {"encode": len})())
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        MoE(H, I, E, K, ep_group=object())


def _ep_generate(rank, world, prompt_sets, budgets):
    """Greedy tokens of the tiny model on this rank's prompts, expert-parallel and unsharded."""
    from ds_model import DeepSeekForCausalLM, ModelConfig

    config = ModelConfig.preset("tiny")
    full = DeepSeekForCausalLM(config).init_weights(
        std=0.2, generator=torch.Generator().manual_seed(0)).eval()
    ep = DeepSeekForCausalLM(config, ep_group=dist.group.WORLD).eval()
    ep.load_state_dict(full.state_dict())
    prompts = [torch.tensor(p) for p in prompt_sets[rank]]
    got = ep.generate(prompts, budgets[rank])
    want = full.generate(prompts, budgets[rank]) if prompts else []
    return [g.tolist() for g in got], [w.tolist() for w in want]


@pytest.mark.parametrize("world, prompt_sets, budgets", [
    (2, [[[1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12, 13, 14, 15]], [[20, 21, 22]]], [6, 2]),
    (4, [[[1, 2, 3]], [], [[5, 6, 7, 8, 9, 10, 11], [30, 31]], [[40, 41, 42, 43]]], [5, 3, 7, 0]),
])
def test_ep_generate_gives_the_unsharded_greedy_tokens(tmp_path, world, prompt_sets, budgets):
    """Ragged prompts, ranks with different budgets (one finishing first, one with none) and
    a rank without prompts: each rank's tokens are the single-process ones, and no rank
    hangs on one that finished."""
    for r, (got, want) in enumerate(ranks.run(world, _ep_generate, prompt_sets, budgets,
                                              tmp_path=tmp_path)):
        assert got == want, f"rank {r}"
        assert [len(g) for g in got] == [len(p) + budgets[r] for p in prompt_sets[r]]


def _ep_from_pretrained(rank, world, folder):
    """This rank's from_pretrained(ep_group=...): which expert tensors it read, what it holds,
    and its greedy tokens against the single-process model's."""
    import safetensors

    from ds_model import DeepSeekForCausalLM, loading

    read = []

    class Recording:
        def __init__(self, *args, **kwargs):
            self.file = safetensors.safe_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

        def get_slice(self, key):
            read.append(key)
            return self.inner.get_slice(key)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    loading.safe_open = Recording
    ep = DeepSeekForCausalLM.from_pretrained(folder, ep_group=dist.group.WORLD)
    loading.safe_open = safetensors.safe_open
    full = DeepSeekForCausalLM.from_pretrained(folder)
    prompt = [torch.arange(3 + rank) + 5 * rank]
    held = {n: tuple(p.shape) for n, p in ep.named_parameters() if ".experts." in n}
    experts = ep.model.layers[1].mlp.experts
    return dict(read=read, held=held, local=experts.local_ids, kind=type(experts).__name__,
                got=ep.generate(prompt, 4)[0].tolist(), want=full.generate(prompt, 4)[0].tolist())


@pytest.mark.parametrize("layout, experts", [("per expert", None), ("fused", None),
                                             ("per expert", "fp8"), ("fused", "mxfp4")])
def test_ep_from_pretrained_reads_only_the_ranks_experts(tmp_path, layout, experts):
    """The published per-expert layout: other ranks' expert tensors (and scales) are never
    read; the fused [E, ...] layout: only this rank's rows. Each rank holds E/W experts a layer
    (quantised checkpoints: their codes and scales, quantised) and greedy decodes as the
    single-process model."""
    from test_loading import config_of
    from tiny_deepseek import FP8_CONFIG, QUANTIZED_CONFIG, hf_model, per_expert
    from tiny_deepseek import quantize_tensors, write_checkpoint

    hf = hf_model() if experts is None else hf_model(**QUANTIZED_CONFIG)
    state = hf.state_dict()
    tensors = per_expert(state) if layout == "per expert" else state
    config = config_of(hf)
    if experts is not None:
        tensors, _ = quantize_tensors(tensors, experts=experts)
        config["quantization_config"] = {**FP8_CONFIG, "expert_dtype": experts.replace(
            "mxfp4", "fp4")}
    folder = write_checkpoint(tmp_path / "ckpt", config, tensors)
    E = hf.config.n_routed_experts
    results = ranks.run(2, _ep_from_pretrained, str(folder), tmp_path=tmp_path)
    for rank, res in enumerate(results):
        assert res["got"] == res["want"], f"rank {rank}"
        assert res["local"] == list(range(rank * E // 2, (rank + 1) * E // 2))
        assert res["kind"] == ("EPExperts" if experts is None else "EPQuantExperts")
        assert all(shape[0] == E // 2 for shape in res["held"].values())
        if experts is not None:
            assert any(name.endswith("gate_up_proj_scale_inv") for name in res["held"])
        experts_read = {int(k.split(".")[5]) for k in res["read"] if ".experts." in k
                        and k.split(".")[5].isdigit()}  # model.layers.L.mlp.experts.J.*
        if layout == "per expert":
            assert experts_read == set(res["local"]), f"rank {rank} read experts {experts_read}"
        else:
            assert not experts_read and any("experts.gate_up_proj" in k for k in res["read"])


def test_memory_estimates_count_a_ranks_share_of_the_experts():
    """DeepSeek-V3 on 8 expert-parallel ranks: each holds 1/8 of the 58 MoE layers' 256 routed
    experts (3 x 7168 x 2048 bf16 each), and the rest whole - still more than this machine."""
    from ds_model import ModelConfig
    from ds_model.loading import check_fits

    config = ModelConfig.preset("deepseek-v3-671b")
    held = [config.weight_bytes(torch.bfloat16, expert_ranks=w)[0] for w in (1, 8)]
    routed = 58 * 256 * 3 * 7168 * 2048 * 2
    assert held[0] - held[1] == pytest.approx(routed * 7 / 8, rel=1e-6)
    with pytest.raises(ValueError, match="need"):
        check_fits(config, torch.bfloat16, torch.device("cpu"), "v3", expert_ranks=8)


@pytest.mark.parametrize("nodes, options", [
    (1, []), (1, ["--quantize", "fp8", "--ep-wire", "fp8"]), (2, [])])
def test_the_cli_runs_under_torchrun(tmp_path, nodes, options):
    """python -m torch.distributed.run --nproc-per-node 2 -m ds_model generate --expert-parallel:
    each rank its own prompts, rank 0 the throughput of both; also with FP8 experts and FP8
    dispatch, and as two nodes of one process each (--nnodes 2, both on this machine, meeting
    at --master-addr as separate machines would)."""
    import subprocess
    import sys

    port = str(ranks._free_port())
    generate = ["-m", "ds_model", "generate", "--preset", "tiny", "--expert-parallel", "--batch",
                "2", "--prompt-len", "4", "--max-new-tokens", "3", *options]
    launch = ([["--nproc-per-node", "2", "--master-port", port]] if nodes == 1 else
              [["--nnodes", "2", "--node-rank", str(n), "--nproc-per-node", "1",
                "--master-addr", "127.0.0.1", "--master-port", port] for n in range(2)])
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *how, *generate],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for how in launch]
    try:
        outs = [proc.communicate(timeout=ranks.TIMEOUT_S) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    stdout, stderr = "".join(o for o, _ in outs), "".join(e for _, e in outs)
    assert all(proc.returncode == 0 for proc in procs), stderr[-3000:]
    assert ("fp8 x" in stderr) == bool(options)  # the weights line counts FP8 modules
    assert "decode: 8 tokens on 2 ranks" in stdout  # 2 ranks x 2 sequences x 2 steps
    assert [stdout.count(f"rank {r} sequence") for r in (0, 1)] == [2, 2]


def test_the_cli_outside_torchrun_says_how_to_run_it(monkeypatch, capsys):
    from ds_model import __main__ as cli

    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit, match="runs under torchrun: python -m torch.distributed.run"):
        cli.main(["generate", "--expert-parallel"])


def _one_rank_leaves(rank, world):
    """Rank 1 fails before the layer and leaves; rank 0 runs the layer: its error, and when."""
    import time

    layer = _layer(ep_group=dist.group.WORLD)
    if rank == 1:
        return "left"
    start = time.perf_counter()
    try:
        layer(torch.randn(3, H, generator=torch.Generator().manual_seed(0)))
    except RuntimeError as error:
        return str(error), time.perf_counter() - start
    return "no error", time.perf_counter() - start


def test_a_rank_that_stops_makes_the_others_fail_clearly_not_hang(tmp_path):
    """The other rank's exchange fails within the group's timeout (here 10 s), naming the
    likely cause, instead of waiting forever."""
    results = ranks.run(2, _one_rank_leaves, tmp_path=tmp_path, group_timeout_s=10)
    message, seconds = results[0]
    assert results[1] == "left"
    assert "exchanging tokens with the other ranks failed - a rank stopped" in message
    assert seconds < 30
