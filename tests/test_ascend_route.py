"""The Ascend route without an NPU: torch_npu.npu_moe_gating_top_k is replaced by a CPU model of
its documentation, so these tests check our argument mapping and post-processing, not the
kernel. The model is written from the doc alone (Ascend/op-plugin,
docs/zh/custom_APIs/torch_npu/torch_npu-npu_moe_gating_top_k.md), not from our reference."""

import sys
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ds_kernels.ascend.route as ascend
from ds_kernels.reference.route import route as reference_route
from numerics import SEEDS


class DocumentedConstraintError(ValueError):
    """A call outside what the operator's documentation allows."""


def _require(condition: bool, what: str):
    if not condition:
        raise DocumentedConstraintError(what)


def npu_moe_gating_top_k_documented(x, k, *, bias=None, k_group=1, group_count=1,
                                    group_select_mode=0, renorm=0, norm_type=0, out_flag=False,
                                    routed_scaling_factor=1.0, eps=1e-20):
    """The doc's constraints (raise) and its numpy "equivalent computation", with three gaps of
    that code filled from the doc's formulas: group_count=1 selects no groups (the code leaves
    group_x undefined), bias=None adds nothing (the code calls bias.numpy()), and softmax is
    Softmax(x) (the code's log-sum-exp line broadcasts to [T, T, E])."""
    _require(x.dim() == 2 and x.dtype in (torch.float16, torch.bfloat16, torch.float32), "x")
    T, E = x.shape
    _require(bias is None or (bias.shape == (E,) and bias.dtype == x.dtype), "bias")
    _require(T > 0, "T = 0 is undocumented")
    _require(E <= 2048, "experts <= 2048")
    _require(group_count > 0 and E % group_count == 0 and E // group_count > 2, "group_count")
    _require(-(-(E // group_count) // 32) * 32 * group_count <= 2048, "aligned groups")
    _require(1 <= k_group <= group_count, "k_group")
    _require(1 <= k <= E // group_count * k_group, "k")
    _require(group_select_mode in (0, 1) and norm_type in (0, 1), "modes")
    _require(renorm == 0, "renorm supports only 0")

    # Elementwise in torch, so that both sides round sigmoid/softmax alike; the rest in numpy.
    xf = x.float()
    norm_out = (xf.sigmoid() if norm_type == 1 else xf.softmax(dim=-1)).numpy()   # [T, E]
    value = norm_out if bias is None else norm_out + bias.float().numpy()          # [T, E]
    if group_count > 1:
        grouped = value.reshape(T, group_count, -1)                                 # [T, G, E/G]
        if group_select_mode == 0:
            group_score = grouped.max(axis=-1)
        else:
            group_score = np.partition(grouped, -2, axis=-1)[..., -2:].sum(axis=-1)  # [T, G]
        kept = np.argsort(-group_score, axis=-1, kind="stable")[:, :k_group]
        dropped = np.ones((T, group_count), dtype=bool)
        dropped[np.arange(T)[:, None], kept] = False
        value = np.where(dropped[..., None], -np.inf, grouped).reshape(T, E)
    idx = np.argsort(-value, axis=-1, kind="stable")[:, :k]                         # [T, k]
    y = np.take_along_axis(norm_out, idx, axis=1)                                   # [T, k]
    if norm_type == 1:
        y = y / (y.sum(axis=-1, keepdims=True) + eps)
    y = y * routed_scaling_factor
    out = torch.from_numpy(norm_out) if out_flag else None
    return torch.from_numpy(y).to(x.dtype), torch.from_numpy(idx.astype(np.int32)), out


@pytest.fixture
def npu_calls(monkeypatch):
    """Installs a fake torch_npu whose operator is the documented model; yields its calls."""
    calls = []

    def npu_moe_gating_top_k(x, k, **kwargs):
        calls.append(dict(x=x, k=k, **kwargs))
        return npu_moe_gating_top_k_documented(x, k, **kwargs)

    fake = types.ModuleType("torch_npu")
    fake.npu_moe_gating_top_k = npu_moe_gating_top_k
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    return calls


@st.composite
def problems(draw):
    n_group = draw(st.sampled_from([1, 2, 4, 8]))
    group_scoring = draw(st.sampled_from(["top2_sum", "max"]))
    sizes = [2, 3, 5, 8, 32, 33] + ([1] if group_scoring == "max" and n_group > 1 else [])
    group_size = draw(st.sampled_from(sizes))
    E = n_group * group_size
    topk_group = draw(st.integers(1, n_group))
    top_k = draw(st.integers(1, min(12, topk_group * group_size)))
    T = draw(st.sampled_from([0, 1, 2, 7, 33]))
    g = torch.Generator().manual_seed(draw(SEEDS))
    if draw(st.booleans()):  # continuous: no ties
        logits = torch.randn(T, E, generator=g) * 2
        bias = torch.rand(E, generator=g) * 0.5 - 0.25
    else:  # coarse: ties in scores, group scores and choices
        logits = torch.randint(-2, 3, (T, E), generator=g) * 0.5
        bias = torch.randint(0, 2, (E,), generator=g) * 0.25
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    bias = bias.to(dtype) if draw(st.booleans()) else None
    args = (top_k, draw(st.sampled_from(["sigmoid", "softmax"])), bias, n_group, topk_group,
            draw(st.booleans()), draw(st.sampled_from([1.0, 2.5])), group_scoring)
    return logits.to(dtype), args


@settings(max_examples=300, deadline=None)
@given(problem=problems())
def test_matches_reference(npu_calls, problem):
    # Ids must match exactly even on ties: the documented model breaks them as we do.
    logits, args = problem
    top_k, scoring, bias, n_group, _, renormalize, _, group_scoring = args
    npu_calls.clear()
    weights, ids = ascend.route(logits, *args)
    expected_weights, expected_ids = reference_route(logits, *args)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == ids.shape == (logits.shape[0], top_k)
    torch.testing.assert_close(ids, expected_ids, rtol=0, atol=0)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-6, atol=1e-6)
    supported = ascend._supported(*logits.shape, scoring, n_group, renormalize, group_scoring,
                                  bias is not None) is None
    assert len(npu_calls) == supported
    if supported:
        assert npu_calls[0]["x"].dtype == torch.float32
        assert npu_calls[0]["group_select_mode"] == {"max": 0, "top2_sum": 1}[group_scoring]


def test_gating_args_deepseek_v3():
    bias = torch.zeros(256, dtype=torch.bfloat16)
    kwargs = ascend.gating_args(8, "sigmoid", bias, 8, 4, True, 2.5, "top2_sum")
    assert kwargs.pop("bias").dtype == torch.float32
    assert kwargs == dict(k=8, k_group=4, group_count=8, group_select_mode=1, renorm=0,
                          norm_type=1, out_flag=False, routed_scaling_factor=2.5, eps=1e-20)
    assert ascend._supported(4, 256, "sigmoid", 8, True, "top2_sum", True) is None


def test_gating_args_deepseek_v2():
    # DeepSeek-V2: 160 experts in 8 groups, 3 kept, k = 6, softmax, no bias, scale 16.
    kwargs = ascend.gating_args(6, "softmax", None, 8, 3, False, 16.0, "max")
    assert kwargs == dict(k=6, bias=None, k_group=3, group_count=8, group_select_mode=0,
                          renorm=0, norm_type=0, out_flag=False, routed_scaling_factor=16.0,
                          eps=1e-20)
    assert ascend._supported(4, 160, "softmax", 8, False, "max", False) is None


@pytest.mark.parametrize("renormalize, scale", [(True, 1.0), (False, 2.5)])
def test_gating_args_softmax(renormalize, scale):
    # The operator never renormalises softmax: route does it, so the operator must not scale.
    kwargs = ascend.gating_args(6, "softmax", None, 1, 1, renormalize, 2.5, "top2_sum")
    assert kwargs["norm_type"] == 0 and kwargs["bias"] is None
    assert kwargs["routed_scaling_factor"] == scale


@pytest.mark.parametrize("T, E, scoring, n_group, renormalize, group_scoring, bias, reason", [
    (0, 256, "sigmoid", 8, True, "top2_sum", True, "T = 0"),
    (3, 4096, "sigmoid", 1, True, "top2_sum", True, "at most 2048 experts"),
    (3, 16, "sigmoid", 8, True, "top2_sum", True, "at least 3 experts per group"),
    (3, 40 * 33, "sigmoid", 40, True, "top2_sum", True, "rounded up to 32"),
    (3, 256, "sigmoid", 8, False, "top2_sum", True, "always renormalises"),
    (3, 256, "softmax", 8, False, "max", True, "group maximum is of the biased scores"),
    (3, 2048, "sigmoid", 64, True, "top2_sum", True, None),
    (3, 256, "softmax", 8, False, "top2_sum", False, None),
    (3, 256, "softmax", 8, False, "max", False, None),
    (3, 256, "softmax", 1, False, "max", True, None),  # one group: nothing to score
    (3, 3, "softmax", 1, True, "top2_sum", False, None),
])
def test_supported(T, E, scoring, n_group, renormalize, group_scoring, bias, reason):
    got = ascend._supported(T, E, scoring, n_group, renormalize, group_scoring, bias)
    assert got is None if reason is None else reason in got


@pytest.mark.parametrize("group_scoring", ["top2_sum", "max"])
@pytest.mark.parametrize("n_group", [1, 2, 8, 40, 64])
@pytest.mark.parametrize("group_size", [1, 2, 3, 31, 33, 256, 2048, 2049])
def test_supported_shapes_are_the_documented_ones(n_group, group_size, group_scoring):
    """Where _supported sends a shape to the operator, the documented model accepts it, and
    the other way round."""
    E = n_group * group_size
    supported = ascend._supported(1, E, "sigmoid", n_group, True, group_scoring, False) is None
    kwargs = ascend.gating_args(1, "sigmoid", None, n_group, n_group, True, 1.0, group_scoring)
    try:
        npu_moe_gating_top_k_documented(torch.zeros(1, E), **kwargs)
        accepted = True
    except DocumentedConstraintError:
        accepted = False
    assert supported == accepted


@pytest.mark.parametrize("T, E, scoring, n_group, topk_group, top_k, renormalize, group_scoring", [
    (0, 256, "sigmoid", 8, 4, 8, True, "top2_sum"),
    (5, 4096, "sigmoid", 1, 1, 8, True, "top2_sum"),
    (5, 16, "softmax", 8, 2, 3, True, "top2_sum"),
    (5, 40 * 33, "sigmoid", 40, 4, 8, True, "top2_sum"),
    (5, 256, "sigmoid", 8, 4, 8, False, "top2_sum"),
    (5, 160, "softmax", 8, 3, 6, False, "max"),  # with a bias
])
def test_unsupported_falls_back_to_torch_path(npu_calls, monkeypatch, caplog, T, E, scoring,
                                              n_group, topk_group, top_k, renormalize,
                                              group_scoring):
    torch_calls, torch_route = [], ascend.torch_route

    def spy(*args):
        torch_calls.append(args)
        return torch_route(*args)

    monkeypatch.setattr(ascend, "torch_route", spy)
    monkeypatch.setattr(ascend, "_warned", set())
    g = torch.Generator().manual_seed(E)
    logits = torch.randn(T, E, generator=g)
    args = (top_k, scoring, torch.rand(E, generator=g) * 0.1, n_group, topk_group, renormalize,
            1.5, group_scoring)
    for _ in range(2):
        weights, ids = ascend.route(logits, *args)
    assert npu_calls == [] and len(torch_calls) == 2
    expected_weights, expected_ids = reference_route(logits, *args)
    torch.testing.assert_close(ids, expected_ids, rtol=0, atol=0)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-6, atol=1e-6)
    assert len([r for r in caplog.records if "using the torch path" in r.message]) == 1
