"""route: every backend against the reference twin; ties, NaN, edge sizes, errors, autograd,
opcheck and torch.compile; group_scoring="max" against DeepSeek-V2's published gate;
DeepSeek-V4's sqrtsoftplus scores and hash routing (fixed_ids) against transformers' routers."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ds_kernels
from conftest import DEVICE, backend_fixture
from ds_kernels import tuning
from ds_kernels.reference.route import RENORM_EPS, choice_scores, group_basis
from ds_kernels.reference.route import route as reference_route
from numerics import SEEDS, VIEWS, as_view, assert_close


backend = backend_fixture("numpy", "sort", "topk")
SCORINGS = ["sigmoid", "softmax", "sqrtsoftplus"]


def _logits(T, E, values, g):
    """[T, E] fp32 logits: "narrow" or "wide" normal values (no ties; narrow ones make many
    scores lie close), "coarse" (many exact ties: in scores, group scores and at the k-th place)
    or "near_ties" (coarse plus offsets of a few ulps, so that ties are broken by values only
    fp32 tells apart)."""
    if values in ("narrow", "wide"):
        return torch.randn(T, E, generator=g) * (0.5 if values == "narrow" else 3.0)
    coarse = torch.randint(-2, 3, (T, E), generator=g) * 0.5
    if values == "coarse":
        return coarse
    return coarse + torch.randint(-2, 3, (T, E), generator=g) * 2.0**-20


@st.composite
def routing_problems(draw, max_tokens=40):
    n_group = draw(st.sampled_from([1, 1, 2, 4, 8]))
    group_scoring = draw(st.sampled_from(["top2_sum", "max"]))
    # "max" also scores groups of one expert; "top2_sum" needs two.
    smallest = 1 if group_scoring == "max" and n_group > 1 else 2
    group_size = draw(st.integers(smallest, 40 if n_group == 1 else 33))
    E = n_group * group_size
    topk_group = draw(st.integers(1, n_group))
    top_k = draw(st.integers(1, min(16, topk_group * group_size)))
    T = draw(st.sampled_from([0, 1, 2, 3, 17, max_tokens]))
    g = torch.Generator().manual_seed(draw(SEEDS))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    logits = _logits(T, E, draw(st.sampled_from(["narrow", "wide", "coarse", "near_ties"])), g)
    nans = draw(st.sampled_from([None, None, "some", "row"]))
    if nans == "some" and T:
        logits[torch.rand(T, E, generator=g) < 0.1] = float("nan")
    elif nans == "row" and T:
        logits[T // 2] = float("nan")
    bias = draw(st.sampled_from([None, "positive", "negative", "mixed"]))
    if bias is not None:
        magnitude = torch.rand(E, generator=g) * 0.5
        bias = as_view({"positive": magnitude, "negative": -magnitude,
                        "mixed": magnitude - 0.25}[bias].to(DEVICE), draw(VIEWS))
    kwargs = dict(scoring=draw(st.sampled_from(SCORINGS)), correction_bias=bias,
                  n_group=n_group, topk_group=topk_group,
                  renormalize=draw(st.booleans()),
                  routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
                  group_scoring=group_scoring)
    # An expanded view gives every token the first one's logits.
    return as_view(logits.to(DEVICE, dtype), draw(VIEWS)), top_k, kwargs


def _reference(logits, top_k, kw):
    return reference_route(logits, top_k, kw["scoring"], kw["correction_bias"], kw["n_group"],
                           kw["topk_group"], kw["renormalize"], kw["routed_scaling_factor"],
                           kw.get("group_scoring", "top2_sum"))


def _near_tie_rows(logits, top_k, kw, gap=1e-5):
    """Rows whose choice depends on scores closer than ``gap`` (but not equal): there, one ulp
    of difference between two backends' sigmoid may legitimately swap experts."""
    T, E = logits.shape
    s, c = choice_scores(logits, kw["scoring"], kw["correction_bias"])
    group_scoring = kw.get("group_scoring", "top2_sum")
    ambiguous = torch.zeros(T, dtype=torch.bool, device=logits.device)

    def close(sorted_values):
        d = (sorted_values[:, :-1] - sorted_values[:, 1:]).abs()
        return ((d > 0) & (d < gap)).any(dim=-1)

    if kw["n_group"] > 1:
        grouped = group_basis(s, c, group_scoring).view(T, kw["n_group"], E // kw["n_group"])
        top = grouped.sort(dim=-1, descending=True).values[..., :2]      # [T, G, 1 or 2]
        group_scores = top.sum(-1) if group_scoring == "top2_sum" else top[..., 0]
        ambiguous |= close(group_scores.sort(dim=-1, descending=True).values)
        ambiguous |= close(top.flatten(0, 1)).view(T, kw["n_group"]).any(-1)
    ambiguous |= close(c.sort(dim=-1, descending=True).values[:, : top_k + 1])
    return ambiguous


def _tie_gap(backend):
    """Scores closer than this may order differently in ``backend`` than in the reference:
    the Triton kernel computes its scores itself (an ulp apart from torch's); every
    torch strategy uses the reference's own scores, so there nothing is ambiguous."""
    return 1e-5 if backend == "triton" else 0.0


def _check_against_reference(logits, top_k, kw, weights, ids, tie_gap=1e-5):
    ref_weights, ref_ids = _reference(logits, top_k, kw)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == ids.shape == (logits.shape[0], top_k)
    E = logits.shape[1]
    assert ((ids >= 0) & (ids < E)).all(), "ids out of range"
    if top_k > 1:
        assert (ids.sort(dim=-1).values.diff(dim=-1) > 0).all(), "repeated ids in a row"
    certain = ~_near_tie_rows(logits, top_k, kw, tie_gap)
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
    _check_against_reference(logits, top_k, kw, weights, ids, _tie_gap(backend))


def _deepseek_v2_gate(logits, top_k, n_group, topk_group, renormalize, scale):
    """DeepSeek-V2's MoEGate (its modeling_deepseek.py, topk_method "group_limited_greedy"),
    written again row by row: softmax scores; a group's score is its best expert's score; the
    topk_group best groups stay; the top_k experts of those groups by score; weights = their
    scores, renormalised if asked, times the scale. Two choices of ours where V2's code leaves
    them open: ties go to the lower index (V2 uses torch.topk, which promises no order), and
    experts of dropped groups are out (V2 sets their scores to 0, which only matters where a
    softmax score underflows to 0)."""
    weights, ids = [], []
    for row in logits.float().softmax(dim=-1).tolist():
        size = len(row) // n_group
        group_best = [max(row[g * size:(g + 1) * size]) for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: (-group_best[g], g))[:topk_group]
        eligible = [e for g in kept for e in range(g * size, (g + 1) * size)]
        chosen = sorted(eligible, key=lambda e: (-row[e], e))[:top_k]
        w = [row[e] for e in chosen]
        total = sum(w) + RENORM_EPS if renormalize else 1.0
        weights.append([x / total * scale for x in w])
        ids.append(chosen)
    T = logits.shape[0]
    return (torch.tensor(weights, dtype=torch.float32).view(T, top_k),
            torch.tensor(ids, dtype=torch.int32).view(T, top_k))


@settings(max_examples=30)
@given(n_group=st.sampled_from([1, 2, 4, 8]), group_size=st.integers(1, 20),
       T=st.sampled_from([0, 1, 5, 24]), renormalize=st.booleans(),
       values=st.sampled_from(["narrow", "wide", "coarse", "near_ties"]), seed=SEEDS,
       data=st.data())
def test_max_is_deepseek_v2_group_limited_greedy(backend, n_group, group_size, T, renormalize,
                                                 values, seed, data):
    E = n_group * group_size
    topk_group = data.draw(st.integers(1, n_group))
    top_k = data.draw(st.integers(1, min(8, topk_group * group_size)))
    logits = _logits(T, E, values, torch.Generator().manual_seed(seed)).to(DEVICE)
    kw = dict(scoring="softmax", correction_bias=None, n_group=n_group, topk_group=topk_group,
              renormalize=renormalize, routed_scaling_factor=16.0, group_scoring="max")
    weights, ids = ds_kernels.route(logits, top_k, **kw)
    v2_weights, v2_ids = _deepseek_v2_gate(logits, top_k, n_group, topk_group, renormalize, 16.0)
    certain = ~_near_tie_rows(logits, top_k, kw, _tie_gap(backend)).cpu()
    assert torch.equal(ids.cpu()[certain], v2_ids[certain]), (
        f"ids differ in rows {(ids.cpu() != v2_ids).any(-1).nonzero().flatten().tolist()[:5]}")
    assert_close(weights.cpu()[certain], v2_weights[certain], torch.float32, reduction=E)


def _probability_logits(rows):
    """Logits whose sigmoid scores are ``rows`` (fp32 [T, E])."""
    return torch.logit(torch.tensor(rows, dtype=torch.float64)).float().to(DEVICE)


def test_max_scores_a_group_by_its_best_expert(backend):
    # Group 0 holds the single best expert, group 1 the best pair: "max" keeps group 0,
    # "top2_sum" (0.9 + 0.1 < 0.6 + 0.6) keeps group 1.
    logits = _probability_logits([[0.9, 0.1, 0.1, 0.1, 0.6, 0.6, 0.2, 0.2]])
    kw = dict(n_group=2, topk_group=1, renormalize=False)
    _, ids = ds_kernels.route(logits, 2, group_scoring="max", **kw)
    assert ids.tolist() == [[0, 1]]
    _, ids = ds_kernels.route(logits, 2, **kw)
    assert ids.tolist() == [[4, 5]]


def test_max_with_a_bias_scores_groups_unbiased_and_chooses_experts_biased(backend):
    # Unbiased, group 0's best (0.9) beats group 1's (0.8); biased, group 1's (0.8 + 0.3)
    # would win. Inside group 0 the bias lifts expert 3 (0.2 + 0.5) above expert 1 (0.3).
    logits = _probability_logits([[0.9, 0.3, 0.2, 0.2, 0.8, 0.7, 0.1, 0.1]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.5, 0.3, 0.0, 0.0, 0.0], device=DEVICE)
    weights, ids = ds_kernels.route(logits, 2, correction_bias=bias, n_group=2, topk_group=1,
                                    renormalize=False, group_scoring="max")
    assert ids.tolist() == [[0, 3]]
    assert_close(weights, torch.tensor([[0.9, 0.2]], device=DEVICE), torch.float32)


@pytest.mark.parametrize("group_scoring", ["top2_sum", "max"])
@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (8, 4)])
def test_ties_go_to_the_lower_index(backend, scoring, n_group, topk_group, group_scoring):
    # Few distinct values, so most rows tie inside groups, across groups and at the k-th place.
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (33, 64), generator=g).float().to(DEVICE)
    logits[0] = 0.0  # one row where every expert ties
    kw = dict(scoring=scoring, correction_bias=None, n_group=n_group, topk_group=topk_group,
              renormalize=True, routed_scaling_factor=1.0, group_scoring=group_scoring)
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


