"""mla_decode: absorbed decode against naive decompressed attention and against the reference,
on every backend; ragged and empty sequences, shuffled page tables, garbage past the ends,
splits, the true 512 + 64 width, errors, unchecked bad input, opcheck and torch.compile. FP8
caches (FlashMLA's DeepSeek-V3.2 layout) written by mla_cache_write, then read: the same
against the reference on the dequantised cache."""

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ds_kernels
import ds_kernels.kernels.mla_decode as kernel
from conftest import DEVICE
from paged import shuffled_pages
from ds_kernels import tuning
from ds_kernels.mla_cache_format import fp8_row_bytes
from ds_kernels.ops.mla_cache_write import mla_cache_write
from ds_kernels.ops.mla_decode import mla_decode
from ds_kernels.reference.fp8_mla_cache import dequantize
from ds_kernels.reference.mla_decode import mla_decode as reference
from numerics import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GARBAGE = [float("nan"), float("inf"), -6e4]
TOKENS = [0, 1, 2, 15, 16, 17, 31, 40, 64, 65, 100]


@pytest.fixture(params=["torch", "torch (a page a chunk)", "triton"])
def backend(request):
    """The backends of conftest, plus the torch path cutting contexts into one-page chunks
    (its chunk loop otherwise needs contexts of thousands of tokens)."""
    if request.param == "torch (a page a chunk)":
        forced = dict(chunk_elements=1)
    else:
        forced = {}
    with ds_kernels.use_backend(request.param.split()[0]), tuning.override(**forced):
        yield request.param


@pytest.fixture(params=["reference", "torch", "triton"])
def any_backend(request):
    with ds_kernels.use_backend(request.param):
        yield request.param


def make_cache(g, lens, block_size, D, dtype, garbage=float("nan"), spare_pages=2,
               spare_columns=1):
    """(kv_cache, block_table, cache_seqlens) holding len(lens) sequences on shuffled pages.

    Rows past each sequence's end, the spare pages, and the table entries past each sequence's
    last page hold garbage, which must never reach the output."""
    table, used = shuffled_pages(g, lens, block_size, spare_pages, spare_columns)
    cache = torch.randn(used.shape[0], block_size, D, generator=g)
    cache[~used] = garbage
    return (cache.to(DEVICE, dtype), table.to(DEVICE, torch.int32),
            torch.tensor(lens, dtype=torch.int32, device=DEVICE))


