"""grouped_mm: every backend against the reference, forward and backward; strided b; empty
groups; rows past the last group; errors; opcheck, gradcheck and torch.compile."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ds_kernels
from conftest import DEVICE, backend_fixture
from ds_kernels import tuning
from ds_kernels.reference.grouped_mm import grouped_mm as reference, grouped_mm_backward
from numerics import SEEDS, VIEWS, as_view, assert_close, random_like

# Small tiles keep the interpreter's program count low and still leave ragged tails.
SMALL_TILES = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)

backend = backend_fixture("mm_loop", "grouped_mm")


@st.composite
def group_ends(draw, E, M, g):
    """offs int32 [E]: M rows cut into E groups - at random, all in one group, or with the last
    group empty."""
    layout = draw(st.sampled_from(["random", "one group", "tail unused"]))
    if layout == "one group":
        sizes = torch.zeros(E, dtype=torch.int64)
        sizes[draw(st.integers(0, E - 1))] = M
    else:
        cuts = torch.randint(0, M + 1, (E,), generator=g)
        sizes = torch.diff(torch.sort(cuts).values, prepend=torch.zeros(1, dtype=torch.int64))
        if layout == "tail unused":
            sizes[-1] = 0
    return sizes.cumsum(0).to(torch.int32)


@st.composite
def grouped_problems(draw):
    E = draw(st.integers(1, 5))
    M = draw(st.sampled_from([0, 1, 7, 40]))
    K = draw(st.sampled_from([1, 16, 33]))
    N = draw(st.sampled_from([1, 8, 24, 40]))
    g = torch.Generator().manual_seed(draw(SEEDS, label="seed"))
    offs = draw(group_ends(E, M, g))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    a = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    if draw(st.booleans()):  # b as the transpose of an [E, N, K] weight
        b = torch.randn(E, N, K, generator=g).to(DEVICE, dtype).transpose(1, 2)
    else:
        b = torch.randn(E, K, N, generator=g).to(DEVICE, dtype)
    return (as_view(a, draw(VIEWS)), as_view(b, draw(VIEWS)),
            as_view(offs.to(DEVICE), draw(VIEWS)))


@settings(max_examples=25)
@given(problem=grouped_problems())
def test_grouped_mm_matches_reference(backend, problem):
    a, b, offs = problem
    with tuning.override(**SMALL_TILES):
        out = ds_kernels.grouped_mm(a, b, offs)
    assert out.dtype == a.dtype and out.shape == (a.shape[0], b.shape[2])
    assert_close(out, reference(a, b, offs), a.dtype, reduction=a.shape[1], what="out")
    assert not out[int(offs[-1]):].any(), "rows past offs[-1] must be 0"


@settings(max_examples=15)
@given(problem=grouped_problems(), seed=SEEDS)
def test_grouped_mm_backward_matches_reference(backend, problem, seed):
    a, b, offs = problem
    a, b = a.clone().requires_grad_(), b.detach().clone().requires_grad_()
    grad_out = random_like(a.new_empty(a.shape[0], b.shape[2]), seed)
    with tuning.override(**SMALL_TILES):
        ds_kernels.grouped_mm(a, b, offs).backward(grad_out)
    want_a, want_b = grouped_mm_backward(grad_out, a.detach(), b.detach(), offs)
    assert_close(a.grad, want_a, a.dtype, reduction=b.shape[2], what="d a")
    assert_close(b.grad, want_b, a.dtype, reduction=max(1, a.shape[0]), what="d b")


def test_gradcheck_float64(backend):
    a = torch.randn(9, 8, dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.randn(3, 5, 8, dtype=torch.float64, device=DEVICE).transpose(1, 2).requires_grad_()
    offs = torch.tensor([2, 2, 7], dtype=torch.int32, device=DEVICE)
    with tuning.override(**SMALL_TILES):
        assert torch.autograd.gradcheck(lambda a, b: ds_kernels.grouped_mm(a, b, offs), (a, b),
                                          fast_mode=True)


def test_opcheck_and_compile():
    a = torch.randn(10, 16, device=DEVICE, requires_grad=True)
    b = torch.randn(3, 16, 8, device=DEVICE, requires_grad=True)
    offs = torch.tensor([3, 3, 7], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(torch.ops.ds_kernels.grouped_mm.default, (a, b, offs))

    @torch.compile(fullgraph=True)
    def f(a, b, offs):
        return ds_kernels.grouped_mm(a, b, offs).relu().sum()

    f(a, b, offs).backward()
    assert_close(b.grad, grouped_mm_backward((reference(a, b, offs) > 0).float(), a.detach(),
                                             b.detach(), offs)[1], torch.float32, reduction=10)


@pytest.mark.parametrize("args,error,match", [
    ((torch.zeros(4, 8), torch.zeros(2, 7, 3), torch.tensor([1, 4], dtype=torch.int32)),
     ValueError, "K differs"),
    ((torch.zeros(4, 8), torch.zeros(2, 8, 3, dtype=torch.float16),
      torch.tensor([1, 4], dtype=torch.int32)), TypeError, "b has dtype"),
    ((torch.zeros(4, 8), torch.zeros(2, 8, 3), torch.tensor([1, 4])), TypeError,
     "offs must have dtype"),
    ((torch.zeros(4, 8), torch.zeros(2, 8, 3), torch.tensor([4], dtype=torch.int32)),
     ValueError, "one entry per group"),
    ((torch.zeros(4, 8), torch.zeros(2, 8, 3), torch.tensor([3, 1], dtype=torch.int32)),
     ValueError, "non-decreasing"),
    ((torch.zeros(4, 8), torch.zeros(2, 8, 3), torch.tensor([3, 5], dtype=torch.int32)),
     ValueError, r"in \[0, M=4\]"),
    ((torch.zeros(4, 8, dtype=torch.int32), torch.zeros(2, 8, 3),
      torch.tensor([1, 4], dtype=torch.int32)), TypeError, "a must have dtype"),
])
def test_bad_arguments_raise_clear_errors(args, error, match):
    with pytest.raises(error, match=match):
        ds_kernels.grouped_mm(*args)



# A quantised b: the transpose of a weight [E, N, K] quantised along K (FP8 blocks with fp32 /
# ue8m0-valued / e8m0 scales, MXFP4), on every backend against the reference on the
# dequantised b. FP8 blocks are square, so b quantised in its own [E, K, N] layout is one too.
FORMATS = ["fp8", "fp8 ue8m0", "fp8 e8m0 scales", "fp8 in b's layout", "mxfp4"]


def quantized_b(fmt, w):
    """(b, b_scale) for the weight w [E, N, K] in one of FORMATS."""
    if fmt == "mxfp4":
        w_q, scale = ds_kernels.quantize_mxfp4(w)
        return w_q.mT, scale.mT
    if fmt == "fp8 in b's layout":
        return ds_kernels.quantize_fp8_block(w.mT.contiguous())
    w_q, scale = ds_kernels.quantize_fp8_block(w, scale_fmt="float" if fmt == "fp8" else "ue8m0")
    if fmt == "fp8 e8m0 scales":
        scale = scale.to(torch.float8_e8m0fnu)
    return w_q.mT, scale.mT


def code_view(t, view):
    """as_view for code and scale tensors (float8/float4 have few ops): through their bytes."""
    if t.dtype == torch.float32:
        return as_view(t, view)
    return as_view(t.view(torch.uint8), view).view(t.dtype)


@st.composite
def quantized_problems(draw, formats=FORMATS):
    fmt = draw(st.sampled_from(formats))
    E = draw(st.integers(1, 4))
    M = draw(st.sampled_from([0, 1, 7, 40]))
    K = draw(st.sampled_from([32, 64] if fmt == "mxfp4" else [1, 33, 130]))
    N = draw(st.sampled_from([1, 24, 130]))
    g = torch.Generator().manual_seed(draw(SEEDS, label="seed"))
    offs = draw(group_ends(E, M, g))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    a = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    b, b_scale = quantized_b(fmt, torch.randn(E, N, K, generator=g).to(DEVICE))
    return (as_view(a, draw(VIEWS)), code_view(b, draw(VIEWS)), code_view(b_scale, draw(VIEWS)),
            as_view(offs.to(DEVICE), draw(VIEWS)))


def _terms(a, b, b_scale, offs):
    """The size of out's terms (no cancellation), spread over the reduction."""
    b_abs = ds_kernels.dequantize(b.mT, b_scale.mT).mT.abs()
    return (reference(a.abs(), b_abs.to(a.dtype), offs).double() / a.shape[1] ** 0.5).clamp_min(1)


