"""route: every backend against the reference twin; ties, NaN, edge sizes, errors, autograd,
opcheck and torch.compile."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ds_kernels
from conftest import DEVICE, backend_fixture
from ds_kernels import tuning
from ds_kernels.reference.route import RENORM_EPS, choice_scores
from ds_kernels.reference.route import route as reference_route
from numerics import assert_close


backend = backend_fixture("numpy", "sort", "topk")


@st.composite
def routing_problems(draw, max_tokens=40):
    n_group = draw(st.sampled_from([1, 1, 2, 4, 8]))
    group_size = draw(st.integers(2, 40 if n_group == 1 else 33))
    E = n_group * group_size
    topk_group = draw(st.integers(1, n_group))
    top_k = draw(st.integers(1, min(16, topk_group * group_size)))
    T = draw(st.sampled_from([0, 1, 2, 3, 17, max_tokens]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    logits = (torch.randn(T, E, generator=g) * draw(st.sampled_from([0.5, 3.0])))
    bias = draw(st.sampled_from([None, "positive", "negative", "mixed"]))
    if bias is not None:
        magnitude = torch.rand(E, generator=g) * 0.5
        bias = {"positive": magnitude, "negative": -magnitude,
                "mixed": magnitude - 0.25}[bias].to(DEVICE)
    kwargs = dict(scoring=draw(st.sampled_from(["sigmoid", "softmax"])), correction_bias=bias,
                  n_group=n_group, topk_group=topk_group,
                  renormalize=draw(st.booleans()),
                  routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])))
    return logits.to(DEVICE, dtype), top_k, kwargs


def _reference(logits, top_k, kw):
    return reference_route(logits, top_k, kw["scoring"], kw["correction_bias"], kw["n_group"],
                           kw["topk_group"], kw["renormalize"], kw["routed_scaling_factor"])


def _near_tie_rows(logits, top_k, kw, gap=1e-5):
    """Rows whose choice depends on scores closer than ``gap`` (but not equal): there, one ulp
    of difference between two backends' sigmoid may legitimately swap experts."""
    T, E = logits.shape
    _, c = choice_scores(logits, kw["scoring"], kw["correction_bias"])
    ambiguous = torch.zeros(T, dtype=torch.bool, device=logits.device)

    def close(sorted_values):
        d = (sorted_values[:, :-1] - sorted_values[:, 1:]).abs()
        return ((d > 0) & (d < gap)).any(dim=-1)

    if kw["n_group"] > 1:
        grouped = c.view(T, kw["n_group"], E // kw["n_group"])
        top2 = grouped.sort(dim=-1, descending=True).values[..., :2]     # [T, G, 2]
        ambiguous |= close(top2.sum(-1).sort(dim=-1, descending=True).values)
        ambiguous |= close(top2.flatten(0, 1)).view(T, kw["n_group"]).any(-1)
    ambiguous |= close(c.sort(dim=-1, descending=True).values[:, : top_k + 1])
    return ambiguous


def _check_against_reference(logits, top_k, kw, weights, ids):
    ref_weights, ref_ids = _reference(logits, top_k, kw)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == ids.shape == (logits.shape[0], top_k)
    E = logits.shape[1]
    assert ((ids >= 0) & (ids < E)).all(), "ids out of range"
    if top_k > 1:
        assert (ids.sort(dim=-1).values.diff(dim=-1) > 0).all(), "repeated ids in a row"
    certain = ~_near_tie_rows(logits, top_k, kw)
    assert torch.equal(ids[certain], ref_ids[certain]), (
        f"ids differ in rows {(ids != ref_ids).any(-1).nonzero().flatten().tolist()[:5]}")
    # Weights are checked against the reference formula at this backend's own ids.
    s, _ = choice_scores(logits, kw["scoring"], None)
    expected = s.gather(1, ids.long())
    if kw["renormalize"]:
        expected = expected / (expected.sum(-1, keepdim=True) + RENORM_EPS)
    expected = expected * kw["routed_scaling_factor"]
    assert_close(weights, expected, torch.float32, reduction=E, what="weights")
    assert_close(ref_weights[certain], expected[certain], torch.float32, reduction=E,
                 what="reference weights")


@pytest.mark.skipif(DEVICE != "cpu", reason="numpy takes CPU tensors only")
@settings(max_examples=40)
@given(problem=routing_problems())
def test_the_numpy_strategy_picks_the_references_ids_bit_for_bit(problem):
    """Same scores (torch's), same stable sorts: equal ids in every row, near-ties included."""
    logits, top_k, kw = problem
    with ds_kernels.use_backend("torch"), tuning.override(strategy="numpy"):
        weights, ids = ds_kernels.route(logits, top_k, **kw)
    ref_weights, ref_ids = _reference(logits, top_k, kw)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=0, equal_nan=True)


