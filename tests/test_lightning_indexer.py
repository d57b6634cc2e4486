"""lightning_indexer against its reference on every backend: exact slots on integer-valued data
(ties everywhere, broken by position), a valid top-k within tolerance on random data; ragged
sequences on shuffled pages, fewer visible keys than top_k, 0 and 1 queries, splits, strided and
expanded views, NaN kept to its own sequence, a 40K-token context on the chunked torch path,
FP8 key rows (index_cache_write's), errors, unchecked bad input, opcheck and torch.compile."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ds_kernels
from conftest import DEVICE
from paged import shuffled_pages
from ds_kernels import tuning
from ds_kernels.cpu.mla_cache_write import quantize_rows
from ds_kernels.ops.lightning_indexer import lightning_indexer
from ds_kernels.reference.lightning_indexer import lightning_indexer as reference
from ds_kernels.testing import tolerance
from numerics import SEEDS, as_view

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=["torch", "torch (a key a chunk)", "triton"])
def backend(request):
    """The backends, plus the torch path scoring one key position a chunk (its chunks are
    otherwise far longer than the tests' contexts)."""
    forced = dict(chunk_elements=1) if "chunk" in request.param else {}
    with ds_kernels.use_backend(request.param.split()[0]), tuning.override(**forced):
        yield request.param


def make_problem(g, lens, queries, H, D, block_size, dtype, integer, garbage=float("nan")):
    """(q, weights, k_cache, block_table, query_seq, query_pos) for sequences of ``lens`` keys
    on shuffled pages, with ``queries`` (sequence, position) pairs. Rows no query may read, spare
    pages and table entries past each sequence's pages hold garbage. Integer data (small ints,
    weights in quarters) makes every score exact in every dtype, so ties abound."""
    table, used = shuffled_pages(g, lens, block_size)

    def draw(*shape):
        if integer:
            return torch.randint(-2, 3, shape, generator=g).float()
        return torch.randn(shape, generator=g)

    cache = draw(used.shape[0], block_size, D)
    cache[~used] = garbage
    q = draw(len(queries), H, D)
    weights = draw(len(queries), H) / 4 if integer else torch.randn(len(queries), H, generator=g)
    seq = torch.tensor([s for s, _ in queries], dtype=torch.int32)
    pos = torch.tensor([p for _, p in queries], dtype=torch.int32)
    return (q.to(DEVICE, dtype), weights.to(DEVICE), cache.to(DEVICE, dtype),
            table.to(DEVICE, torch.int32), seq.to(DEVICE), pos.to(DEVICE))


@st.composite
def problems(draw, integer=True, D=None):
    """(make_problem's arguments, top_k); D: the key width, else drawn."""
    lens = draw(st.lists(st.integers(0, 70), min_size=1, max_size=4))
    if not any(lens):
        lens[0] = draw(st.integers(1, 70))
    seqs = [b for b, n in enumerate(lens) if n]
    queries = draw(st.lists(st.sampled_from(seqs).flatmap(
        lambda b: st.tuples(st.just(b), st.integers(0, lens[b] - 1))), max_size=6))
    shape = dict(H=draw(st.integers(1, 5)), D=D or draw(st.integers(1, 40)),
                 block_size=draw(st.sampled_from([1, 3, 4, 16])),
                 dtype=draw(st.sampled_from(DTYPES)))
    g = torch.Generator().manual_seed(draw(SEEDS))
    return make_problem(g, lens, queries, integer=integer, **shape), draw(st.integers(1, 40))


@settings(max_examples=30)
@given(problem=problems())
def test_exact_slots_with_ties_broken_by_position(backend, problem):
    """Exact scores (integer data): the very slots of the reference - descending score, the
    lower position first among equals, -1 past the visible keys - garbage rows never read."""
    args, top_k = problem
    got = lightning_indexer(*args, top_k)
    assert got.dtype == torch.int32 and got.shape == (args[0].shape[0], top_k)
    assert torch.equal(got.cpu(), reference(*args, top_k).cpu())


def fp8_rows(k_cache):
    """k_cache [num_blocks, block_size, D] as FP8 rows (uint8 [..., D + 4 * D/128])."""
    num_blocks, block_size, D = k_cache.shape
    rows = k_cache.reshape(-1, D)
    return quantize_rows(rows, rows[:, :0]).view(num_blocks, block_size, -1)


@settings(max_examples=20)
@given(problem=problems(D=256))
def test_fp8_keys_give_the_float_keys_slots(backend, problem):
    """Integer keys in [-2, 2] are exact in e4m3 under a power-of-two scale: FP8 rows of the
    cache (two 128-column scales a row) give the very slots of the float cache's reference,
    ties included; the reference reads the FP8 rows to the same slots."""
    (q, weights, k_cache, *rest), top_k = problem
    fp8 = fp8_rows(k_cache)
    assert fp8.dtype == torch.uint8 and fp8.shape[-1] == 256 + 8
    want = reference(q, weights, k_cache, *rest, top_k).cpu()
    assert torch.equal(reference(q, weights, fp8, *rest, top_k).cpu(), want)
    assert torch.equal(lightning_indexer(q, weights, fp8, *rest, top_k).cpu(), want)


def _scores(q, weights, k_cache, slots):
    """fp64 [T, top_k]: the reference score of each returned slot (-inf for -1)."""
    keys = k_cache.reshape(-1, k_cache.shape[-1]).double()
    dots = torch.einsum("thd,tkd->tkh", q.double(), keys[slots.clamp_min(0).long()])
    scores = (dots.clamp_min(0) * weights.double()[:, None, :]).sum(-1)
    return scores.masked_fill(slots < 0, float("-inf"))


@settings(max_examples=20)
@given(problem=problems(integer=False))
def test_a_valid_top_k_within_tolerance(backend, problem):
    """Random data: the slots may differ from the reference's where scores differ by rounding
    only. Each query gets min(top_k, visible) distinct visible slots, in descending order, none
    left out scoring above the last one taken (within the dtype's tolerance)."""
    args, top_k = problem
    q, weights, k_cache, table, seq, pos = args
    got = lightning_indexer(*args, top_k).cpu()
    want = reference(*args, top_k).cpu()
    atol, rtol = tolerance(q.dtype, q.shape[1] * q.shape[2])
    got_scores, want_scores = _scores(q.cpu(), weights.cpu(), k_cache.cpu(), got), _scores(
        q.cpu(), weights.cpu(), k_cache.cpu(), want)
    for t in range(got.shape[0]):
        n = min(top_k, int(pos[t]) + 1)
        taken = got[t, :n].tolist()
        assert (got[t, n:] == -1).all() and len(set(taken)) == n and -1 not in taken
        assert set(taken) <= set(reference(q[t:t + 1], weights[t:t + 1], k_cache, table,
                                           seq[t:t + 1], pos[t:t + 1], 10**6)[0].tolist())
        slack = atol + rtol * want_scores[t, :n].abs().max()
        assert (got_scores[t, :n] - want_scores[t, :n]).abs().max() <= 2 * slack


def test_splits_merge_ragged_parts(backend):
    """Two queries on one sequence of 200 keys, the interpreter's 4-program "GPU": each query's
    keys are cut into splits, some empty (the shorter query), merged into the same slots."""
    g = torch.Generator().manual_seed(3)
    args = make_problem(g, [200, 5], [(0, 199), (0, 20), (1, 4)], 4, 24, 16, torch.float32,
                        integer=True)
    for top_k in (1, 17, 64, 256):
        assert torch.equal(lightning_indexer(*args, top_k).cpu(), reference(*args, top_k).cpu())


def test_zero_and_one_query(backend):
    g = torch.Generator().manual_seed(4)
    args = make_problem(g, [9], [], 2, 8, 4, torch.float32, integer=True)
    assert lightning_indexer(*args, 3).shape == (0, 3)
    args = make_problem(g, [9], [(0, 0)], 2, 8, 4, torch.float32, integer=True)
    got = lightning_indexer(*args, 3).cpu()
    assert got[0, 1:].tolist() == [-1, -1] and got[0, 0] == args[3][0, 0].cpu() * 4


@pytest.mark.parametrize("arg", ["q", "weights", "k_cache", "block_table", "query_seq",
                                 "query_pos"])
@pytest.mark.parametrize("view", ["strided", "expanded"])
def test_every_argument_is_read_by_its_strides(backend, arg, view):
    """Each tensor argument as every other element of a wider tensor, or expanded from its
    first row (stride 0): read as the values it shows."""
    g = torch.Generator().manual_seed(5)
    names = ["q", "weights", "k_cache", "block_table", "query_seq", "query_pos"]
    args = dict(zip(names, make_problem(g, [30, 30, 30], [(0, 29), (1, 12), (2, 29), (0, 3)],
                                        3, 20, 4, torch.float32, integer=True,
                                        garbage=0.0)))
    if view == "expanded" and arg in ("block_table", "k_cache"):
        args["query_seq"] = torch.zeros_like(args["query_seq"])  # every query reads row 0's
    args[arg] = as_view(args[arg], view)
    assert not args[arg].is_contiguous()
    dense = {n: t.contiguous() for n, t in args.items()}
    assert torch.equal(lightning_indexer(**args, top_k=12).cpu(),
                       reference(**dense, top_k=12).cpu())


@pytest.mark.parametrize("poison", ["key", "query", "weight"])
def test_nan_stays_with_its_own_sequence(backend, poison):
    """A NaN in one sequence's visible key (or one query's heads, or weights) scores NaN, which
    ranks as -inf within that query; the other sequences' slots are what they are without it."""
    g = torch.Generator().manual_seed(6)
    q, weights, k_cache, table, seq, pos = make_problem(
        g, [20, 20], [(0, 19), (1, 19), (1, 7)], 3, 16, 4, torch.float32, integer=True)
    clean = lightning_indexer(q, weights, k_cache, table, seq, pos, 8).cpu()
    if poison == "key":  # sequence 0's key at position 5
        k_cache[table[0, 1], 1, 3] = float("nan")
    elif poison == "query":
        q[0, 1, 2] = float("nan")
    else:
        weights[0, 0] = float("nan")
    got = lightning_indexer(q, weights, k_cache, table, seq, pos, 8).cpu()
    assert torch.equal(got, reference(q, weights, k_cache, table, seq, pos, 8).cpu())
    assert torch.equal(got[1:], clean[1:])
    if poison == "key":
        assert (got[0] == int(table[0, 1]) * 4 + 1).sum() <= 1  # ranked as -inf: last if at all


def test_a_40k_context_on_the_chunked_torch_path():
    """One sequence of 40,000 keys (pages of 64), three queries: every chunk size (16 MB, 64 KB
    and one key a chunk would take minutes) gives the slots of a dense, stable-sorted score."""
    g = torch.Generator().manual_seed(7)
    n, H, D = 40_000, 4, 16
    q, weights, k_cache, table, seq, pos = make_problem(
        g, [n], [(0, n - 1), (0, 31_999), (0, 100)], H, D, 64, torch.float32, integer=True)
    keys = k_cache[table[0, torch.arange(n) // 64].long(), torch.arange(n) % 64]   # [n, D]
    scores = (torch.einsum("thd,nd->thn", q.double(), keys.double()).clamp_min(0)
              * weights.double()[..., None]).sum(1)                               # [T, n]
    scores = scores.masked_fill(torch.arange(n)[None, :] > pos[:, None].long(), float("-inf"))
    ranked, order = torch.sort(scores, dim=1, descending=True, stable=True)
    order = order[:, :500]
    want = torch.where(ranked[:, :500] > float("-inf"),  # (the data's scores are finite)
                       table[0, order // 64].long() * 64 + order % 64, -1).int()
    for chunk in (1 << 22, 1 << 14):
        with ds_kernels.use_backend("torch"), tuning.override(chunk_elements=chunk):
            assert torch.equal(lightning_indexer(q, weights, k_cache, table, seq, pos, 500),
                               want)


def _args(**changes):
    g = torch.Generator().manual_seed(8)
    names = ["q", "weights", "k_cache", "block_table", "query_seq", "query_pos"]
    args = dict(zip(names, make_problem(g, [10, 6], [(0, 9), (1, 5)], 2, 8, 4, torch.float32,
                                        integer=True, garbage=0.0)), top_k=4)
    return {**args, **changes}


@pytest.mark.parametrize("changes, error, match", [
    (dict(top_k=0), ValueError, "top_k must be >= 1, got 0"),
    (dict(top_k=2.0), TypeError, "top_k must be an int"),
    (dict(k_cache=torch.zeros(6, 4, 9)), ValueError,
     r"k_cache must be \[num_blocks, block_size, Di=8\] \(q's index head dim\), got \(6, 4, 9\)"),
    (dict(k_cache=torch.zeros(6, 4, 8, dtype=torch.float16)), TypeError,
     "k_cache has dtype torch.float16 but q has torch.float32"),
    (dict(weights=torch.zeros(2, 3)), ValueError, r"weights must be \[T=2, Hi=2\] like q"),
    (dict(query_pos=torch.tensor([9, 16], dtype=torch.int32)), ValueError,
     r"query_pos must be in \[0, max_blocks \* block_size = 16\), got values in \[9, 16\]"),
    (dict(query_pos=torch.tensor([-1, 5], dtype=torch.int32)), ValueError,
     r"got values in \[-1, 5\]"),
    (dict(query_seq=torch.tensor([0, 2], dtype=torch.int32)), ValueError,
     r"query_seq must be in \[0, B=2\) \(block_table's rows\), got values in \[0, 2\]"),
    (dict(block_table=torch.tensor([[0, 1, 9], [2, 3, -1]], dtype=torch.int32)), ValueError,
     r"block_table entries of the pages the queries see must be in \[0, num_blocks=7\), got \[9\]"),
    (dict(query_seq=torch.tensor([0, 1])), TypeError, "query_seq must have dtype in \\(int32\\)"),
    (dict(q=torch.zeros(2, 0, 8), weights=torch.zeros(2, 0)), ValueError, "Hi >= 1"),
    (dict(query_pos=torch.tensor([1], dtype=torch.int32)), ValueError,
     r"query_pos must be \[T=2\] like q, got \(1,\)"),
    (dict(k_cache=torch.zeros(6, 4, 12, dtype=torch.uint8)), ValueError,
     r"an FP8 k_cache \(uint8\) needs Di to be a multiple of 128"),
    (dict(q=torch.zeros(2, 2, 128), k_cache=torch.zeros(7, 4, 128, dtype=torch.uint8)),
     ValueError, r"an FP8 k_cache \(uint8\) must be \[num_blocks, block_size, Di \+ 4 \* "
     r"Di/128 = 132\] bytes"),
])
def test_bad_arguments_raise_clear_errors(changes, error, match):
    with pytest.raises(error, match=match):
        lightning_indexer(**_args(**changes))


def test_table_entries_past_the_pages_in_use_are_not_checked():
    """Sequence 1 sees 6 keys (2 pages of 4): its third entry may hold anything."""
    args = _args(block_table=torch.tensor([[0, 1, 2], [3, 4, 99]], dtype=torch.int32))
    assert (lightning_indexer(**args)[1] >= 0).all()


def test_unchecked_bad_input_never_reads_out_of_bounds(monkeypatch):
    """With the value checks off (as under CUDA graph capture), positions past the table, pages
    outside the cache and sequences outside the table are skipped, not read."""
    from ds_kernels.ops import lightning_indexer as op

    monkeypatch.setattr(op, "_check_values", lambda *args: None)
    args = _args(block_table=torch.tensor([[0, 1, 10**6], [3, -5, 99]], dtype=torch.int32),
                 query_pos=torch.tensor([10**6, 7], dtype=torch.int32))
    with ds_kernels.use_backend("triton"):
        got = lightning_indexer(**args).cpu()
    assert ((got >= -1) & (got < 7 * 4)).all()
    with ds_kernels.use_backend("triton"):
        none = lightning_indexer(**_args(query_seq=torch.tensor([5, -3], dtype=torch.int32)))
    assert (none == -1).all()


def test_opcheck():
    args = _args()
    torch.library.opcheck(torch.ops.ds_kernels.lightning_indexer.default,
                          tuple(args.values()))


def test_torch_compile_fullgraph():
    args = _args()

    @torch.compile(fullgraph=True, backend="eager")
    def select(*a):
        return lightning_indexer(*a)

    assert torch.equal(select(*args.values()), reference(*args.values()))
