"""moe_align: the contract's invariants, every backend equal to the reference, errors, opcheck."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ds_kernels
from conftest import DEVICE
from ds_kernels.reference.moe_align import moe_align as reference_moe_align
from ds_kernels.reference.moe_align import padded_length
from numerics import VIEWS, as_view


@st.composite
def alignment_problems(draw):
    E = draw(st.integers(1, 40))
    k = draw(st.integers(1, min(E, 8)))
    T = draw(st.sampled_from([0, 1, 2, 7, 64, 150]))
    block_m = draw(st.sampled_from([1, 4, 5, 16, 64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    layout = draw(st.sampled_from(["uniform", "one expert", "skewed", "with excluded"]))
    if layout == "uniform":  # distinct experts per token, as a router gives
        ids = torch.rand(T, E, generator=g).argsort(-1)[:, :k]
    elif layout == "one expert":
        ids = torch.full((T, k), draw(st.integers(0, E - 1)))
    elif layout == "skewed":  # most experts get nothing
        ids = torch.randint(0, max(1, E // 4), (T, k), generator=g)
    else:  # -1 (another rank's expert) and ids past E are excluded
        ids = torch.randint(-2, E + 3, (T, k), generator=g)
    dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    # An expanded view routes every token like the first.
    return as_view(ids.to(DEVICE, dtype), draw(VIEWS)), E, block_m


def check_invariants(alignment, topk_ids, E, block_m):
    sorted_ids, expert_ids, num_post, counts = (t.cpu() for t in alignment)
    flat = topk_ids.reshape(-1).long().cpu()
    N = flat.numel()
    P = padded_length(N, E, block_m)
    assert sorted_ids.shape == (P,) and expert_ids.shape == (P // block_m,)
    assert all(t.dtype == torch.int32 for t in (sorted_ids, expert_ids, num_post, counts))
    valid = (flat >= 0) & (flat < E)
    assert torch.equal(counts.long(), torch.bincount(flat[valid], minlength=E)[:E])
    n = int(num_post)
    assert n % block_m == 0 and n <= P
    assert n == int(((counts + block_m - 1) // block_m * block_m).sum())
    # Each valid assignment exactly once; everything else is the sentinel.
    real = sorted_ids != N
    assert torch.equal(sorted_ids[real].sort().values, valid.nonzero().flatten().int())
    assert not real[n:].any()
    # Each block holds one expert's assignments only, in assignment order; -1 past the end.
    blocks = sorted_ids.view(-1, block_m)
    for b in range(P // block_m):
        e = int(expert_ids[b])
        if b * block_m >= n:
            assert e == -1
            continue
        members = blocks[b][blocks[b] != N].long()
        assert 0 <= e < E and (flat[members] == e).all()
        assert (members.diff() > 0).all()


@settings(max_examples=20)
@given(problem=alignment_problems())
def test_moe_align_matches_reference(backend, problem):
    topk_ids, E, block_m = problem
    alignment = ds_kernels.moe_align(topk_ids, E, block_m)
    check_invariants(alignment, topk_ids, E, block_m)
    for got, want, name in zip(alignment, reference_moe_align(topk_ids, E, block_m),
                               ds_kernels.MoEAlignment._fields):
        assert torch.equal(got, want), name


@settings(max_examples=20)
@given(problem=alignment_problems())
def test_reference_satisfies_the_contract(problem):
    topk_ids, E, block_m = problem
    check_invariants(reference_moe_align(topk_ids, E, block_m), topk_ids, E, block_m)


@pytest.mark.parametrize("chunk", [128, 256])
def test_triton_scan_over_many_chunks(chunk):
    # The default chunk puts small inputs in one chunk; force several, with ragged tails.
    from ds_kernels.kernels.moe_align import moe_align as triton_moe_align

    g = torch.Generator().manual_seed(3)
    topk_ids = torch.rand(97, 64, generator=g).argsort(-1)[:, :6].to(DEVICE)  # 582 assignments
    topk_ids[5, 2] = -1
    got = triton_moe_align(topk_ids, 64, 16, chunk=chunk)
    for a, b in zip(got, reference_moe_align(topk_ids, 64, 16)):
        assert torch.equal(a, b)


def test_padded_length_is_a_shape_bound():
    assert padded_length(8, 256, 64) == 512          # decode: 8 assignments, at most 8 runs
    assert padded_length(4096 * 8, 256, 64) == 32768 + 256 * 63     # prefill: 63 wasted per run
    assert padded_length(10, 4, 8) == 40                             # 10 + 4 * 7 = 38, rounded up
    assert padded_length(0, 8, 16) == 0


def test_opcheck():
    ids = torch.randint(0, 8, (5, 2), device=DEVICE, dtype=torch.int32)
    torch.library.opcheck(torch.ops.ds_kernels.moe_align.default, (ids, 8, 4))


@pytest.mark.parametrize("args,error,match", [
    ((torch.zeros(4, 2, dtype=torch.float32), 8, 16), TypeError, "topk_ids must have dtype"),
    ((torch.zeros(8, dtype=torch.int32), 8, 16), ValueError, "topk_ids must be 2-D"),
    ((torch.zeros(4, 2, dtype=torch.int32), 0, 16), ValueError, "num_experts must be >= 1"),
    ((torch.zeros(4, 2, dtype=torch.int32), 8, 0), ValueError, "block_m must be >= 1"),
    ((torch.zeros(4, 2, dtype=torch.int32), 8, 16.0), TypeError, "block_m must be an int"),
])
def test_bad_arguments_raise_clear_errors(args, error, match):
    with pytest.raises(error, match=match):
        ds_kernels.moe_align(*args)


def test_too_many_assignments_for_int32_slots():
    huge = torch.empty(2**28, 8, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match="beyond the int32 indices"):
        ds_kernels.moe_align(huge, 256, 64)


def test_strided_ids(backend):
    # a [T, 1] slice of a wider tensor reshapes to a strided view, not a copy
    topk_ids = torch.tensor([[0, 1], [0, 1], [1, 0]], device=DEVICE)[:, :1]
    got = ds_kernels.moe_align(topk_ids, 2, 1)
    assert got.expert_counts.tolist() == [2, 1]
    for a, b in zip(got, reference_moe_align(topk_ids, 2, 1)):
        assert torch.equal(a, b)