@pytest.mark.parametrize("group_scoring", ["top2_sum", "max"])
def test_dropped_groups_are_never_chosen_even_when_their_scores_are_lowest(backend,
                                                                          group_scoring):
    # Negative choice scores everywhere: masking dropped groups with 0 (instead of -inf) would
    # make them win. Group 0 holds the best experts; k = 2 * group size forces group 1 too.
    logits = torch.full((1, 16), -8.0, device=DEVICE)
    logits[0, :4] = 4.0
    logits[0, 4:8] = -2.0
    bias = torch.full((16,), -2.0, device=DEVICE)
    _, ids = ds_kernels.route(logits, 8, correction_bias=bias, n_group=4, topk_group=2,
                              group_scoring=group_scoring)
    assert sorted(ids[0].tolist()) == list(range(8))


@pytest.mark.parametrize("group_scoring", ["top2_sum", "max"])
@pytest.mark.parametrize("scoring", SCORINGS)
def test_nan_rows_follow_the_documented_policy(backend, scoring, group_scoring):
    logits = torch.randn(4, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    logits[1, 3] = float("nan")
    logits[2] = float("nan")
    kw = dict(scoring=scoring, correction_bias=None, n_group=4, topk_group=2,
              renormalize=True, routed_scaling_factor=1.0, group_scoring=group_scoring)
    weights, ids = ds_kernels.route(logits, 4, **kw)
    ref_weights, ref_ids = _reference(logits, 4, kw)
    assert ((ids >= 0) & (ids < 32)).all()
    assert torch.equal(ids, ref_ids)
    assert_close(weights, ref_weights, torch.float32, reduction=32)
    assert weights[2].isnan().all()  # an all-NaN row is visible, not hidden
    if scoring != "softmax":  # a NaN expert ranks last: row 1 picks real experts
        assert 3 not in ids[1].tolist() and not weights[1].isnan().any()


def test_a_nan_group_ranks_below_real_groups(backend):
    # Under "max" a group's score is its best unbiased score: a group of NaN scores is last
    # (torch.sort alone would put NaN first).
    logits = torch.full((1, 8), float("nan"), device=DEVICE)
    logits[0, 4:] = -5.0
    _, ids = ds_kernels.route(logits, 2, n_group=2, topk_group=1, group_scoring="max")
    assert ids.tolist() == [[4, 5]]


@pytest.mark.parametrize("group_scoring", ["top2_sum", "max"])
@pytest.mark.parametrize("T", [0, 1])
def test_tiny_token_counts(backend, T, group_scoring):
    logits = torch.randn(T, 256, generator=torch.Generator().manual_seed(T)).to(DEVICE)
    weights, ids = ds_kernels.route(logits, 8, n_group=8, topk_group=4,
                                    group_scoring=group_scoring)
    assert weights.shape == ids.shape == (T, 8)
    _check_against_reference(logits, 8, dict(scoring="sigmoid", correction_bias=None,
                                              n_group=8, topk_group=4, renormalize=True,
                                              routed_scaling_factor=1.0,
                                              group_scoring=group_scoring),
                             weights, ids, _tie_gap(backend))


def test_strided_logits(backend):
    base = torch.randn(64, 20, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    logits = base.t()[:, :16]  # [20, 16] with strides (1, 20)... a non-contiguous view
    kw = dict(scoring="softmax", correction_bias=None, n_group=2, topk_group=1,
              renormalize=False, routed_scaling_factor=1.0)
    weights, ids = ds_kernels.route(logits, 3, **kw)
    _check_against_reference(logits, 3, kw, weights, ids)


@pytest.mark.parametrize("group_scoring", ["top2_sum", "max"])
@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("renormalize", [True, False])
def test_gradient_matches_autograd_through_the_reference(backend, scoring, renormalize,
                                                         group_scoring):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(9, 32, generator=g, dtype=torch.float32).to(DEVICE)
    kw = dict(scoring=scoring, n_group=4, topk_group=2, renormalize=renormalize,
              routed_scaling_factor=2.5, group_scoring=group_scoring)
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


def _scores64(x, scoring):
    """The scores in float64 (the reference's are fp32), for finite differences."""
    if scoring == "sigmoid":
        return x.sigmoid()
    return x.softmax(-1) if scoring == "softmax" else torch.nn.functional.softplus(x).sqrt()


def test_gradcheck_of_the_backward_formula():
    logits = torch.randn(5, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2
    for scoring in SCORINGS:
        with ds_kernels.use_backend("reference"):
            ids = ds_kernels.route(logits.float(), 3, scoring=scoring, n_group=2, topk_group=1)[1]

        def weights_of(x):
            # The op computes in fp32; gradcheck needs float64, so compare the registered
            # backward's fp32 answer with float64 finite differences of the same function.
            return ds_kernels.route(x.float(), 3, scoring=scoring, n_group=2, topk_group=1)[0]

        x = logits.float().requires_grad_()
        jac = torch.autograd.functional.jacobian(weights_of, x)           # [5, 3, 5, 16]
        s = _scores64(logits, scoring)
        eps = 1e-6
        for t, e in [(0, 0), (2, 7), (4, 15)]:
            bumped = logits.clone()
            bumped[t, e] += eps
            sb = _scores64(bumped, scoring)
            chosen, chosen_b = s.gather(1, ids.long()), sb.gather(1, ids.long())
            fd = (chosen_b / chosen_b.sum(-1, keepdim=True)
                  - chosen / chosen.sum(-1, keepdim=True)) / eps
            assert_close(jac[:, :, t, e], fd.float(), torch.float32, reduction=100,
                         what=f"d weights / d logits[{t},{e}]")


def test_opcheck():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(6, 64, generator=g).to(DEVICE).requires_grad_()
    bias = torch.randn(64, generator=g).to(DEVICE)
    for args in [(logits, 4, "sigmoid", bias, 4, 2, True, 2.5),
                 (logits, 3, "softmax", None, 1, 1, False, 1.0),
                 (logits, 4, "softmax", bias, 8, 3, False, 16.0, "max"),
                 (logits, 4, "sqrtsoftplus", bias, 1, 1, True, 1.5),
                 (logits, 3, "sqrtsoftplus", None, 1, 1, True, 1.5, "top2_sum",
                  torch.tensor([[5, 0, 63]] * 6).to(DEVICE))]:
        torch.library.opcheck(torch.ops.ds_kernels.route.default, args)


@pytest.mark.parametrize("group_scoring", ["top2_sum", "max"])
def test_torch_compile_fullgraph(group_scoring):
    @torch.compile(fullgraph=True)
    def gate(x, bias):
        weights, ids = ds_kernels.route(x, 8, correction_bias=bias, n_group=8, topk_group=4,
                                        group_scoring=group_scoring)
        return weights * 2, ids

    g = torch.Generator().manual_seed(7)
    x, bias = torch.randn(10, 256, generator=g).to(DEVICE), torch.randn(256, generator=g).to(DEVICE)
    weights, ids = gate(x, bias)
    ref_weights, ref_ids = ds_kernels.route(x, 8, correction_bias=bias, n_group=8, topk_group=4,
                                            group_scoring=group_scoring)
    assert torch.equal(ids, ref_ids)
    assert_close(weights, ref_weights * 2, torch.float32)


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=0), "top_k must be in"),
    (dict(top_k=33), "top_k must be in"),
    (dict(n_group=3), "not divisible by n_group=3"),
    (dict(n_group=4, topk_group=5), "topk_group must be in"),
    (dict(n_group=4, topk_group=1, top_k=9), r"top_k must be in \[1, 8\]"),
    (dict(n_group=32), "'top2_sum' needs at least 2 experts per group"),
    (dict(scoring="relu"), "scoring must be one of"),
    (dict(group_scoring="mean"), r"group_scoring must be one of \('top2_sum', 'max'\), got 'mean'"),
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


def test_bad_group_scoring_is_refused_through_the_op_too():
    logits = torch.zeros(4, 32, requires_grad=True)  # autograd: the torch.ops path
    with pytest.raises(ValueError, match="got 'mean'"):
        ds_kernels.route(logits, 2, group_scoring="mean")


def test_max_takes_groups_of_one_expert(backend):
    # One expert a group: "max" is plain top-k restricted to topk_group experts, the best ones.
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5, 1.0, -2.0, 0.0]], device=DEVICE)
    _, ids = ds_kernels.route(logits, 2, n_group=8, topk_group=3, group_scoring="max")
    assert ids.tolist() == [[1, 3]]


