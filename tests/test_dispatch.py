"""Backend selection: device defaults, forcing, clear errors, one-time fallback log."""

import logging
from types import SimpleNamespace

import pytest
import torch

import ds_kernels
from ds_kernels import dispatch

CPU = torch.device("cpu")


def test_every_op_has_a_reference_and_a_torch_path_that_resolve():
    for op, table in dispatch._IMPLEMENTATIONS.items():
        assert {"reference", "torch"} <= set(table), op
        assert set(table) <= set(dispatch.BACKENDS), op
        for backend in table:
            if backend == "ascend":
                continue  # imports torch_npu lazily, inside the call
            assert callable(dispatch._load(table[backend])), (op, backend)


def test_devices_pick_their_backend():
    assert dispatch.preferred_backend(torch.device("cuda")) == "triton"
    # torch.device("npu") needs torch_npu's registration; only .type is read.
    assert dispatch.preferred_backend(SimpleNamespace(type="npu")) == "ascend"
    assert dispatch.preferred_backend(CPU) == "torch"


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("DS_KERNELS_BACKEND", "reference")
    assert dispatch.implementation("route", CPU) is dispatch._load(
        dispatch._IMPLEMENTATIONS["route"]["reference"])
    with ds_kernels.use_backend("torch"):  # the context manager wins over the variable
        assert dispatch.implementation("route", CPU).__module__ == "ds_kernels.cpu.route"


def test_unknown_backend_names_are_rejected(monkeypatch):
    monkeypatch.setenv("DS_KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="DS_KERNELS_BACKEND='cuda' is not a backend"):
        dispatch.implementation("route", CPU)
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        with ds_kernels.use_backend("tpu"):
            pass


def test_forcing_ascend_on_cpu_tensors_raises():
    with ds_kernels.use_backend("ascend"):
        with pytest.raises(ds_kernels.BackendUnavailableError, match="needs npu tensors, got cpu"):
            ds_kernels.route(torch.randn(2, 8), 2)


def test_forcing_triton_on_cpu_without_the_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with ds_kernels.use_backend("triton"):
        with pytest.raises(ds_kernels.BackendUnavailableError, match="TRITON_INTERPRET=1"):
            ds_kernels.moe_align(torch.zeros(2, 2, dtype=torch.int32), 4, 16)


def test_forcing_a_backend_that_lacks_the_op_raises(monkeypatch):
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda backend, device: None)
    with ds_kernels.use_backend("ascend"):
        with pytest.raises(ds_kernels.BackendUnavailableError,
                           match="moe_align has no ascend implementation yet"):
            dispatch.implementation("moe_align", CPU)


def test_automatic_fallback_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "preferred_backend", lambda device: "ascend")
    monkeypatch.setattr(dispatch, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="ds_kernels"):
        for _ in range(3):
            impl = dispatch.implementation("moe_align", CPU)
    assert impl.__module__ == "ds_kernels.cpu.moe_align"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "using the torch path" in messages[0]


def test_eager_inference_skips_the_op_layer_and_nothing_else():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(3, 4)
    assert dispatch.direct_call_allowed(x, None)
    assert not dispatch.direct_call_allowed(x.requires_grad_())       # autograd must record
    with torch.no_grad():
        assert dispatch.direct_call_allowed(x)
    with FakeTensorMode():
        assert not dispatch.direct_call_allowed(torch.randn(3))       # a dispatch mode sees ops


def test_both_paths_give_the_same_answer():
    logits = torch.randn(8, 64)
    direct = ds_kernels.route(logits, 4, n_group=4, topk_group=2)
    through_op = torch.ops.ds_kernels.route(logits, 4, "sigmoid", None, 4, 2, True, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(direct, through_op))


def test_parameters_take_the_direct_path_in_inference():
    weight = torch.nn.Parameter(torch.randn(4, 4))
    with torch.no_grad():
        assert dispatch.direct_call_allowed(weight)
    assert not dispatch.direct_call_allowed(weight)  # requires_grad under grad mode


def test_a_forced_backend_is_seen_by_other_threads():
    # autograd runs CUDA backward passes on its own threads
    import threading

    seen = []
    with ds_kernels.use_backend("reference"):
        worker = threading.Thread(target=lambda: seen.append(dispatch.forced_backend()))
        worker.start()
        worker.join()
    assert seen == ["reference"]


def _small_calls():
    """One small call of every public op: (name, function of the tensors, tensors)."""
    g = torch.Generator().manual_seed(3)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    i32 = lambda *values: torch.tensor(values, dtype=torch.int32)  # noqa: E731
    ids = i32([0, 2], [1, 0], [2, 1], [0, 1])
    cache = r(6, 16, 48)
    table = i32([0, 1, 2], [3, 4, 5])
    return [
        ("route", lambda x: ds_kernels.route(x, 2, n_group=2, topk_group=1), [r(4, 8)]),
        ("moe_align", lambda x: ds_kernels.moe_align(x, 3, 16), [ids]),
        ("grouped_mm", ds_kernels.grouped_mm, [r(5, 8), r(3, 8, 4), i32(1, 1, 5)]),
        ("fused_moe", ds_kernels.fused_moe, [r(4, 8), r(3, 6, 8), r(3, 8, 3), r(4, 2), ids]),
        ("rms_norm", lambda x, w: ds_kernels.rms_norm(x, w, 1e-6), [r(4, 8), r(8)]),
        ("apply_rope", lambda x, c, s: ds_kernels.apply_rope(x, c, s, interleaved=True),
         [r(4, 2, 8), r(4, 4), r(4, 4)]),
        ("mla_cache_write", ds_kernels.mla_cache_write,
         [r(3, 32), r(3, 16), cache, torch.tensor([0, 17, -1])]),
        ("mla_cache_write_fused",
         lambda x, p, w, c, s, kv, slots: ds_kernels.mla_cache_write_fused(
             x, p, w, 1e-6, c, s, kv, slots), [r(3, 32), r(3, 16), r(32), r(3, 8), r(3, 8),
                                               cache, torch.tensor([0, 17, -1])]),
        ("mla_decode", lambda *t: ds_kernels.mla_decode(*t, 0.1),
         [r(2, 4, 32), r(2, 4, 16), cache, table, i32(5, 40)]),
        ("mla_prefill", lambda q, k, v, cu: ds_kernels.mla_prefill(q, k, v, cu, softmax_scale=0.2),
         [r(5, 2, 24), r(5, 2, 24), r(5, 2, 16), i32(0, 2, 5)]),
    ]


@pytest.mark.parametrize("name,call,tensors", _small_calls(), ids=lambda v: v if isinstance(
    v, str) else "")
def test_public_ops_take_meta_tensors(name, call, tensors):
    """Shape inference (meta tensors: deferred init, memory planning) runs each op's fake
    implementation, which reads no values, and gives the shapes and dtypes of a real call."""
    def outputs(result):
        result = result if isinstance(result, (tuple, list)) else [result]
        return [(tuple(t.shape), t.dtype) for t in result if isinstance(t, torch.Tensor)]

    real = outputs(call(*[t.clone() for t in tensors]))
    meta = call(*[t.to("meta") for t in tensors])
    assert all(t.is_meta for t in (meta if isinstance(meta, (tuple, list)) else [meta])
               if isinstance(t, torch.Tensor))
    assert outputs(meta) == real
