"""sparse_mla against its reference on every backend: slots repeated, -1 or all -1, any width
split into value and rest (V4: the whole row), heads past one 16-head group, sinks on and off,
0 and 1 queries, splits over the rows, FP8 caches, strided and expanded views, NaN kept to the
heads that read it; equal to mla_decode when the slots are a sequence's tokens; errors, opcheck
and torch.compile."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ds_kernels
from conftest import DEVICE
from ds_kernels.mla_cache_format import fp8_row_bytes
from ds_kernels.ops.mla_cache_write import mla_cache_write
from ds_kernels.ops.mla_decode import mla_decode
from ds_kernels.ops.sparse_mla import sparse_mla
from ds_kernels.reference.sparse_mla import sparse_mla as reference
from numerics import SEEDS, as_view, assert_close
from paged import shuffled_pages

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    with ds_kernels.use_backend(request.param):
        yield request.param


def make_problem(g, T, Hq, Dk, num_blocks, block_size, top_k, dtype, sinks, unnamed=0.5):
    """(q, kv_cache, slots, sinks): slots drawn with repeats and a share ``unnamed`` of -1;
    rows no slot names hold NaN, which must never reach the output."""
    rows = num_blocks * block_size
    q = torch.randn(T, Hq, Dk, generator=g)
    kv_cache = torch.randn(num_blocks, block_size, Dk, generator=g)
    slots = torch.randint(0, rows, (T, top_k), generator=g)
    slots[torch.rand(T, top_k, generator=g) < unnamed] = -1
    named = torch.zeros(rows, dtype=torch.bool)
    named[slots[slots >= 0]] = True
    kv_cache.view(rows, Dk)[~named] = float("nan")
    sink = torch.randn(Hq, generator=g) if sinks else None
    return (q.to(DEVICE, dtype), kv_cache.to(DEVICE, dtype), slots.int().to(DEVICE),
            None if sink is None else sink.to(DEVICE))


@st.composite
def problems(draw):
    v_dim = draw(st.integers(1, 40))
    shape = dict(T=draw(st.integers(0, 5)), Hq=draw(st.sampled_from([1, 3, 16, 20])),
                 Dk=v_dim + draw(st.sampled_from([0, 1, 16, 24])),
                 num_blocks=draw(st.integers(1, 4)),
                 block_size=draw(st.sampled_from([1, 4, 16])), top_k=draw(st.integers(1, 40)),
                 dtype=draw(st.sampled_from(DTYPES)), sinks=draw(st.booleans()),
                 unnamed=draw(st.sampled_from([0.0, 0.5, 1.0])))
    g = torch.Generator().manual_seed(draw(SEEDS))
    return make_problem(g, **shape), v_dim, draw(st.floats(0.05, 0.5))


def check(got, want, q, slots, what=""):
    out, lse = got
    reduction = slots.shape[1] * q.shape[2]
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert out.shape == want[0].shape and lse.shape == want[1].shape
    assert_close(out, want[0], q.dtype, reduction=reduction, what=f"{what}out")
    assert_close(lse, want[1], q.dtype, reduction=reduction, what=f"{what}lse")


@settings(max_examples=30)
@given(problem=problems())
def test_matches_reference(backend, problem):
    (q, kv_cache, slots, sinks), v_dim, scale = problem
    got = sparse_mla(q, kv_cache, slots, scale, v_dim=v_dim, sinks=sinks)
    check(got, reference(q, kv_cache, slots, scale, v_dim, sinks), q, slots)


@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("top_k", [1, 100, 300])
def test_decode_splits_over_the_rows(backend, top_k, sinks):
    """One query (the interpreter's 4-program "GPU"): its rows are cut into splits, some of
    them all -1, merged by LSE, the sinks folded in once."""
    g = torch.Generator().manual_seed(1)
    q, kv_cache, slots, sink = make_problem(g, 1, 4, 48, 8, 16, top_k, torch.float32, sinks,
                                            unnamed=0.3)
    slots[0, : top_k // 2] = -1  # the first splits name nothing
    check(sparse_mla(q, kv_cache, slots, 0.2, v_dim=32, sinks=sink),
          reference(q, kv_cache, slots, 0.2, 32, sink), q, slots)


def test_no_row_gives_zero_and_minus_inf_or_the_sink(backend):
    g = torch.Generator().manual_seed(2)
    q, kv_cache, slots, sink = make_problem(g, 2, 3, 20, 2, 4, 5, torch.float32, True,
                                            unnamed=1.0)
    out, lse = sparse_mla(q, kv_cache, slots, 0.3, v_dim=16)
    assert (out == 0).all() and (lse == float("-inf")).all()
    out, lse = sparse_mla(q, kv_cache, slots, 0.3, v_dim=16, sinks=sink)
    assert (out == 0).all()
    torch.testing.assert_close(lse, sink.expand(2, 3))  # (Triton: through log2 units)


def test_repeated_slots_count_twice(backend):
    """Naming a row twice doubles its weight: the same as a cache holding it twice."""
    g = torch.Generator().manual_seed(3)
    q, kv_cache, _, _ = make_problem(g, 1, 2, 24, 1, 4, 1, torch.float32, False)
    kv_cache = torch.randn(1, 4, 24, generator=g).to(DEVICE)
    twice = torch.tensor([[0, 1, 1]], dtype=torch.int32, device=DEVICE)
    copied = torch.cat([kv_cache, kv_cache[:, 1:2]], dim=1)        # rows 0, 1, 2, 3, 1
    spelled = torch.tensor([[0, 1, 4]], dtype=torch.int32, device=DEVICE)
    check(sparse_mla(q, kv_cache, twice, 0.5, v_dim=16),
          sparse_mla(q, copied.view(1, 5, 24), spelled, 0.5, v_dim=16), q, twice)


@pytest.mark.parametrize("fp8", [False, True], ids=["float cache", "fp8 cache"])
def test_a_sequences_tokens_in_order_are_mla_decode(backend, fp8):
    """The slots of every token of each sequence (ragged, shuffled pages, -1 past its end):
    sparse_mla is mla_decode over the same cache."""
    g = torch.Generator().manual_seed(4)
    lens, page, Dc, Dr = [40, 17, 1], 16, 128, 16
    table, used = shuffled_pages(g, lens, page)
    if fp8:
        values = torch.randn(used.shape[0] * page, Dc + Dr, generator=g).to(DEVICE)
        kv_cache = torch.zeros(used.shape[0], page, fp8_row_bytes(Dc, Dr), dtype=torch.uint8,
                               device=DEVICE)
        mla_cache_write(values[:, :Dc], values[:, Dc:], kv_cache,
                        torch.arange(values.shape[0], device=DEVICE))
    else:
        kv_cache = torch.randn(used.shape[0], page, Dc + Dr, generator=g).to(DEVICE)
    slots = torch.full((3, 40), -1, dtype=torch.int32)
    for b, n in enumerate(lens):
        t = torch.arange(n)
        slots[b, :n] = (table[b, t // page] * page + t % page).int()
    q = torch.randn(3, 20, Dc + Dr, generator=g).to(DEVICE)
    got = sparse_mla(q, kv_cache, slots.to(DEVICE), 0.1, v_dim=Dc)
    want = mla_decode(q[..., :Dc], q[..., Dc:], kv_cache, table.int().to(DEVICE),
                      torch.tensor(lens, dtype=torch.int32, device=DEVICE), 0.1)
    check(got, want, q, slots)


@pytest.mark.parametrize("arg", ["q", "kv_cache", "slots", "sinks"])
@pytest.mark.parametrize("view", ["strided", "expanded"])
def test_every_argument_is_read_by_its_strides(backend, arg, view):
    g = torch.Generator().manual_seed(5)
    names = ["q", "kv_cache", "slots", "sinks"]
    args = dict(zip(names, make_problem(g, 3, 5, 40, 3, 4, 9, torch.float32, True,
                                        unnamed=0.2)))
    if view == "expanded" and arg == "kv_cache":
        args["kv_cache"] = args["kv_cache"].nan_to_num(0.0)  # its first page, named or not
    args[arg] = as_view(args[arg], view)
    assert not args[arg].is_contiguous()
    dense = {n: t.contiguous() for n, t in args.items()}
    check(sparse_mla(args["q"], args["kv_cache"], args["slots"], 0.3, v_dim=32,
                     sinks=args["sinks"]),
          reference(dense["q"], dense["kv_cache"], dense["slots"], 0.3, 32, dense["sinks"]),
          args["q"], args["slots"])


@pytest.mark.parametrize("poison", ["row", "query"])
def test_non_finite_input_poisons_only_the_heads_that_read_it(backend, poison):
    g = torch.Generator().manual_seed(6)
    q, kv_cache, slots, sink = make_problem(g, 3, 4, 40, 3, 4, 6, torch.float32, True,
                                            unnamed=0.0)
    slots[1] = slots[2]  # queries 1 and 2 name the same rows, query 0 others
    slots[0] = torch.tensor([0, 1, 2, 3, 4, 5], dtype=torch.int32)
    slots[1:] = torch.tensor([6, 7, 8, 9, 10, 11], dtype=torch.int32)
    kv_cache = kv_cache.nan_to_num(0.0)
    if poison == "row":
        kv_cache.view(-1, 40)[7, 3] = float("inf")   # rows of queries 1 and 2
    else:
        q[2, 1, 0] = float("nan")                    # query 2, head 1
    out, lse = sparse_mla(q, kv_cache, slots, 0.3, v_dim=32, sinks=sink)
    nan_heads = lse.isnan()
    want = torch.zeros(3, 4, dtype=torch.bool)
    if poison == "row":
        want[1:] = True
    else:
        want[2, 1] = True
    assert torch.equal(nan_heads.cpu(), want) and torch.equal(out.isnan().all(-1), nan_heads)
    assert out[~nan_heads].isfinite().all()


def _args(**changes):
    g = torch.Generator().manual_seed(7)
    q, kv_cache, slots, sinks = make_problem(g, 2, 4, 24, 3, 4, 5, torch.float32, True)
    args = dict(q=q, kv_cache=kv_cache.nan_to_num(0.0), slots=slots, softmax_scale=0.2,
                v_dim=16, sinks=sinks)
    return {**args, **changes}


@pytest.mark.parametrize("changes, error, match", [
    (dict(v_dim=25), ValueError, r"v_dim must be in \[1, 24\], got 25"),
    (dict(v_dim=0), ValueError, r"v_dim must be in \[1, 24\], got 0"),
    (dict(kv_cache=torch.zeros(3, 4, 20)), ValueError,
     r"kv_cache must be \[num_blocks, block_size, Dk=24\] \(q's width\), got \(3, 4, 20\)"),
    (dict(kv_cache=torch.zeros(3, 4, 24, dtype=torch.float16)), TypeError,
     "kv_cache has dtype torch.float16 but q has torch.float32"),
    (dict(slots=torch.tensor([[0, 12], [-1, 3]], dtype=torch.int32)), ValueError,
     r"slots must be -1 \(none\) or in \[0, num_blocks \* block_size = 12\), got values in "
     r"\[-1, 12\]"),
    (dict(slots=torch.tensor([[0, -2], [1, 3]], dtype=torch.int32)), ValueError,
     r"got values in \[-2, 3\]"),
    (dict(slots=torch.zeros(3, 2, dtype=torch.int32)), ValueError,
     r"slots must be \[T=2, top_k >= 1\], got \(3, 2\)"),
    (dict(slots=torch.zeros(2, 2, dtype=torch.int64)), TypeError, "slots must have dtype"),
    (dict(sinks=torch.zeros(3)), ValueError, r"sinks must be \[Hq=4\], got \(3,\)"),
    (dict(sinks=torch.zeros(4, dtype=torch.float16)), TypeError, "sinks must have dtype"),
    (dict(softmax_scale=float("inf")), ValueError, "softmax_scale must be finite"),
    (dict(kv_cache=torch.zeros(3, 4, 24, dtype=torch.uint8)), ValueError,
     "an FP8 kv_cache \\(uint8\\) needs Dc to be a multiple of 128"),
])
def test_bad_arguments_raise_clear_errors(changes, error, match):
    args = _args(**changes)
    with pytest.raises(error, match=match):
        sparse_mla(args.pop("q"), args.pop("kv_cache"), args.pop("slots"),
                   args.pop("softmax_scale"), **args)


def test_unchecked_bad_slots_are_skipped_not_read(monkeypatch):
    """With the value check off (CUDA graph capture), slots past the cache or below -1 name
    no row on the Triton path."""
    from ds_kernels.ops import sparse_mla as op

    monkeypatch.setattr(op, "_check_values", lambda *args: None)
    args = _args(slots=torch.tensor([[0, 10**6], [-7, 3]], dtype=torch.int32))
    clean = _args(slots=torch.tensor([[0, -1], [-1, 3]], dtype=torch.int32))
    with ds_kernels.use_backend("triton"):
        got = sparse_mla(*list(args.values())[:4], v_dim=16, sinks=args["sinks"])
        want = sparse_mla(*list(clean.values())[:4], v_dim=16, sinks=clean["sinks"])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_opcheck():
    a = _args()
    torch.library.opcheck(torch.ops.ds_kernels.sparse_mla.default,
                          (a["q"], a["kv_cache"], a["slots"], 0.2, 16, a["sinks"]))


def test_torch_compile_fullgraph():
    a = _args()

    @torch.compile(fullgraph=True, backend="eager")
    def attend(q, kv_cache, slots, sinks):
        return sparse_mla(q, kv_cache, slots, 0.2, v_dim=16, sinks=sinks)

    got = attend(a["q"], a["kv_cache"], a["slots"], a["sinks"])
    check(got, reference(a["q"], a["kv_cache"], a["slots"], 0.2, 16, a["sinks"]), a["q"],
          a["slots"])