@settings(max_examples=25)
@given(problem=quantized_problems())
def test_quantized_grouped_mm_matches_reference(backend, problem):
    a, b, b_scale, offs = problem
    with tuning.override(**SMALL_TILES, chunk_elements=300):
        out = ds_kernels.grouped_mm(a, b, offs, b_scale=b_scale)
    assert out.dtype == a.dtype and out.shape == (a.shape[0], b.shape[2])
    # Weight tiles are rounded to a's dtype before the GEMM: an error relative to the terms.
    assert_close(out, reference(a, b, offs, b_scale), a.dtype, reduction=a.shape[1],
                 what="out", scale=_terms(a, b, b_scale, offs))
    assert not out[int(offs[-1]):].any(), "rows past offs[-1] must be 0"


@settings(max_examples=15)
@given(problem=quantized_problems(), seed=SEEDS)
def test_quantized_grouped_mm_backward_matches_reference(backend, problem, seed):
    a, b, b_scale, offs = problem
    a = a.clone().requires_grad_()
    grad_out = random_like(a.new_empty(a.shape[0], b.shape[2]), seed)
    with tuning.override(**SMALL_TILES, chunk_elements=300):
        ds_kernels.grouped_mm(a, b, offs, b_scale=b_scale).backward(grad_out)
    want, no_grad = grouped_mm_backward(grad_out, None, b, offs, b_scale)
    assert no_grad is None and a.grad.dtype == a.dtype
    b_abs = ds_kernels.dequantize(b.mT, b_scale.mT, torch.float64).mT.abs()
    terms = (grouped_mm_backward(grad_out.abs().double(), a.detach().double(), b_abs,
                                 offs)[0] / b.shape[2] ** 0.5).clamp_min(1)
    assert_close(a.grad, want, a.dtype, reduction=b.shape[2], what="d a", scale=terms)


