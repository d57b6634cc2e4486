"""index_cache_write (DeepSeek-V3.2's index-key cache): every backend against the reference
(padding slots, strided keys and caches, untouched rows, rope over part or all of the row),
into float and FP8 caches; against nn.LayerNorm + transformers' rotate_half RoPE, bad slots
never written, errors, opcheck, meta tensors and torch.compile."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DEVICE
from ds_kernels import dispatch, rope
from ds_kernels.mla_cache_format import fp8_row_bytes
from ds_kernels.ops.index_cache_write import index_cache_write
from ds_kernels.reference import index_cache_write as reference
from ds_kernels.reference.fp8_mla_cache import dequantize
from numerics import assert_close


def dtypes(backend):
    # bf16 arithmetic is wrong in Triton's interpreter (ENVIRONMENT.md): GPU only there.
    return [torch.float32, torch.float16] + (
        [torch.bfloat16] if backend == "torch" or DEVICE == "cuda" else [])


@st.composite
def problems(draw, backend, fp8=False):
    """(k, norm_weight, norm_bias, eps, cos, sin, k_cache, slot_mapping, interleaved); the
    cache starts full of other tokens' rows (fp8: random bytes)."""
    T = draw(st.sampled_from([0, 1, 5, 19]))
    D = draw(st.sampled_from([128, 384] if fp8 else [4, 20, 128]))
    Dr = draw(st.sampled_from([d for d in (2, 6, 16, 64, D) if d <= D]))
    block_size = draw(st.sampled_from([1, 4, 16]))
    num_blocks = -(-T // block_size) + draw(st.integers(1, 2))
    dtype = draw(st.sampled_from(dtypes(backend)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    to = dict(device=DEVICE, dtype=dtype)
    # Keys off centre and of varied spread, as wk(x) is: the mean matters to the norm.
    k = (torch.randn(T, D, generator=g) * 3 + torch.randn(T, 1, generator=g)).to(**to)
    if draw(st.booleans()):  # a column slice of a wider projection output: strided rows
        k = torch.cat([k, torch.randn(T, 5, generator=g).to(**to)], dim=1)[:, :D]
    weight = (1 + 0.3 * torch.randn(D, generator=g)).to(**to)
    bias = (0.1 * torch.randn(D, generator=g)).to(**to)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T]
    slots[torch.rand(T, generator=g) < draw(st.sampled_from([0.0, 0.3]))] = -1
    layout = draw(st.sampled_from(["contiguous", "wide rows", "spread blocks"]))
    width = fp8_row_bytes(D, 0) if fp8 else D
    shape = (num_blocks, block_size * (2 if layout == "spread blocks" else 1),
             width + (4 if fp8 else 3) * (layout == "wide rows"))  # FP8 rows stay aligned
    if fp8:
        k_cache = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(DEVICE)
    else:
        k_cache = torch.randn(shape, generator=g).to(**to)
    k_cache = k_cache[:, :block_size, :width]
    positions = torch.randint(0, 200_000, (T,), generator=g)
    cos, sin = rope.rope_cos_sin(positions, rope.rope_frequencies(Dr, 10000.0))
    if draw(st.booleans()):  # the half of transformers' cat(freqs, freqs) tables: a view
        cos = torch.cat([cos, cos], dim=1)[:, :Dr // 2]
    slots = slots.to(DEVICE, draw(st.sampled_from([torch.int64, torch.int32])))
    view = draw(st.sampled_from(["dense", "strided", "expanded padding"]))
    if view == "strided":
        slots = torch.stack([slots, torch.zeros_like(slots)], dim=1)[:, 0]
    elif view == "expanded padding":  # one -1 for every token (stride 0): nothing is written
        slots = torch.full((1,), -1, dtype=slots.dtype, device=DEVICE).expand(T)
    return (k, weight, bias, 1e-6, cos.to(DEVICE), sin.to(DEVICE), k_cache, slots,
            draw(st.booleans()))


@settings(max_examples=30)
@given(data=st.data())
def test_index_cache_write_matches_reference(backend, data):
    problem = data.draw(problems(backend))
    k, *_, k_cache, slots, _ = problem
    want = k_cache.clone()
    reference.index_cache_write(*problem[:6], want, slots, problem[-1])
    before = k_cache.clone()
    index_cache_write(*problem[:6], k_cache, slots, interleaved=problem[-1])
    D = k.shape[1]
    assert_close(k_cache, want, k.dtype, reduction=D, what="k_cache")
    # Rows of tokens not written (padding, other sequences) keep their bytes.
    written = torch.zeros(k_cache.shape[:2], dtype=torch.bool, device=DEVICE)
    block_size = k_cache.shape[1]
    live = slots[slots >= 0].long()
    written[live // block_size, live % block_size] = True
    assert torch.equal(k_cache[~written], before[~written])


@settings(max_examples=25)
@given(data=st.data())
def test_index_cache_write_into_fp8_matches_reference(backend, data):
    """FP8 rows: each value, dequantised, within one e4m3 step (2^-3 relative, or the tile's
    subnormal step) of the reference's float row - a last-bit difference in the float row may
    round to the neighbouring code - and every other row's bytes untouched."""
    problem = data.draw(problems(backend, fp8=True))
    k, *_, k_cache, slots, interleaved = problem
    before = k_cache.clone()
    index_cache_write(*problem[:6], k_cache, slots, interleaved=interleaved)
    T, D = k.shape
    want = reference.index_keys(*problem[:6], interleaved).float()            # [T, D]
    block_size = k_cache.shape[1]
    written = torch.zeros(k_cache.shape[:2], dtype=torch.bool, device=DEVICE)
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        row = k_cache[slot // block_size, slot % block_size]
        got = dequantize(row, D)
        scale = row[D:].contiguous().view(torch.float32).repeat_interleave(128)  # [D]
        tolerance = 2**-3 * want[t].abs() + scale * 2**-9 + 2 * torch.finfo(k.dtype).eps
        assert (got - want[t]).abs().le(tolerance).all(), t
        written[slot // block_size, slot % block_size] = True
    assert torch.equal(k_cache[~written], before[~written])


def test_reference_is_transformers_indexer_key():
    """DeepseekV32Indexer's key: k_norm (nn.LayerNorm, eps 1e-6) of wk(x), then rotate_half
    RoPE on its first qk_rope_head_dim columns with cat(freqs, freqs) tables."""
    g = torch.Generator().manual_seed(0)
    T, D, Dr = 7, 32, 16
    k = torch.randn(T, D, generator=g) * 2 + 1
    norm = torch.nn.LayerNorm(D, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2, generator=g)
        norm.bias.normal_(0.0, 0.2, generator=g)
    positions = torch.arange(T) * 37
    cos, sin = rope.rope_cos_sin(positions, rope.rope_frequencies(Dr, 10000.0))
    normed = norm(k)
    x_rot, x_pass = normed[:, :Dr], normed[:, Dr:]
    rotate_half = torch.cat([-x_rot[:, Dr // 2:], x_rot[:, :Dr // 2]], dim=1)
    full_cos, full_sin = torch.cat([cos, cos], dim=1), torch.cat([sin, sin], dim=1)
    want = torch.cat([x_rot * full_cos + rotate_half * full_sin, x_pass], dim=1)
    got = reference.index_keys(k, norm.weight.detach(), norm.bias.detach(), 1e-6, cos, sin,
                               False)
    assert_close(got, want.detach(), torch.float32, reduction=D)


def test_slots_out_of_range_never_write(backend):
    """The host check rejects them; below it (as under CUDA graph capture), each backend
    masks them."""
    k = torch.randn(4, 8, device=DEVICE)
    ones, zeros = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)
    cos, sin = torch.ones(4, 2, device=DEVICE), torch.zeros(4, 2, device=DEVICE)
    k_cache = torch.zeros(2, 4, 8, device=DEVICE)
    slots = torch.tensor([8, -5, 2**40, 1], device=DEVICE)       # only token 3 is in range
    with pytest.raises(ValueError,
                       match=r"slot_mapping must be in \[-1, 8\).*\[-5, 1099511627776\]"):
        index_cache_write(k, ones, zeros, 0.0, cos, sin, k_cache, slots)
    assert not k_cache.any()
    dispatch.implementation("index_cache_write", k_cache.device)(
        k, ones, zeros, 0.0, cos, sin, k_cache, slots, False)
    want = torch.nn.functional.layer_norm(k[3], (8,))
    assert_close(k_cache[0, 1], want, torch.float32, reduction=8)
    k_cache[0, 1] = 0
    assert not k_cache.any()


def _inputs():
    g = torch.Generator().manual_seed(1)
    k = torch.randn(5, 16, generator=g)
    weight, bias = 1 + torch.randn(16, generator=g), torch.randn(16, generator=g)
    cos, sin = rope.rope_cos_sin(torch.arange(5), rope.rope_frequencies(8, 10000.0))
    slots = torch.tensor([0, 7, -1, 11, 2])
    return [t.to(DEVICE) for t in (k, weight, bias, cos, sin, slots)]


def test_opcheck():
    k, weight, bias, cos, sin, slots = _inputs()
    torch.library.opcheck(torch.ops.ds_kernels.index_cache_write.default,
                          (k, weight, bias, 1e-6, cos, sin, torch.zeros(3, 4, 16, device=DEVICE),
                           slots, False))


def test_meta_tensors():
    k, weight, bias, cos, sin, slots = (t.to("meta") for t in _inputs())
    index_cache_write(k, weight, bias, 1e-6, cos, sin, torch.zeros(3, 4, 16, device="meta"),
                      slots)


def test_torch_compile_fullgraph():
    k, weight, bias, cos, sin, slots = _inputs()

    @torch.compile(fullgraph=True)
    def step(k, k_cache):
        index_cache_write(k * 2, weight, bias, 1e-6, cos, sin, k_cache, slots)

    k_cache = torch.zeros(3, 4, 16, device=DEVICE)
    step(k, k_cache)
    want = torch.zeros_like(k_cache)
    reference.index_cache_write(k * 2, weight, bias, 1e-6, cos, sin, want, slots, False)
    assert_close(k_cache, want, torch.float32, reduction=16)


@pytest.mark.parametrize("change,error,match", [
    (dict(k=torch.zeros(3, 8, dtype=torch.float16)), TypeError, "k_cache has dtype"),
    (dict(k=torch.zeros(3, 8, 1)), ValueError, "k must be 2-D"),
    (dict(norm_weight=torch.ones(7)), ValueError, r"norm_weight must be \[Di=8\]"),
    (dict(norm_bias=torch.ones(9)), ValueError, r"norm_bias must be \[Di=8\]"),
    (dict(cos=torch.ones(3, 5), sin=torch.ones(3, 5)), ValueError,
     r"cos must be \[T=3, Dr/2\] with 2 <= Dr <= Di=8"),
    (dict(sin=torch.ones(3, 1)), ValueError, r"sin must be \[T=3, Dr/2\].*one shape"),
    (dict(cos=torch.ones(2, 2)), ValueError, r"cos must be \[T=3"),
    (dict(k_cache=torch.zeros(2, 4, 9)), ValueError,
     r"k_cache must be \[num_blocks, block_size, Di=8\]"),
    (dict(slot_mapping=torch.tensor([0, 1])), ValueError, r"slot_mapping must have shape \[T=3\]"),
    (dict(slot_mapping=torch.tensor([0, 1, 8])), ValueError, r"slot_mapping must be in \[-1, 8\)"),
    (dict(eps=-1.0), ValueError, "eps must be finite and >= 0"),
    (dict(interleaved=1), TypeError, "interleaved must be a bool"),
    (dict(k_cache=torch.zeros(2, 4, 8, device="meta")), ValueError, "k_cache is on meta"),
    (dict(k_cache=torch.zeros(2, 4, 12, dtype=torch.uint8)), ValueError,
     r"an FP8 k_cache \(uint8\) needs Di to be a multiple of 128 .*, got Di=8"),
    (dict(k=torch.zeros(3, 128), norm_weight=torch.ones(128), norm_bias=torch.zeros(128),
          k_cache=torch.zeros(2, 4, 130, dtype=torch.uint8)), ValueError,
     r"an FP8 k_cache \(uint8\) must be \[num_blocks, block_size, Di \+ 4 \* Di/128 = 132\]"),
    (dict(k=torch.zeros(3, 128), norm_weight=torch.ones(128), norm_bias=torch.zeros(128),
          k_cache=torch.zeros(2, 4, 133, dtype=torch.uint8)[..., 1:]), ValueError,
     r"k_cache's rows must be contiguous bytes and 4-byte aligned"),
])
def test_bad_arguments_raise_clear_errors(change, error, match):
    args = dict(k=torch.zeros(3, 8), norm_weight=torch.ones(8), norm_bias=torch.zeros(8),
                eps=1e-6, cos=torch.ones(3, 2), sin=torch.zeros(3, 2),
                k_cache=torch.zeros(2, 4, 8), slot_mapping=torch.tensor([0, 5, -1]))
    args.update(change)
    with pytest.raises(error, match=match):
        index_cache_write(**args)