@settings(max_examples=40)
@given(problem=routing_problems())
def test_route_matches_reference(backend, problem):
    logits, top_k, kw = problem
    weights, ids = ds_kernels.route(logits, top_k, **kw)
    _check_against_reference(logits, top_k, kw, weights, ids)


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (8, 4)])
def test_ties_go_to_the_lower_index(backend, scoring, n_group, topk_group):
    # Few distinct values, so most rows tie inside groups, across groups and at the k-th place.
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (33, 64), generator=g).float().to(DEVICE)
    logits[0] = 0.0  # one row where every expert ties
    kw = dict(scoring=scoring, correction_bias=None, n_group=n_group, topk_group=topk_group,
              renormalize=True, routed_scaling_factor=1.0)
    weights, ids = ds_kernels.route(logits, 6, **kw)
    ref_weights, ref_ids = _reference(logits, 6, kw)
    assert torch.equal(ids, ref_ids)
    assert ids[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert_close(weights, ref_weights, torch.float32, reduction=64)


def test_deepseek_v3_shape(backend):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 256, generator=g).to(DEVICE, torch.bfloat16)
    bias = (torch.rand(256, generator=g) * 0.1).to(DEVICE)
    kw = dict(scoring="sigmoid", correction_bias=bias, n_group=8, topk_group=4,
              renormalize=True, routed_scaling_factor=2.5)
    weights, ids = ds_kernels.route(logits, 8, **kw)
    _check_against_reference(logits, 8, kw, weights, ids)
    groups = ids.long() // 32
    assert (torch.stack([(groups == g_).any(-1) for g_ in range(8)], -1).sum(-1) <= 4).all()
    assert_close(weights.sum(-1), torch.full((64,), 2.5), torch.float32, reduction=8)


def test_dropped_groups_are_never_chosen_even_when_their_scores_are_lowest(backend):
    # Negative choice scores everywhere: masking dropped groups with 0 (instead of -inf) would
    # make them win. Group 0 holds the best experts; k = 2 * group size forces group 1 too.
    logits = torch.full((1, 16), -8.0, device=DEVICE)
    logits[0, :4] = 4.0
    logits[0, 4:8] = -2.0
    bias = torch.full((16,), -2.0, device=DEVICE)
    _, ids = ds_kernels.route(logits, 8, correction_bias=bias, n_group=4, topk_group=2)
    assert sorted(ids[0].tolist()) == list(range(8))


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
def test_nan_rows_follow_the_documented_policy(backend, scoring):
    logits = torch.randn(4, 32, device=DEVICE)
    logits[1, 3] = float("nan")
    logits[2] = float("nan")
    kw = dict(scoring=scoring, correction_bias=None, n_group=4, topk_group=2,
              renormalize=True, routed_scaling_factor=1.0)
    weights, ids = ds_kernels.route(logits, 4, **kw)
    ref_weights, ref_ids = _reference(logits, 4, kw)
    assert ((ids >= 0) & (ids < 32)).all()
    assert torch.equal(ids, ref_ids)
    assert_close(weights, ref_weights, torch.float32, reduction=32)
    assert weights[2].isnan().all()  # an all-NaN row is visible, not hidden
    if scoring == "sigmoid":  # a NaN expert ranks last: row 1 picks real experts
        assert 3 not in ids[1].tolist() and not weights[1].isnan().any()


@pytest.mark.parametrize("T", [0, 1])
def test_tiny_token_counts(backend, T):
    logits = torch.randn(T, 256, device=DEVICE)
    weights, ids = ds_kernels.route(logits, 8, n_group=8, topk_group=4)
    assert weights.shape == ids.shape == (T, 8)
    _check_against_reference(logits, 8, dict(scoring="sigmoid", correction_bias=None,
                                              n_group=8, topk_group=4, renormalize=True,
                                              routed_scaling_factor=1.0), weights, ids)