def test_quantized_opcheck_and_compile():
    a = torch.randn(10, 64, device=DEVICE, requires_grad=True)
    offs = torch.tensor([3, 3, 7], dtype=torch.int32, device=DEVICE)
    for fmt in ["fp8 e8m0 scales", "mxfp4"]:
        b, b_scale = quantized_b(fmt, torch.randn(3, 24, 64, device=DEVICE))
        codes, scales = b.view(torch.uint8), b_scale.view(torch.uint8)
        name = "mxfp4" if fmt == "mxfp4" else "fp8"
        with tuning.override(**SMALL_TILES):
            torch.library.opcheck(torch.ops.ds_kernels.grouped_mm_quant.default,
                                  (a, codes, scales, offs, name, False))
            if name == "fp8":  # w8a8: inference only
                torch.library.opcheck(torch.ops.ds_kernels.grouped_mm_quant.default,
                                      (a.detach(), codes, scales, offs, name, True))
            torch.library.opcheck(torch.ops.ds_kernels.grouped_mm_quant_backward.default,
                                  (torch.randn(10, 24, device=DEVICE), codes, scales, offs, name))
    b, b_scale = quantized_b("fp8", torch.randn(3, 24, 64, device=DEVICE))

    @torch.compile(fullgraph=True)
    def f(a):
        return ds_kernels.grouped_mm(a, b, offs, b_scale=b_scale).relu().sum()

    f(a).backward()
    positive = (reference(a.detach(), b, offs, b_scale) > 0).float()
    assert_close(a.grad, grouped_mm_backward(positive, None, b, offs, b_scale)[0],
                 torch.float32, reduction=24)