def used_slots(lens, block_table, block_size):
    """int64 [sum(lens)]: the cache slots of every sequence's tokens, in order."""
    slots = [block_table[b, torch.arange(n) // block_size].long().cpu() * block_size
             + torch.arange(n) % block_size for b, n in enumerate(lens)]
    return torch.cat(slots + [torch.zeros(0, dtype=torch.int64)]).to(DEVICE)


def make_fp8_cache(g, lens, block_size, Dc, Dr, dtype, spare_pages=2, spare_columns=1):
    """(kv_cache uint8, block_table, cache_seqlens): make_cache's sequences, their rows written
    into an FP8 cache by mla_cache_write (the backend under test) from latents in ``dtype``,
    each 128-column tile at its own magnitude (so at its own scale), within a factor of 32 so
    that no score dwarfs the others. Every other byte (rows past the ends, spare pages) is
    random: NaN codes and NaN or huge scales, which must never reach the output."""
    rows, block_table, cache_seqlens = make_cache(g, lens, block_size, Dc + Dr, torch.float32,
                                                  garbage=0.0, spare_pages=spare_pages,
                                                  spare_columns=spare_columns)
    slots = used_slots(lens, block_table, block_size)
    magnitude = torch.exp2(torch.randint(-4, 2, (slots.numel(), Dc // 128), generator=g).float())
    values = rows.view(-1, Dc + Dr).cpu()[slots.cpu()]                 # [n, Dc + Dr]
    values[:, :Dc] *= magnitude.repeat_interleave(128, dim=1)
    values = values.to(DEVICE, dtype)
    kv_cache = torch.randint(0, 256, (rows.shape[0], block_size, fp8_row_bytes(Dc, Dr)),
                             generator=g, dtype=torch.uint8).to(DEVICE)
    mla_cache_write(values[:, :Dc], values[:, Dc:], kv_cache, slots)
    return kv_cache, block_table, cache_seqlens


CACHES = pytest.mark.parametrize("fp8", [False, True], ids=["float cache", "fp8 cache"])


def small_cache(g, lens, fp8, **kwargs):
    """((kv_cache, block_table, cache_seqlens), Dc) of fp32 tokens on 16-token pages, Dr = 16:
    a float cache of Dc = 32 (make_cache) or an FP8 one of Dc = 128 (make_fp8_cache)."""
    if fp8:
        return make_fp8_cache(g, lens, 16, 128, 16, torch.float32, **kwargs), 128
    return make_cache(g, lens, 16, 48, torch.float32, **kwargs), 32


@st.composite
def decode_problems(draw):
    B = draw(st.integers(1, 4))
    lens = draw(st.lists(st.sampled_from(TOKENS), min_size=B, max_size=B))
    Hq = draw(st.integers(1, 16))
    Dc = draw(st.sampled_from([32, 48, 64]))
    Dr = draw(st.sampled_from([8, 16]))
    block_size = draw(st.sampled_from([16, 32, 64]))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    cache = make_cache(g, lens, block_size, Dc + Dr, dtype, garbage=draw(st.sampled_from(GARBAGE)),
                       spare_pages=draw(st.integers(0, 2)), spare_columns=draw(st.integers(0, 2)))
    return g, Hq, Dc, Dr, dtype, cache


def naive_decompressed(q_head, q_pe, w_uk, w_uv, kv_cache, block_table, cache_seqlens, scale):
    """What a model without absorption computes: each head's K_nope and V expanded from the
    latent through its own W_UK [Dc, Dn] and W_UV [Dc, Dv], then plain attention (fp64)."""
    B, Hq, _ = q_head.shape
    Dc, block_size = w_uk.shape[1], kv_cache.shape[1]
    out = torch.zeros(B, Hq, w_uv.shape[2], dtype=torch.float64, device=q_head.device)
    for b in range(B):
        t = torch.arange(int(cache_seqlens[b]), device=kv_cache.device)
        if t.numel() == 0:
            continue
        rows = kv_cache[block_table[b, t // block_size].long(), t % block_size].double()
        latent, k_pe = rows[:, :Dc], rows[:, Dc:]                    # [n, Dc], [n, Dr]
        k_nope = torch.einsum("nc,hcd->hnd", latent, w_uk)           # [Hq, n, Dn]
        v = torch.einsum("nc,hcd->hnd", latent, w_uv)                # [Hq, n, Dv]
        scores = scale * (torch.einsum("hd,hnd->hn", q_head[b], k_nope)
                          + q_pe[b].double() @ k_pe.t())             # [Hq, n]
        out[b] = torch.einsum("hn,hnd->hd", scores.softmax(dim=-1), v)
    return out


def check_absorbed_equals_naive(g, Hq, Dc, Dr, dtype, cache, Dn=24, Dv=20):
    kv_cache, block_table, cache_seqlens = cache
    B = block_table.shape[0]
    w_uk = (torch.randn(Hq, Dc, Dn, generator=g, dtype=torch.float64) / Dc**0.5).to(DEVICE)
    w_uv = (torch.randn(Hq, Dc, Dv, generator=g, dtype=torch.float64) / Dc**0.5).to(DEVICE)
    q_head = torch.randn(B, Hq, Dn, generator=g, dtype=torch.float64).to(DEVICE)
    q_pe = torch.randn(B, Hq, Dr, generator=g).to(DEVICE, dtype)
    scale = (Dn + Dr) ** -0.5
    q_nope = torch.einsum("bhn,hcn->bhc", q_head, w_uk).to(dtype)   # q_head @ W_UK[h]^T
    out, lse = mla_decode(q_nope, q_pe, kv_cache, block_table, cache_seqlens, scale)
    assert out.dtype == dtype and out.shape == (B, Hq, Dc)
    assert lse.dtype == torch.float32 and lse.shape == (B, Hq)
    absorbed = torch.einsum("bhc,hcv->bhv", out.double(), w_uv)    # out @ W_UV[h]
    want = naive_decompressed(q_head, q_pe, w_uk, w_uv, kv_cache, block_table, cache_seqlens,
                              scale)
    assert_close(absorbed, want, dtype, reduction=Dc + int(cache_seqlens.max()), what="out @ W_UV")


def check_against_reference(g, Hq, Dc, Dr, dtype, cache, scale=0.3):
    kv_cache, block_table, cache_seqlens = cache
    B = block_table.shape[0]
    # Both query parts as views of one [B, Hq, Dc + Dr] tensor, as a model projects them.
    q_nope, q_pe = torch.randn(B, Hq, Dc + Dr, generator=g).to(DEVICE, dtype).split([Dc, Dr], -1)
    args = (q_nope, q_pe, kv_cache, block_table, cache_seqlens, scale)
    out, lse = mla_decode(*args)
    want_out, want_lse = reference(*args)
    n = Dc + Dr + int(cache_seqlens.max())
    assert_close(out, want_out, dtype, reduction=n, what="out")
    assert_close(lse, want_lse, dtype, reduction=n, what="lse")
    empty = cache_seqlens == 0
    assert (out[empty] == 0).all() and (lse[empty] == float("-inf")).all()
    assert not out.isnan().any() and not lse.isnan().any()


@settings(max_examples=25)
@given(problem=decode_problems())
def test_absorbed_decode_equals_naive_decompressed_attention(any_backend, problem):
    check_absorbed_equals_naive(*problem)


@settings(max_examples=25)
@given(problem=decode_problems())
def test_matches_reference(backend, problem):
    check_against_reference(*problem)


@st.composite
def fp8_decode_problems(draw):
    B = draw(st.integers(1, 3))
    lens = draw(st.lists(st.sampled_from(TOKENS), min_size=B, max_size=B))
    Hq = draw(st.integers(1, 16))
    Dc = draw(st.sampled_from([128, 256]))
    Dr = draw(st.sampled_from([8, 16]))
    block_size = draw(st.sampled_from([16, 64]))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    cache = make_fp8_cache(g, lens, block_size, Dc, Dr, dtype,
                           spare_pages=draw(st.integers(0, 2)),
                           spare_columns=draw(st.integers(0, 2)))
    return g, Hq, Dc, Dr, dtype, cache


@settings(max_examples=20)
@given(problem=fp8_decode_problems())
def test_fp8_cache_matches_reference(backend, problem):
    """The reference reads an FP8 cache as its dequantised rows (see the next test)."""
    check_against_reference(*problem)


def test_fp8_cache_means_the_dequantised_cache():
    g = torch.Generator().manual_seed(13)
    kv_cache, block_table, cache_seqlens = make_fp8_cache(g, [40, 0, 70], 16, 128, 16,
                                                          torch.float16)
    q_nope = torch.randn(3, 4, 128, generator=g).to(DEVICE, torch.float16)
    q_pe = torch.randn(3, 4, 16, generator=g).to(DEVICE, torch.float16)
    dequantised = dequantize(kv_cache, 128, torch.float16)             # [blocks, 16, 144]
    want = reference(q_nope, q_pe, dequantised, block_table, cache_seqlens, 0.2)
    got = reference(q_nope, q_pe, kv_cache, block_table, cache_seqlens, 0.2)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_fp8_deepseek_v3_width(backend):
    """656-byte rows of Dc=512, Dr=64, 64-token pages, against the reference; and against a
    float cache of the same tokens: apart by e4m3's rounding only."""
    g = torch.Generator().manual_seed(14)
    lens = [37, 130]
    cache = make_fp8_cache(g, lens, 64, 512, 64, torch.float32)
    kv_cache, block_table, cache_seqlens = cache
    assert kv_cache.shape[2] == 656
    check_against_reference(g, 5, 512, 64, torch.float32, cache, scale=192**-0.5)
    slots = used_slots(lens, block_table, 64)
    values = torch.randn(slots.numel(), 576, generator=g).to(DEVICE)   # normalised latents
    float_cache = torch.zeros(*kv_cache.shape[:2], 576, device=DEVICE)
    for c in (float_cache, kv_cache):
        mla_cache_write(values[:, :512], values[:, 512:], c, slots)
    q_nope = torch.randn(2, 8, 512, generator=g).to(DEVICE)
    q_pe = torch.randn(2, 8, 64, generator=g).to(DEVICE)
    want, _ = mla_decode(q_nope, q_pe, float_cache, block_table, cache_seqlens, 192**-0.5)
    got, _ = mla_decode(q_nope, q_pe, kv_cache, block_table, cache_seqlens, 192**-0.5)
    # e4m3 rounds each value by 2^-4 relative at most (~3% rms): so is the output, here ~4%.
    assert (got - want).norm() <= 2.0**-4 * want.norm()


def test_deepseek_v3_width(backend):
    """Dc=512, Dr=64 (the real 576-wide rows), FlashMLA's 64-token pages, tiny B and context."""
    g = torch.Generator().manual_seed(3)
    cache = make_cache(g, [37, 130], 64, 576, torch.float32)
    check_absorbed_equals_naive(g, 4, 512, 64, torch.float32, cache, Dn=128, Dv=128)
    check_against_reference(g, 5, 512, 64, torch.float32, cache, scale=192**-0.5)


@pytest.mark.parametrize("lens", [[1], [17], [0], [200]])
def test_splits_with_empty_and_ragged_parts(backend, lens):
    # One sequence: the interpreter's Triton path splits it 4 ways, so that 1 or 17 tokens
    # leave whole splits empty; 20 heads are two head groups, the second ragged.
    g = torch.Generator().manual_seed(4)
    check_against_reference(g, 20, 32, 16, torch.float32,
                            make_cache(g, lens, 16, 48, torch.float32, spare_columns=12))


def test_more_splits_than_the_merge_reads_in_one_step(monkeypatch):
    # 40 splits of 16 tokens: the merge kernel takes them 16 at a time (BLOCK_S).
    monkeypatch.setattr(kernel, "_INTERPRETER_SMS", 40)
    g = torch.Generator().manual_seed(9)
    with ds_kernels.use_backend("triton"):
        check_against_reference(g, 3, 32, 16, torch.float32,
                                make_cache(g, [630], 16, 48, torch.float32))


def test_split_count_fills_the_gpu_without_tiny_splits():
    h100 = dict(sms=132, min_split_tokens=256)
    assert kernel.num_splits(1, 8192, **h100) == 32          # capped by 256-token splits
    assert kernel.num_splits(8, 32768, **h100) == 17         # Hq=128: 8 head groups of one sequence
    assert kernel.num_splits(32, 8192, **h100) == 5
    assert kernel.num_splits(132, 8192, **h100) == 1         # already full
    assert kernel.num_splits(1, 100, **h100) == 1            # too short to split


def test_garbage_never_leaks_and_huge_valid_scores_stay_finite(backend):
    g = torch.Generator().manual_seed(5)
    kv_cache, block_table, cache_seqlens = make_cache(g, [3, 0, 20], 16, 48, torch.float32,
                                                      garbage=float("nan"))
    q_nope = torch.randn(3, 2, 32, generator=g).to(DEVICE) * 100   # scores in the thousands
    q_pe = torch.randn(3, 2, 16, generator=g).to(DEVICE)
    args = (q_nope, q_pe, kv_cache, block_table, cache_seqlens, 1.0)
    out, lse = mla_decode(*args)
    assert out.isfinite().all() and not lse.isnan().any()
    want_out, want_lse = reference(*args)
    assert_close(out, want_out, torch.float32, reduction=100)
    assert_close(lse, want_lse, torch.float32, reduction=100)


@CACHES
def test_unchecked_bad_input_never_reads_out_of_bounds(monkeypatch, fp8):
    """During CUDA graph capture the value checks are skipped: then the kernel clamps lengths
    to the table and skips pages outside the cache, instead of reading wild addresses."""
    monkeypatch.setattr("ds_kernels.ops.mla_decode.device_checks_allowed", lambda t: False)
    g = torch.Generator().manual_seed(6)
    (kv_cache, block_table, _), Dc = small_cache(g, [20, 20], fp8, spare_columns=0)
    block_table[0, 1] = 10**6                                    # page outside the cache
    block_table[1, 0] = -5
    cache_seqlens = torch.tensor([10**5, -3], dtype=torch.int32, device=DEVICE)  # past the table
    q_nope = torch.randn(2, 3, Dc, generator=g).to(DEVICE)
    q_pe = torch.randn(2, 3, 16, generator=g).to(DEVICE)
    with ds_kernels.use_backend("triton"):
        out, lse = mla_decode(q_nope, q_pe, kv_cache, block_table, cache_seqlens, 0.5)
    # Sequence 0 sees its one valid page; sequence 1's length counts as 0.
    want_out, want_lse = reference(q_nope[:1], q_pe[:1], kv_cache, block_table[:1, :1],
                                   torch.tensor([16], dtype=torch.int32, device=DEVICE), 0.5)
    assert_close(out[:1], want_out, torch.float32, reduction=64)
    assert_close(lse[:1], want_lse, torch.float32, reduction=64)
    assert (out[1] == 0).all() and (lse[1] == float("-inf")).all()


@CACHES
def test_empty_batch(backend, fp8):
    Dc = 128 if fp8 else 32
    kv_cache = (torch.zeros(2, 16, fp8_row_bytes(Dc, 16), dtype=torch.uint8, device=DEVICE)
                if fp8 else torch.zeros(2, 16, Dc + 16, device=DEVICE))
    out, lse = mla_decode(torch.zeros(0, 4, Dc, device=DEVICE),
                          torch.zeros(0, 4, 16, device=DEVICE), kv_cache,
                          torch.zeros(0, 3, dtype=torch.int32, device=DEVICE),
                          torch.zeros(0, dtype=torch.int32, device=DEVICE), 0.1)
    assert out.shape == (0, 4, Dc) and lse.shape == (0, 4)


def _small_args(fp8=False):
    g = torch.Generator().manual_seed(7)
    (kv_cache, block_table, cache_seqlens), Dc = small_cache(g, [5, 0, 33], fp8)
    return (torch.randn(3, 4, Dc, generator=g).to(DEVICE),
            torch.randn(3, 4, 16, generator=g).to(DEVICE), kv_cache, block_table, cache_seqlens,
            0.25)


@CACHES
@pytest.mark.parametrize("q_layout", ["contiguous", "heads first"])
def test_opcheck(fp8, q_layout):
    """Also with q_nope a transposed view (the model's absorbed query, bmm(...).transpose):
    the fake's outputs must have the real (contiguous) strides, which compiled graphs
    assert."""
    args = list(_small_args(fp8))
    if q_layout == "heads first":
        args[0] = args[0].transpose(0, 1).contiguous().transpose(0, 1)   # strides (Dc, B Dc, 1)
    torch.library.opcheck(torch.ops.ds_kernels.mla_decode.default, tuple(args))


@CACHES
def test_torch_compile_fullgraph(fp8):
    args = _small_args(fp8)

    @torch.compile(fullgraph=True)
    def step(q_nope, q_pe, kv_cache, block_table, cache_seqlens):
        out, lse = mla_decode(q_nope, q_pe, kv_cache, block_table, cache_seqlens, args[-1])
        return out * 2, lse

    out, lse = step(*args[:5])
    want_out, want_lse = reference(*args)
    assert_close(out, 2 * want_out, torch.float32, reduction=64)
    assert_close(lse, want_lse, torch.float32, reduction=64)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@CACHES
def test_cuda_graph_capture(fp8):
    args = _small_args(fp8)
    out, lse = mla_decode(*args)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = mla_decode(*args)
    graph.replay()
    torch.testing.assert_close(captured[0], out)
    torch.testing.assert_close(captured[1], lse)


def _bad(**change):
    args = dict(q_nope=torch.zeros(2, 4, 32), q_pe=torch.zeros(2, 4, 16),
                kv_cache=torch.zeros(6, 16, 48), block_table=torch.zeros(2, 3, dtype=torch.int32),
                cache_seqlens=torch.tensor([5, 48], dtype=torch.int32), softmax_scale=0.1)
    args.update(change)
    return args


@pytest.mark.parametrize("args,error,match", [
    (_bad(q_nope=torch.zeros(2, 32)), ValueError, "q_nope must be 3-D"),
    (_bad(q_pe=torch.zeros(2, 3, 16)), ValueError, r"q_pe must be \[B=2, Hq=4, Dr\]"),
    (_bad(kv_cache=torch.zeros(6, 16, 47)), ValueError, r"Dc \+ Dr = 48"),
    (_bad(kv_cache=torch.zeros(6, 24, 48)), ValueError, "power of two >= 16, got 24"),
    (_bad(kv_cache=torch.zeros(6, 8, 48)), ValueError, "power of two >= 16, got 8"),
    (_bad(q_pe=torch.zeros(2, 4, 16, dtype=torch.float16)), TypeError, "q_pe has dtype"),
    (_bad(kv_cache=torch.zeros(6, 16, 48, dtype=torch.float16)), TypeError, "kv_cache has dtype"),
    (_bad(q_nope=torch.zeros(2, 4, 32, dtype=torch.int32)), TypeError, "q_nope must have dtype"),
    (_bad(block_table=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "block_table must have"),
    (_bad(cache_seqlens=torch.tensor([5, 48])), TypeError, "cache_seqlens must have dtype"),
    (_bad(block_table=torch.zeros(3, 3, dtype=torch.int32)), ValueError, r"\[B=2, max_blocks\]"),
    (_bad(cache_seqlens=torch.tensor([5], dtype=torch.int32)), ValueError, r"must be \[B=2\]"),
    (_bad(cache_seqlens=torch.tensor([5, 49], dtype=torch.int32)), ValueError,
     r"cache_seqlens must be in \[0, max_blocks \* block_size = 48\], got values in \[5, 49\]"),
    (_bad(cache_seqlens=torch.tensor([-1, 4], dtype=torch.int32)), ValueError,
     r"got values in \[-1, 4\]"),
    (_bad(block_table=torch.tensor([[0, 6, 6], [1, 2, 6]], dtype=torch.int32)), ValueError,
     r"block_table entries of the pages in use must be in \[0, num_blocks=6\), got \[6\]"),
    (_bad(block_table=torch.tensor([[-1, 6, 6], [1, 2, 3]], dtype=torch.int32)), ValueError,
     r"got \[-1\]"),
    (_bad(softmax_scale=float("nan")), ValueError, "softmax_scale must be finite"),
    (_bad(softmax_scale=None), TypeError, "softmax_scale must be a float"),
    (_bad(q_nope=torch.zeros(2, 0, 32), q_pe=torch.zeros(2, 0, 16)), ValueError, "Hq >= 1"),
    # FP8 caches (uint8): Dc = 128, Dr = 16 rows are 128 + 4 + 32 = 164 bytes.
    (_bad(kv_cache=torch.zeros(6, 16, 48, dtype=torch.uint8)), ValueError,
     r"an FP8 kv_cache \(uint8\) needs Dc to be a multiple of 128 .*, got Dc=32"),
    (_bad(q_nope=torch.zeros(2, 4, 128), kv_cache=torch.zeros(6, 16, 144, dtype=torch.uint8)),
     ValueError, r"Dc \+ 4 \* Dc/128 \+ 2 \* Dr = 164\] bytes .* got \(6, 16, 144\)"),
    (_bad(q_nope=torch.zeros(2, 4, 128), q_pe=torch.zeros(2, 4, 15),
          kv_cache=torch.zeros(6, 16, 162, dtype=torch.uint8)), ValueError, "even rope dim"),
    (_bad(q_nope=torch.zeros(2, 4, 128),
          kv_cache=torch.zeros(6, 16, 166, dtype=torch.uint8)[..., :164]), ValueError,
     r"4-byte aligned .* got strides \(2656, 166, 1\)"),
    (_bad(q_nope=torch.zeros(2, 4, 128), q_pe=torch.zeros(2, 4, 16, dtype=torch.float16),
          kv_cache=torch.zeros(6, 16, 164, dtype=torch.uint8)), TypeError, "q_pe has dtype"),
    (_bad(q_nope=torch.zeros(2, 4, 128),
          kv_cache=torch.zeros(6, 16, 164, dtype=torch.float8_e4m3fn)), TypeError,
     r"kv_cache must have dtype in \(float16, bfloat16, float32, uint8\)"),
])
def test_bad_arguments_raise_clear_errors(args, error, match):
    with pytest.raises(error, match=match):
        mla_decode(**args)


def test_unused_table_entries_are_not_checked():
    # Sequence 0 uses one page: its other entries may hold anything (vLLM pads with -1).
    args = _bad(block_table=torch.tensor([[0, -1, 99], [1, 2, 3]], dtype=torch.int32))
    out, lse = mla_decode(**args)
    assert out.isfinite().all() and lse.isfinite().all()


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU")
def test_tensors_on_different_devices_are_rejected():
    args = _bad(q_nope=torch.zeros(2, 4, 32, device="cuda"))
    with pytest.raises(ValueError, match="is on cpu but q_nope is on cuda"):
        mla_decode(**args)


def test_benchmark_on_tiny_shapes(monkeypatch):
    """bench/bench_mla_decode.py end to end on CPU at toy sizes, timing cut short."""
    from bench import bench_mla_decode, harness

    monkeypatch.setattr(bench_mla_decode, "compare", functools.partial(
        harness.compare, reps=harness.MIN_REPS, budget_s=0))
    for name, value in dict(DC=128, DR=16, DN=8, DV=8, PAGE=16).items():  # FP8: Dc % 128 == 0
        monkeypatch.setattr(bench_mla_decode, name, value)
    monkeypatch.setitem(bench_mla_decode.CONTEXTS, "cpu", ((40,), (40,)))
    monkeypatch.setitem(bench_mla_decode.HEADS, "cpu", (3,))
    rows = bench_mla_decode.run(torch.device("cpu"), quick=True)
    harness.add_speedups(rows)
    assert {r.impl for r in rows} == {"ds_kernels", "decompress+attend", "reference",
                                      "ds_kernels[attention]", bench_mla_decode.FP8_IMPL}
    assert all(r.speedup_vs is not None for r in rows)
    attention = {r.impl: r for r in rows if r.impl.startswith("ds_kernels[attention")}
    assert all(r.gbytes_per_s > 0 for r in attention.values())
    # GB/s counts each cache's bytes a token: 128 codes + 4 scale + 32 rope bytes in FP8,
    # 144 fp32 values in the float cache.
    fp32, fp8 = attention["ds_kernels[attention]"], attention[bench_mla_decode.FP8_IMPL]
    assert fp8.gbytes_per_s * fp8.median_us == pytest.approx(
        fp32.gbytes_per_s * fp32.median_us * (128 + 4 + 32) / (144 * 4), rel=1e-3)


@pytest.mark.parametrize("poison", ["q_nope", "q_pe", "cache latent", "cache rope", "unused row"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_poisons_only_its_own_heads(any_backend, poison, value):
    """One NaN policy for out and lse on every backend (reference/mla_decode.py): a non-finite
    query or used cache row makes exactly the heads that read it NaN; rows past the end and the
    other sequences stay exact. 40 tokens: the interpreter's Triton path splits them."""
    g = torch.Generator().manual_seed(11)
    lens = [40, 7, 19]
    kv_cache, block_table, cache_seqlens = make_cache(g, lens, 16, 48, torch.float32,
                                                      garbage=0.0)
    q_nope = torch.randn(3, 4, 32, generator=g).to(DEVICE)
    q_pe = torch.randn(3, 4, 16, generator=g).to(DEVICE)
    want_bad = torch.zeros(3, 4, dtype=torch.bool)
    if poison == "q_nope":
        q_nope[0, 2, 5] = value
        want_bad[0, 2] = True
    elif poison == "q_pe":
        q_pe[2, 1, 3] = value
        want_bad[2, 1] = True
    else:
        b, t = (0, 33) if poison != "unused row" else (1, 9)      # sequence 1 has 7 tokens
        column = 40 if poison == "cache rope" else 3
        kv_cache[block_table[b, t // 16], t % 16, column] = value
        want_bad[b] = poison != "unused row"
    _check_poisoned((q_nope, q_pe, kv_cache, block_table, cache_seqlens, 0.3), want_bad, 100)


@pytest.mark.parametrize("poison", ["latent", "scale", "rope", "unused row"])
def test_fp8_non_finite_rows_poison_only_their_own_heads(any_backend, poison):
    """The NaN policy on FP8 rows: an infinite latent written (a NaN code), a NaN scale, an
    infinite k_pe (kept in bf16) make exactly the heads of the sequence reading that row NaN;
    a row past a sequence's end, all NaN bytes, reaches nothing."""
    g = torch.Generator().manual_seed(15)
    lens = [40, 7, 19]
    kv_cache, block_table, cache_seqlens = make_fp8_cache(g, lens, 16, 128, 16, torch.float32)
    b, t = (0, 33) if poison != "unused row" else (1, 9)          # sequence 1 has 7 tokens
    page, offset = int(block_table[b, t // 16]), t % 16
    if poison in ("latent", "rope"):
        latent, k_pe = torch.randn(1, 128, generator=g), torch.randn(1, 16, generator=g)
        (latent if poison == "latent" else k_pe)[0, 3] = float("inf")
        mla_cache_write(latent.to(DEVICE), k_pe.to(DEVICE), kv_cache,
                        torch.tensor([page * 16 + offset], device=DEVICE))
    elif poison == "scale":
        kv_cache[page, offset, 128:132] = 0xFF                    # an fp32 NaN
    else:
        kv_cache[page, offset] = 0xFF
    want_bad = torch.zeros(3, 4, dtype=torch.bool)
    want_bad[b] = poison != "unused row"
    q_nope = torch.randn(3, 4, 128, generator=g).to(DEVICE)
    q_pe = torch.randn(3, 4, 16, generator=g).to(DEVICE)
    _check_poisoned((q_nope, q_pe, kv_cache, block_table, cache_seqlens, 0.3), want_bad, 200)


def _check_poisoned(args, want_bad, reduction):
    """mla_decode(*args): exactly the heads in want_bad [B, Hq] NaN (out and lse), and the
    reference's answer everywhere."""
    out, lse = mla_decode(*args)
    assert torch.equal(lse.isnan().cpu(), want_bad), lse
    assert torch.equal(out.isnan().all(-1).cpu(), want_bad) and not out[~want_bad].isnan().any()
    want_out, want_lse = reference(*args)
    assert_close(out, want_out, torch.float32, reduction=reduction, what="out")
    assert_close(lse, want_lse, torch.float32, reduction=reduction, what="lse")


@CACHES
@pytest.mark.parametrize("view", ["strided", "expanded"])
def test_index_tensors_are_read_by_their_strides(any_backend, view, fp8):
    """block_table and cache_seqlens as columns of larger tensors, or expanded from one row
    (stride 0): read as the values they show, never as the dense memory beneath them."""
    g = torch.Generator().manual_seed(12)
    (kv_cache, block_table, cache_seqlens), Dc = small_cache(g, [33, 33, 33], fp8,
                                                             spare_columns=1)
    if view == "strided":
        wide = torch.full((3, 2 * block_table.shape[1]), -1, dtype=torch.int32, device=DEVICE)
        wide[:, ::2] = block_table
        table = wide[:, ::2]
        seqlens = torch.stack([cache_seqlens, torch.full_like(cache_seqlens, 10**6)], 1)[:, 0]
    else:  # every sequence reads sequence 0's pages
        table = block_table[:1].expand(3, -1)
        seqlens = torch.tensor([33], dtype=torch.int32, device=DEVICE).expand(3)
    assert table.stride() != block_table.stride() and seqlens.stride() != (1,)
    q_nope = torch.randn(3, 4, Dc, generator=g).to(DEVICE)
    q_pe = torch.randn(3, 4, 16, generator=g).to(DEVICE)
    out, lse = mla_decode(q_nope, q_pe, kv_cache, table, seqlens, 0.3)
    want_out, want_lse = reference(q_nope, q_pe, kv_cache, table.contiguous(),
                                   seqlens.contiguous(), 0.3)
    assert_close(out, want_out, torch.float32, reduction=100, what="out")
    assert_close(lse, want_lse, torch.float32, reduction=100, what="lse")
