"""mla_prefill: every backend against the reference (out, lse and the gradients of q, k, v from
both), ragged and empty sequences, non-power-of-two and DeepSeek-V3 head dims, strided inputs,
errors, opcheck, gradcheck and torch.compile."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DEVICE
from ds_kernels import tuning
from ds_kernels.ops.mla_prefill import mla_prefill
from ds_kernels.reference.mla_prefill import mla_prefill as reference
from ds_kernels.reference.mla_prefill import mla_prefill_backward
from numerics import assert_close

# Tiles smaller than the sequences, query and key tiles of different sizes, so the interpreter
# sees several tiles per sequence and each kind of causal boundary.
TILES = [dict(BLOCK_M=16, BLOCK_N=16), dict(BLOCK_M=32, BLOCK_N=16), dict(BLOCK_M=16, BLOCK_N=32)]


def make_problem(g, lengths, Hq, Dqk, Dv, dtype, strided=False):
    T = sum(lengths)
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(DEVICE, torch.int32)
    q = torch.randn(T, Hq, Dqk, generator=g).to(DEVICE, dtype)
    if strided:  # k and v as column slices of one projection's output, as MLA splits kv
        kv = torch.randn(T, Hq, Dqk + Dv, generator=g).to(DEVICE, dtype)
        k, v = kv[..., :Dqk], kv[..., Dqk:]
    else:
        k = torch.randn(T, Hq, Dqk, generator=g).to(DEVICE, dtype)
        v = torch.randn(T, Hq, Dv, generator=g).to(DEVICE, dtype)
    return q, k, v, cu_seqlens


@st.composite
def prefill_problems(draw):
    B = draw(st.integers(1, 4))
    lengths = [draw(st.sampled_from([0, 1, 2, 7, 16, 23, 40])) for _ in range(B)]
    Dqk, Dv = draw(st.sampled_from([(24, 16), (48, 32), (16, 40)]))
    Hq = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q, k, v, cu_seqlens = make_problem(g, lengths, Hq, Dqk, Dv, dtype, strided=draw(st.booleans()))
    if draw(st.booleans()):  # a column of a larger index tensor: read by its stride
        cu_seqlens = torch.stack([cu_seqlens, torch.full_like(cu_seqlens, -7)], dim=1)[:, 0]
    causal = draw(st.booleans())
    softmax_scale = draw(st.sampled_from([0.5, 1.0, 3.0])) / Dqk**0.5  # softmax flat to peaked
    return q, k, v, cu_seqlens, causal, softmax_scale, draw(st.sampled_from(TILES))


def _keys(cu_seqlens):
    return max(1, int(torch.diff(cu_seqlens).max())) if cu_seqlens.numel() > 1 else 1


@settings(max_examples=12)
@given(problem=prefill_problems())
def test_mla_prefill_matches_reference(backend, problem):
    q, k, v, cu_seqlens, causal, softmax_scale, tiles = problem
    with tuning.override(**tiles):
        out, lse = mla_prefill(q, k, v, cu_seqlens, causal=causal, softmax_scale=softmax_scale)
    want_out, want_lse = reference(q, k, v, cu_seqlens, causal, softmax_scale)
    assert out.dtype == q.dtype and out.shape == v.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:2]
    n = _keys(cu_seqlens) + q.shape[2]
    assert_close(out, want_out, q.dtype, reduction=n, what="out")
    assert_close(lse, want_lse, torch.float32, reduction=n, what="lse")


@settings(max_examples=8)
@given(problem=prefill_problems())
def test_mla_prefill_backward_matches_reference(backend, problem):
    q, k, v, cu_seqlens, causal, softmax_scale, tiles = problem
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    g = torch.Generator().manual_seed(0)
    grad_out = torch.randn(v.shape, generator=g).to(DEVICE, v.dtype)
    grad_lse = torch.randn(q.shape[:2], generator=g).to(DEVICE)
    with tuning.override(**tiles):
        out, lse = mla_prefill(*inputs, cu_seqlens, causal=causal, softmax_scale=softmax_scale)
        torch.autograd.backward((out, lse), (grad_out, grad_lse))
    want = mla_prefill_backward(grad_out, grad_lse, q, k, v, None, None, cu_seqlens, causal,
                                softmax_scale)
    n = _keys(cu_seqlens) + q.shape[2] + v.shape[2]
    # d q and d k sum dS = P (dP - delta) against k or q, where dP and delta are dot products
    # of Dv terms that cancel: their error follows those terms' size, not dS's.
    dp = softmax_scale * v.shape[2] ** 0.5 * _rms(grad_out) * _rms(v)
    for got, expected, name, size in zip([t.grad for t in inputs], want, ["d q", "d k", "d v"],
                                         [dp * _rms(k), dp * _rms(q), 1.0]):
        assert_close(got, expected, q.dtype, reduction=n, what=name, scale=max(1.0, size))


def _rms(t):
    return t.double().pow(2).mean().sqrt().item() if t.numel() else 0.0


@pytest.mark.parametrize("causal", [True, False])
def test_deepseek_v3_head_dims(backend, causal):
    """Dqk = 128 + 64 (the split the kernels make exactly), Dv = 128, fwd and bwd."""
    q, k, v, cu_seqlens = make_problem(torch.Generator().manual_seed(1), [5, 0, 19], 1, 192, 128,
                                       torch.float32)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    with tuning.override(**TILES[0]):
        out, lse = mla_prefill(*inputs, cu_seqlens, causal=causal, softmax_scale=192**-0.5)
        (out.square().sum() + lse.sum()).backward()
    want_out, want_lse = reference(q, k, v, cu_seqlens, causal, 192**-0.5)
    assert_close(out, want_out, torch.float32, reduction=19 + 192, what="out")
    assert_close(lse, want_lse, torch.float32, reduction=19 + 192, what="lse")
    want = mla_prefill_backward(2 * want_out, torch.ones_like(want_lse), q, k, v, None, None,
                                cu_seqlens, causal, 192**-0.5)
    for got, expected, name in zip([t.grad for t in inputs], want, ["d q", "d k", "d v"]):
        assert_close(got, expected, torch.float32, reduction=19 + 192 + 128, what=name)


@pytest.mark.parametrize("causal", [True, False])
def test_torch_path_chunks(monkeypatch, causal):
    """The torch path's chunk plan at toy budgets: short sequences packed block-diagonally, long
    ones cut into pieces of rows, both next to each other."""
    from ds_kernels.cpu import mla_prefill as cpu
    monkeypatch.setattr(cpu, "_MIN_ROWS", 3)
    knobs = dict(cpu.KNOBS, score_elements=2 * 40 * 7, pack_elements=2 * 9**2)
    q, k, v, cu_seqlens = make_problem(torch.Generator().manual_seed(4), [2, 3, 0, 4, 40, 1, 9, 23],
                                       2, 24, 16, torch.float64)
    plan = cpu._plan(cu_seqlens, 2, causal, knobs)
    assert any(b is not None and b.shape[0] == 9 for _, _, b in plan), "2 + 3 + 4 packed"
    assert sum(keys.start == 9 for _, keys, _ in plan) > 1, "the 40 tokens from 9 cut"
    assert sum(r.stop - r.start for r, _, _ in plan) == q.shape[0]
    with tuning.override(**knobs):
        out, lse = cpu.mla_prefill(q, k, v, cu_seqlens, causal, 0.3)
    want_out, want_lse = reference(q, k, v, cu_seqlens, causal, 0.3)
    assert_close(out, want_out, torch.float64, what="out")
    assert_close(lse, want_lse, torch.float32, what="lse")
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    with tuning.override(**knobs):
        got = cpu.mla_prefill_backward(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens, causal,
                                       0.3)
    want = mla_prefill_backward(grad_out, grad_lse, q, k, v, None, None, cu_seqlens, causal, 0.3)
    for g, w, name in zip(got, want, ["d q", "d k", "d v"]):
        assert_close(g, w, torch.float32, reduction=40, what=name)  # through the fp32 lse


@pytest.mark.parametrize("lengths", [[], [0], [0, 0]])
def test_no_tokens(backend, lengths):
    q, k, v, cu_seqlens = make_problem(torch.Generator(), lengths, 2, 24, 16, torch.float32)
    out, lse = mla_prefill(q, k, v, cu_seqlens, softmax_scale=0.2)
    assert out.shape == (0, 2, 16) and lse.shape == (0, 2)


@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_float64(backend, causal):
    q, k, v, cu_seqlens = make_problem(torch.Generator().manual_seed(2), [3, 0, 18], 2, 20, 12,
                                       torch.float64)
    inputs = [t.requires_grad_() for t in (q, k, v)]

    def out_only(q, k, v):  # lse is fp32 by contract: too coarse for finite differences
        return mla_prefill(q, k, v, cu_seqlens, causal=causal, softmax_scale=0.4)[0]

    with tuning.override(**TILES[0]):
        assert torch.autograd.gradcheck(out_only, inputs, fast_mode=True)


def test_opcheck_and_compile():
    q, k, v, cu_seqlens = make_problem(torch.Generator().manual_seed(3), [4, 9], 2, 24, 16,
                                       torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.ds_kernels.mla_prefill.default,
                          (q, k, v, cu_seqlens, True, 0.3))
    grad_out, grad_lse = torch.randn_like(v), torch.randn(q.shape[:2], device=DEVICE)
    saved = [t.detach() for t in (q, k, v, *reference(q, k, v, cu_seqlens, True, 0.3))]
    torch.library.opcheck(torch.ops.ds_kernels.mla_prefill_backward.default,  # no double backward
                          (grad_out, grad_lse, *saved, cu_seqlens, True, 0.3))

    @torch.compile(fullgraph=True)
    def f(q, k, v, cu_seqlens):
        out, lse = mla_prefill(q, k, v, cu_seqlens, softmax_scale=0.3)
        return (out * grad_out).sum() + (lse * grad_lse).sum()

    f(q, k, v, cu_seqlens).backward()
    want = mla_prefill_backward(grad_out, grad_lse, q.detach(), k.detach(), v.detach(), None, None,
                                cu_seqlens, True, 0.3)
    for got, expected, name in zip([q.grad, k.grad, v.grad], want, ["d q", "d k", "d v"]):
        assert_close(got, expected, torch.float32, reduction=9 + 24 + 16, what=name)


def _args(T=4, Hq=2, Dqk=24, Dv=16, dtype=torch.float32, cu=(0, 1, 4)):
    return (torch.zeros(T, Hq, Dqk, dtype=dtype), torch.zeros(T, Hq, Dqk, dtype=dtype),
            torch.zeros(T, Hq, Dv, dtype=dtype), torch.tensor(cu, dtype=torch.int32))


def _with(index, value, **kwargs):
    args = list(_args(**kwargs))
    args[index] = value
    return tuple(args)


@pytest.mark.parametrize("args,kwargs,error,match", [
    (_with(1, torch.zeros(4, 2, 20)), {}, ValueError, "k must have q's shape"),
    (_with(2, torch.zeros(4, 3, 16)), {}, ValueError, r"v must be \[T=4, Hq=2, Dv\]"),
    (_with(2, torch.zeros(4, 2, 16, dtype=torch.float16)), {}, TypeError, "v has dtype"),
    (_args(Dqk=260), {}, ValueError, r"Dqk must be in \[1, 256\], got 260"),
    (_args(Dv=0), {}, ValueError, r"Dv must be in \[1, 256\], got 0"),
    (_args(dtype=torch.int32), {}, TypeError, "q must have dtype"),
    (_with(0, torch.zeros(4, 24)), {}, ValueError, "q must be 3-D"),
    (_with(3, torch.tensor([0, 1, 4])), {}, TypeError, "cu_seqlens must have dtype"),
    (_with(3, torch.tensor([[0, 4]], dtype=torch.int32)), {}, ValueError, "cu_seqlens must be 1-D"),
    (_with(3, torch.tensor([0], dtype=torch.int32)), {}, ValueError, "B >= 1 for T=4"),
    (_with(3, torch.tensor([0, 3, 2, 4], dtype=torch.int32)), {}, ValueError, "non-decreasing"),
    (_with(3, torch.tensor([1, 4], dtype=torch.int32)), {}, ValueError, "from 0 to T=4"),
    (_with(3, torch.tensor([0, 3], dtype=torch.int32)), {}, ValueError, "from 0 to T=4"),
    (_args(), {"causal": 1}, TypeError, "causal must be a bool"),
    (_args(), {"softmax_scale": None}, TypeError, "softmax_scale must be a float"),
    (_args(), {"softmax_scale": float("nan")}, ValueError, "softmax_scale must be finite"),
])
def test_bad_arguments_raise_clear_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        mla_prefill(*args, **{"softmax_scale": 0.1, **kwargs})


def test_softmax_scale_is_required():
    with pytest.raises(TypeError, match="softmax_scale"):
        mla_prefill(*_args())


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("poison", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_stays_in_its_rows(backend, causal, poison, value):
    """A NaN or inf in one token of one sequence (reference/mla_prefill.py's policy): only the
    rows of that head that see it are NaN - no other sequence packed beside it, no earlier
    query of its own - and no gradient anywhere turns NaN (poisoned rows are constants)."""
    g = torch.Generator().manual_seed(21)
    lengths = [5, 23, 9, 3]                                       # short: the torch path packs them
    q, k, v, cu_seqlens = make_problem(g, lengths, 2, 24, 16, torch.float32)
    bad_token, head = 5 + 12, 1                                   # token 12 of sequence 1
    dirty = [t.clone() for t in (q, k, v)]
    dirty["qkv".index(poison)][bad_token, head, 3] = value
    want_bad = torch.zeros(q.shape[:2], dtype=torch.bool)
    if poison == "q":
        want_bad[bad_token, head] = True
    else:  # the queries that see key 12: the later ones of its sequence, or all of it
        want_bad[bad_token if causal else 5:5 + 23, head] = True
    grad_out = torch.randn(v.shape, generator=g).to(DEVICE)
    grad_lse = torch.randn(q.shape[:2], generator=g).to(DEVICE)

    def run(inputs):
        inputs = [t.detach().clone().requires_grad_() for t in inputs]
        with tuning.override(**TILES[1]):
            out, lse = mla_prefill(*inputs, cu_seqlens, causal=causal, softmax_scale=0.3)
            torch.autograd.backward((out, lse), (grad_out, grad_lse))
        return out.detach(), lse.detach(), [t.grad for t in inputs]

    out, lse, grads = run(dirty)
    assert torch.equal(lse.isnan().cpu(), want_bad)
    assert torch.equal(out.isnan().all(-1).cpu(), want_bad) and not out[~want_bad].isnan().any()
    want_out, want_lse = reference(*dirty, cu_seqlens, causal, 0.3)
    n = 23 + 24 + 16
    assert_close(out, want_out, torch.float32, reduction=n, what="out")
    assert_close(lse, want_lse, torch.float32, reduction=n, what="lse")
    want_grads = mla_prefill_backward(grad_out, grad_lse, *dirty, None, None, cu_seqlens, causal,
                                      0.3)
    for got, want, name in zip(grads, want_grads, ["d q", "d k", "d v"]):
        assert got.isfinite().all(), f"{name}: NaN or inf"
        assert_close(got, want, torch.float32, reduction=n, what=name)
    # Every other row, and the keys no poisoned row sees, get exactly the clean answer.
    clean_out, clean_lse, clean_grads = run((q, k, v))
    good = ~want_bad
    assert torch.equal(out[good], clean_out[good]) and torch.equal(lse[good], clean_lse[good])
    assert torch.equal(grads[0][good], clean_grads[0][good]), "d q of clean rows"
    unseen = torch.ones_like(want_bad)
    unseen[5:5 + 23, head] = False
    for got, clean in zip(grads[1:], clean_grads[1:]):
        assert torch.equal(got[unseen], clean[unseen]), "d k, d v of keys no poisoned row sees"