@settings(max_examples=20)
@given(problem=quantized_problems(formats=[f for f in FORMATS if f.startswith("fp8")]))
def test_w8a8_grouped_mm_matches_reference(backend, problem):
    """act_quant="fp8": a's rows quantised per 128 columns (the reference's codes exactly, so
    only summation order is left) times the e4m3 weights."""
    a, b, b_scale, offs = problem
    with tuning.override(**SMALL_TILES, chunk_elements=300):  # w8a8 keeps BLOCK_K = 128
        out = ds_kernels.grouped_mm(a, b, offs, b_scale=b_scale, act_quant="fp8")
    assert out.dtype == a.dtype and out.shape == (a.shape[0], b.shape[2])
    assert_close(out, reference(a, b, offs, b_scale, w8a8=True), a.dtype, reduction=a.shape[1],
                 what="out", scale=_terms(a, b, b_scale, offs))
    assert not out[int(offs[-1]):].any(), "rows past offs[-1] must be 0"


def _fp8_b(E=2, K=64, N=24):
    w_q, scale = ds_kernels.quantize_fp8_block(torch.randn(E, N, K))
    return w_q.mT, scale.mT


OFFS = torch.tensor([1, 4], dtype=torch.int32)


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((torch.zeros(4, 64), _fp8_b()[0], OFFS), {}, TypeError,
     "b is torch.float8_e4m3fn, a quantised weight: pass its scales as b_scale"),
    ((torch.zeros(4, 64), torch.zeros(2, 64, 24), OFFS), dict(b_scale=_fp8_b()[1]), TypeError,
     "b_scale is given, so b must be quantised"),
    ((torch.zeros(4, 64), _fp8_b()[0], OFFS), dict(b_scale=torch.ones(2, 1, 2)), ValueError,
     r"b_scale.mT must have shape \[2, 1, 1\] for b.mT of shape \(2, 24, 64\)"),
    ((torch.zeros(4, 64), _fp8_b()[0], OFFS),
     dict(b_scale=torch.ones(2, 1, 1, dtype=torch.float16)), TypeError,
     "b_scale.mT of the fp8 weight b.mT must have dtype"),
    ((torch.zeros(4, 65), *_fp8_b()[:1], OFFS), dict(b_scale=_fp8_b()[1]), ValueError,
     "K differs"),
    ((torch.zeros(4, 64), *_fp8_b()[:1], torch.tensor([4], dtype=torch.int32)),
     dict(b_scale=_fp8_b()[1]), ValueError, "one entry per group"),
    ((torch.zeros(4, 64), *_fp8_b()[:1], torch.tensor([3, 5], dtype=torch.int32)),
     dict(b_scale=_fp8_b()[1]), ValueError, r"in \[0, M=4\]"),
    ((torch.zeros(4, 64, dtype=torch.int32), *_fp8_b()[:1], OFFS), dict(b_scale=_fp8_b()[1]),
     TypeError, "a must have dtype"),
])
def test_quantized_bad_arguments_raise_clear_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        ds_kernels.grouped_mm(*args, **kwargs)


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((torch.zeros(4, 64), torch.zeros(2, 64, 24), OFFS), {}, ValueError,
     "b must be float8_e4m3fn with their scales, got torch.float32"),
    ((torch.zeros(4, 64), *quantized_b("mxfp4", torch.randn(2, 24, 64))[:1], OFFS),
     dict(b_scale=quantized_b("mxfp4", torch.randn(2, 24, 64))[1]), ValueError, "got mxfp4"),
    ((torch.zeros(4, 64, requires_grad=True), *_fp8_b()[:1], OFFS), dict(b_scale=_fp8_b()[1]),
     RuntimeError, r"grouped_mm\(act_quant='fp8'\) is an inference path"),
    ((torch.zeros(4, 64), *_fp8_b()[:1], OFFS), dict(b_scale=_fp8_b()[1], act_quant="fp4"),
     ValueError, "act_quant must be one of"),
])
def test_w8a8_bad_arguments_raise_clear_errors(args, kwargs, error, match):
    kwargs = {"act_quant": "fp8", **kwargs}
    with pytest.raises(error, match=match):
        ds_kernels.grouped_mm(*args, **kwargs)


def test_quantized_b_refuses_gradients():
    b, b_scale = _fp8_b()
    b_scale.requires_grad_()
    with pytest.raises(ValueError, match="b_scale requires grad, but quantised weights are "
                       "frozen"):
        ds_kernels.grouped_mm(torch.zeros(4, 64), b, OFFS, b_scale=b_scale)
