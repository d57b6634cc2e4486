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
def grouped_problems(draw):
    E = draw(st.integers(1, 5))
    M = draw(st.sampled_from([0, 1, 7, 40]))
    K = draw(st.sampled_from([1, 16, 33]))
    N = draw(st.sampled_from([1, 8, 24, 40]))
    layout = draw(st.sampled_from(["random", "one group", "tail unused"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if layout == "one group":
        sizes = torch.zeros(E, dtype=torch.int64)
        sizes[draw(st.integers(0, E - 1))] = M
    else:
        cuts = torch.randint(0, M + 1, (E,), generator=g)
        sizes = torch.diff(torch.sort(cuts).values, prepend=torch.zeros(1, dtype=torch.int64))
        if layout == "tail unused":
            sizes[-1] = 0
    offs = sizes.cumsum(0).to(torch.int32)
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