@st.composite
def hash_routing_problems(draw):
    """DeepSeek-V4's hash layers: logits [T, E] and given expert ids [T, k] (distinct in a
    row, as tid2eid's rows; int32 or int64, any view), any scoring."""
    E = draw(st.integers(1, 72))
    top_k = draw(st.integers(1, min(E, 8)))
    T = draw(st.sampled_from([0, 1, 2, 5, 33]))
    g = torch.Generator().manual_seed(draw(SEEDS))
    logits = _logits(T, E, draw(st.sampled_from(["narrow", "wide", "coarse"])), g)
    if draw(st.booleans()) and T:  # far tails: softplus's threshold and its underflow
        logits[:, 0] = torch.tensor([-120.0, -30.0, 19.5, 20.5, 90.0])[torch.arange(T) % 5]
    ids = torch.stack([torch.randperm(E, generator=g)[:top_k] for _ in range(T)]) if T else (
        torch.zeros(0, top_k, dtype=torch.long))
    ids = ids.to(draw(st.sampled_from([torch.int32, torch.int64])))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    kw = dict(scoring=draw(st.sampled_from(SCORINGS)), renormalize=draw(st.booleans()),
              routed_scaling_factor=draw(st.sampled_from([1.0, 1.5])))
    return (as_view(logits.to(DEVICE, dtype), draw(VIEWS)), top_k,
            as_view(ids.to(DEVICE), draw(VIEWS)), kw)