def test_strided_logits(backend):
    base = torch.randn(64, 20, device=DEVICE)
    logits = base.t()[:, :16]  # [20, 16] with strides (1, 20)... a non-contiguous view
    kw = dict(scoring="softmax", correction_bias=None, n_group=2, topk_group=1,
              renormalize=False, routed_scaling_factor=1.0)
    weights, ids = ds_kernels.route(logits, 3, **kw)
    _check_against_reference(logits, 3, kw, weights, ids)


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_gradient_matches_autograd_through_the_reference(backend, scoring, renormalize):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(9, 32, generator=g, dtype=torch.float32).to(DEVICE)
    kw = dict(scoring=scoring, n_group=4, topk_group=2, renormalize=renormalize,
              routed_scaling_factor=2.5)
    x = logits.clone().requires_grad_()
    weights, ids = ds_kernels.route(x, 4, **kw)
    upstream = torch.randn(weights.shape, generator=g).to(DEVICE)
    (weights * upstream).sum().backward()

    # Autograd through the reference formula at the same (discrete) ids.
    y = logits.clone().requires_grad_()
    s, _ = choice_scores(y, scoring, None)
    w = s.gather(1, ids.long())
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + RENORM_EPS)
    (w * 2.5 * upstream).sum().backward()
    assert_close(x.grad, y.grad, torch.float32, reduction=32, what="d(logits)")


def test_gradcheck_of_the_backward_formula():
    logits = torch.randn(5, 16, dtype=torch.float64) * 2
    for scoring in ("sigmoid", "softmax"):
        with ds_kernels.use_backend("reference"):
            ids = ds_kernels.route(logits.float(), 3, scoring=scoring, n_group=2, topk_group=1)[1]

        def weights_of(x):
            # The op computes in fp32; gradcheck needs float64, so compare the registered
            # backward's fp32 answer with float64 finite differences of the same function.
            return ds_kernels.route(x.float(), 3, scoring=scoring, n_group=2, topk_group=1)[0]

        x = logits.float().requires_grad_()
        jac = torch.autograd.functional.jacobian(weights_of, x)           # [5, 3, 5, 16]
        s = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(-1)
        eps = 1e-6
        for t, e in [(0, 0), (2, 7), (4, 15)]:
            bumped = logits.clone()
            bumped[t, e] += eps
            sb = bumped.sigmoid() if scoring == "sigmoid" else bumped.softmax(-1)
            chosen, chosen_b = s.gather(1, ids.long()), sb.gather(1, ids.long())
            fd = (chosen_b / chosen_b.sum(-1, keepdim=True)
                  - chosen / chosen.sum(-1, keepdim=True)) / eps
            assert_close(jac[:, :, t, e], fd.float(), torch.float32, reduction=100,
                         what=f"d weights / d logits[{t},{e}]")


def test_opcheck():
    logits = torch.randn(6, 64, device=DEVICE, requires_grad=True)
    for args in [(logits, 4, "sigmoid", torch.randn(64, device=DEVICE), 4, 2, True, 2.5),
                 (logits, 3, "softmax", None, 1, 1, False, 1.0)]:
        torch.library.opcheck(torch.ops.ds_kernels.route.default, args)


def test_torch_compile_fullgraph():
    @torch.compile(fullgraph=True)
    def gate(x, bias):
        weights, ids = ds_kernels.route(x, 8, correction_bias=bias, n_group=8, topk_group=4)
        return weights * 2, ids

    x, bias = torch.randn(10, 256, device=DEVICE), torch.randn(256, device=DEVICE)
    weights, ids = gate(x, bias)
    ref_weights, ref_ids = ds_kernels.route(x, 8, correction_bias=bias, n_group=8, topk_group=4)
    assert torch.equal(ids, ref_ids)
    assert_close(weights, ref_weights * 2, torch.float32)


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=0), "top_k must be in"),
    (dict(top_k=33), "top_k must be in"),
    (dict(n_group=3), "not divisible by n_group=3"),
    (dict(n_group=4, topk_group=5), "topk_group must be in"),
    (dict(n_group=4, topk_group=1, top_k=9), r"top_k must be in \[1, 8\]"),
    (dict(n_group=32), "two best experts"),
    (dict(scoring="relu"), "scoring must be one of"),
    (dict(correction_bias=torch.zeros(31)), r"correction_bias must have shape \[32\]"),
    (dict(correction_bias=torch.zeros(32, dtype=torch.int64)), "correction_bias must have dtype"),
    (dict(router_logits=torch.zeros(32)), "router_logits must be 2-D"),
    (dict(router_logits=torch.zeros(4, 32, dtype=torch.int32)), "router_logits must have dtype"),
    (dict(router_logits=[[0.0] * 32]), "router_logits must be a torch.Tensor"),
    (dict(top_k=2.0), "top_k must be an int"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    args = dict(router_logits=torch.zeros(4, 32), top_k=2)
    args.update(kwargs)
    logits, top_k = args.pop("router_logits"), args.pop("top_k")
    with pytest.raises((ValueError, TypeError), match=match):
        ds_kernels.route(logits, top_k, **args)