def _transformers_hash_router(logits, ids, scoring, renormalize, scale):
    """transformers' DeepseekV4HashRouter after its gate GEMM, written again: the scores
    (ACT2FN[scoring_func]: sqrtsoftplus = softplus(x).sqrt()) gathered at tid2eid's ids,
    divided by their sum + 1e-20, times routed_scaling_factor (V4 always renormalises; the
    flag is ours)."""
    x = logits.float()
    s = {"sigmoid": x.sigmoid, "softmax": lambda: x.softmax(-1),
         "sqrtsoftplus": lambda: torch.nn.functional.softplus(x).sqrt()}[scoring]()
    w = s.gather(1, ids.long())
    if renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * scale


@settings(max_examples=40)
@given(problem=hash_routing_problems())
def test_fixed_ids_weigh_the_given_experts(backend, problem):
    """The ids come back as given (int32); the weights are the given experts' scores, as
    transformers' hash router computes them, on every backend."""
    logits, top_k, ids, kw = problem
    weights, got_ids = ds_kernels.route(logits, top_k, fixed_ids=ids, **kw)
    assert got_ids.dtype == torch.int32 and torch.equal(got_ids.long(), ids.long())
    expected = _transformers_hash_router(logits, ids, kw["scoring"], kw["renormalize"],
                                         kw["routed_scaling_factor"])
    assert_close(weights, expected, torch.float32, reduction=logits.shape[1], what="weights")
    ref_weights, _ = reference_route(logits, top_k, kw["scoring"], None, 1, 1,
                                     kw["renormalize"], kw["routed_scaling_factor"],
                                     "top2_sum", ids)
    assert_close(ref_weights, expected, torch.float32, reduction=logits.shape[1],
                 what="reference weights")


def test_sqrtsoftplus_is_transformers_activation():
    """Bit for bit torch's softplus(x).sqrt() (transformers' SqrtSoftplusActivation) in the
    reference, through softplus's threshold (20) and its underflow; the Triton kernel's own
    formula within an ulp or two."""
    x = torch.tensor([[-200.0, -104.0, -88.0, -30.0, -1e-3, 0.0, 1e-3, 5.0, 19.9, 20.0, 20.1,
                       60.0, float("inf"), float("-inf")]])
    s, _ = choice_scores(x, "sqrtsoftplus", None)
    assert torch.equal(s, torch.nn.functional.softplus(x).sqrt())
    ids = torch.arange(x.shape[1])[None]
    with ds_kernels.use_backend("triton"):
        weights, _ = ds_kernels.route(x, x.shape[1], scoring="sqrtsoftplus", renormalize=False,
                                      fixed_ids=ids)
    torch.testing.assert_close(weights, s, rtol=3e-7, atol=0)


def test_fixed_ids_gradient_matches_autograd_through_transformers_router(backend):
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(7, 24, generator=g).to(DEVICE) * 3
    ids = torch.stack([torch.randperm(24, generator=g)[:6] for _ in range(7)]).to(DEVICE)
    for scoring in SCORINGS:
        x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        upstream = torch.randn(7, 6, generator=g).to(DEVICE)
        (ds_kernels.route(x, 6, scoring=scoring, routed_scaling_factor=1.5, fixed_ids=ids)[0]
         * upstream).sum().backward()
        (_transformers_hash_router(y, ids, scoring, True, 1.5) * upstream).sum().backward()
        assert_close(x.grad, y.grad, torch.float32, reduction=24, what=f"d(logits) {scoring}")


@pytest.mark.parametrize("fixed_ids,kwargs,match", [
    ([[0, 0]], {}, r"distinct experts in each row, got \[0, 0\] in row 0"),
    ([[0, 32]], {}, r"fixed_ids must be in \[0, 32\), got values in \[0, 32\]"),
    ([[-1, 3]], {}, r"fixed_ids must be in \[0, 32\)"),
    ([[0, 1, 2]], {}, r"fixed_ids must be \[T=1, top_k=2\]"),
    ([[0.0, 1.0]], {}, "fixed_ids must have dtype"),
    ([[0, 1]], dict(correction_bias=torch.zeros(32)), "correction_bias and n_group"),
    ([[0, 1]], dict(n_group=4, topk_group=2), "correction_bias and n_group"),
])
def test_bad_fixed_ids_raise_clear_errors(fixed_ids, kwargs, match):
    for grad in (False, True):  # the direct call and the torch.ops path
        logits = torch.zeros(1, 32, requires_grad=grad)
        with pytest.raises((ValueError, TypeError), match=match):
            ds_kernels.route(logits, 2, fixed_ids=torch.tensor(fixed_ids), **kwargs)
