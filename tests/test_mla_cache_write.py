"""mla_cache_write and mla_cache_write_fused: every backend against the reference (padding
slots, strided inputs and caches, untouched rows), the fused op against its parts, bad slots
never written, errors, opcheck and torch.compile; all of it for FP8 caches too (FlashMLA's
DeepSeek-V3.2 layout), plus that layout byte by byte and its scale recipe."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DEVICE
from ds_kernels import dispatch, rope
from ds_kernels.mla_cache_format import fp8_row_bytes
from ds_kernels.ops.apply_rope import apply_rope
from ds_kernels.ops.mla_cache_write import mla_cache_write, mla_cache_write_fused
from ds_kernels.ops.rms_norm import rms_norm
from ds_kernels.reference import mla_cache_write as reference
from ds_kernels.reference.fp8_mla_cache import dequantize, quantize_row
from numerics import assert_close


CACHES = pytest.mark.parametrize("fp8", [False, True], ids=["float cache", "fp8 cache"])


def dtypes(backend):
    # bf16 arithmetic is wrong in Triton's interpreter (ENVIRONMENT.md): GPU only there.
    return [torch.float32, torch.float16] + (
        [torch.bfloat16] if backend == "torch" or DEVICE == "cuda" else [])


@st.composite
def cache_problems(draw, backend, fp8=False):
    """Inputs of mla_cache_write_fused: (kv_latent, k_pe, norm_weight, eps, cos, sin, kv_cache,
    slot_mapping, interleaved); the plain write takes (kv_latent, k_pe, kv_cache, slot_mapping).
    fp8: an FP8 cache (uint8) full of random bytes, latents of varied magnitudes."""
    T = draw(st.sampled_from([0, 1, 4, 11]))
    # FP8: 384 leaves a tile of the kernel's 512-wide block unused.
    Dc = draw(st.sampled_from([128, 384] if fp8 else [8, 20, 64]))
    Dr = draw(st.sampled_from([2, 6, 16]))
    block_size = draw(st.sampled_from([1, 4, 16]))
    num_blocks = -(-T // block_size) + draw(st.integers(1, 2))
    dtype = draw(st.sampled_from(dtypes(backend)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    to = dict(device=DEVICE, dtype=dtype)
    # FP8: each token at its own magnitude, so that the scales differ.
    magnitude = (torch.exp2(torch.randint(-12, 12, (T, 1), generator=g).float()) if fp8
                 else torch.ones(T, 1))
    if draw(st.booleans()):  # column slices of kv_a_proj's output [T, Dc + Dr]: strided rows
        compressed = (torch.randn(T, Dc + Dr, generator=g) * magnitude).to(**to)
        kv_latent, k_pe = compressed[:, :Dc], compressed[:, Dc:]
    else:
        kv_latent, k_pe = ((torch.randn(T, Dc, generator=g) * magnitude).to(**to),
                           torch.randn(T, Dr, generator=g).to(**to))
    # Distinct slots anywhere in the cache; some tokens are padding (-1).
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T]
    slots[torch.rand(T, generator=g) < draw(st.sampled_from([0.0, 0.3]))] = -1
    # The cache starts full of other tokens' rows, which must survive; maybe a view of a larger
    # pool whose rows are wider, or whose blocks are farther apart.
    layout = draw(st.sampled_from(["contiguous", "wide rows", "spread blocks"]))
    width = fp8_row_bytes(Dc, Dr) if fp8 else Dc + Dr
    shape = (num_blocks, block_size * (2 if layout == "spread blocks" else 1),
             width + (4 if fp8 else 3) * (layout == "wide rows"))  # FP8 rows stay aligned
    if fp8:
        kv_cache = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(DEVICE)
    else:
        kv_cache = torch.randn(shape, generator=g).to(DEVICE, dtype)
    kv_cache = kv_cache[:, :block_size, :width]
    weight = 1 + 0.3 * torch.randn(Dc, generator=g)
    angles = torch.randint(0, 200_000, (T,), generator=g)
    cos, sin = rope.rope_cos_sin(angles, rope.rope_frequencies(Dr, 10000.0))
    slots = slots.to(DEVICE, draw(st.sampled_from([torch.int64, torch.int32])))
    view = draw(st.sampled_from(["dense", "strided", "expanded padding"]))
    if view == "strided":  # a column of [slot, other] pairs: read by its stride
        slots = torch.stack([slots, torch.zeros_like(slots)], dim=1)[:, 0]
    elif view == "expanded padding":  # one -1 for every token (stride 0): nothing is written
        slots = torch.full((1,), -1, dtype=slots.dtype, device=DEVICE).expand(T)
    return (kv_latent, k_pe, weight.to(**to), 1e-6, cos.to(DEVICE),
            sin.to(DEVICE), kv_cache, slots, draw(st.booleans()))


def plain_args(problem):
    kv_latent, k_pe, _, _, _, _, kv_cache, slots, _ = problem
    return kv_latent, k_pe, kv_cache, slots


@CACHES
@settings(max_examples=25)
@given(data=st.data())
def test_mla_cache_write_matches_reference(backend, fp8, data):
    latent, k_pe, kv_cache, slots = plain_args(data.draw(cache_problems(backend, fp8)))
    want = kv_cache.clone()
    reference.mla_cache_write(latent, k_pe, want, slots)
    mla_cache_write(latent, k_pe, kv_cache, slots)
    # A copy, or a quantisation whose every step is exact or rounds once: bit for bit, other
    # rows untouched.
    assert torch.equal(kv_cache, want)


@settings(max_examples=25)
@given(data=st.data())
def test_mla_cache_write_fused_matches_reference(backend, data):
    problem = data.draw(cache_problems(backend))
    kv_latent, k_pe, weight, eps, cos, sin, kv_cache, slots, interleaved = problem
    want_cache = kv_cache.clone()
    want = reference.mla_cache_write_fused(kv_latent, k_pe, weight, eps, cos, sin, want_cache,
                                           slots, interleaved)
    latent, rotated = mla_cache_write_fused(kv_latent, k_pe, weight, eps, cos, sin, kv_cache,
                                            slots, interleaved=interleaved)
    dtype = kv_latent.dtype
    assert (latent.dtype, rotated.dtype) == (dtype, dtype)
    assert_close(latent, want[0], dtype, reduction=4, what="latent")
    assert_close(rotated, want[1], dtype, reduction=2, what="k_pe")
    assert_close(kv_cache, want_cache, dtype, reduction=4, what="kv_cache")
    # The cache rows hold exactly what was returned.
    written = slots >= 0
    block_size = kv_cache.shape[1]
    rows = kv_cache[slots[written] // block_size, slots[written] % block_size]
    assert torch.equal(rows, torch.cat([latent, rotated], dim=1)[written])


@settings(max_examples=25)
@given(data=st.data())
def test_mla_cache_write_fused_into_fp8_matches_reference(backend, data):
    problem = data.draw(cache_problems(backend, fp8=True))
    kv_latent, k_pe, weight, eps, cos, sin, kv_cache, slots, interleaved = problem
    untouched = kv_cache.clone()
    want = reference.mla_cache_write_fused(kv_latent, k_pe, weight, eps, cos, sin,
                                           untouched.clone(), slots, interleaved)
    latent, rotated = mla_cache_write_fused(kv_latent, k_pe, weight, eps, cos, sin, kv_cache,
                                            slots, interleaved=interleaved)
    dtype = kv_latent.dtype
    assert_close(latent, want[0], dtype, reduction=4, what="latent")
    assert_close(rotated, want[1], dtype, reduction=2, what="k_pe")
    # The rows hold exactly the returned values, quantised; the other rows their old bytes.
    written = slots >= 0
    block_size = kv_cache.shape[1]
    block, offset = slots[written] // block_size, slots[written] % block_size
    for t, b, o in zip(written.nonzero().flatten().tolist(), block.tolist(), offset.tolist()):
        assert torch.equal(kv_cache[b, o], quantize_row(latent[t], rotated[t])), t
    kv_cache[block, offset] = untouched[block, offset]
    assert torch.equal(kv_cache, untouched)


def _fp8_row(latent, k_pe):
    """The FP8 row that mla_cache_write writes for one token (slot 0 of a one-page cache)."""
    kv_cache = torch.zeros(1, 16, fp8_row_bytes(latent.shape[0], k_pe.shape[0]),
                           dtype=torch.uint8, device=DEVICE)
    mla_cache_write(latent[None].to(DEVICE), k_pe[None].to(DEVICE), kv_cache,
                    torch.tensor([0], device=DEVICE))
    return kv_cache[0, 0].cpu()


def test_fp8_row_is_flashmla_v32_layout(backend):
    """DeepSeek-V3's widths: 656 bytes = 512 e4m3 codes, then the 4 fp32 scales of columns
    0-127, 128-255, ..., then the 64 bf16 rope values; latent = code * scale."""
    g = torch.Generator().manual_seed(3)
    magnitudes = torch.tensor([1.0, 1e-3, 30.0, 0.0]).repeat_interleave(128)  # one a tile
    latent = torch.randn(512, generator=g) * magnitudes
    k_pe = torch.randn(64, generator=g)
    row = _fp8_row(latent, k_pe)
    assert row.shape == (656,)
    scales = row[512:528].view(torch.float32)
    amax = latent.view(4, 128).abs().amax(dim=1)
    # The smallest power of two >= max(amax / 448, 1e-4): an all-zero tile gets 2^-13.
    want = torch.exp2(torch.log2((amax / 448).clamp_min(1e-4)).ceil())
    assert torch.equal(scales, want), (scales, want)
    codes = row[:512].view(torch.float8_e4m3fn).float().view(4, 128)
    want_codes = (latent.view(4, 128) / want[:, None]).to(torch.float8_e4m3fn).float()
    assert torch.equal(codes, want_codes)
    assert torch.equal(row[528:].view(torch.bfloat16), k_pe.bfloat16())
    latent_back = (codes * want[:, None]).flatten()
    assert torch.equal(dequantize(row, 512), torch.cat([latent_back, k_pe.bfloat16().float()]))


def test_fp8_scales_at_their_edges(backend):
    """amax exactly 448 * 2^k keeps the scale 2^k (nothing clips); one ulp above doubles it;
    non-finite latents are left out of the amax and become NaN codes, in their own tile only;
    k_pe keeps its infinities in bf16."""
    latent = torch.zeros(384)
    latent[0] = 448 * 2.0 ** -3
    latent[128] = torch.nextafter(torch.tensor(448 * 2.0 ** 5), torch.tensor(1e9))
    latent[256:259] = torch.tensor([2.0, float("nan"), -float("inf")])
    k_pe = torch.tensor([1.0, float("inf"), -float("inf"), 3.0])
    row = _fp8_row(latent, k_pe)
    assert row[384:396].view(torch.float32).tolist() == [2.0 ** -3, 2.0 ** 6, 2.0 ** -7]
    assert row[0] == 0x7E and row[128] == 0x76       # e4m3 448, and 224 = 14336.002 / 64
    assert row[256:259].tolist() == [0x78, 0x7F, 0x7F]  # 2 / 2^-7 = 256, NaN, NaN
    assert row[:384].view(torch.float8_e4m3fn).float().isnan().nonzero().flatten().tolist() == [
        257, 258]
    assert row[396:].view(torch.bfloat16).tolist() == [1.0, float("inf"), -float("inf"), 3.0]


def test_fp8_codes_round_to_nearest_even(backend):
    """Every e4m3 value, each midpoint between neighbours (ties go to the even code) and the
    fp32 values either side of it, signed zeros and subnormals: with a tile's amax of 448 the
    scale is 1, so the codes are torch's float8_e4m3fn cast of the values themselves."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    values = values[values.isfinite()].unique()                  # sorted, -448 ... 448
    midpoints = (values[1:] + values[:-1]) / 2
    cases = torch.cat([values, midpoints, torch.nextafter(midpoints, values[1:]),
                       torch.nextafter(midpoints, values[:-1]), torch.tensor([-0.0, 2.0**-12])])
    cases = torch.cat([cases, torch.zeros(-len(cases) % 127)]).view(-1, 127)   # [T, 127]
    latent = torch.cat([torch.full((len(cases), 1), 448.0), cases], dim=1)   # amax 448
    k_pe = torch.zeros(len(cases), 2)
    kv_cache = torch.zeros(1, len(cases), fp8_row_bytes(128, 2), dtype=torch.uint8,
                           device=DEVICE)
    mla_cache_write(latent.to(DEVICE), k_pe.to(DEVICE), kv_cache,
                    torch.arange(len(cases), device=DEVICE))
    assert (kv_cache[0, :, 128:132].cpu().view(torch.float32) == 1).all()
    assert torch.equal(kv_cache[0, :, :128].cpu(), latent.to(torch.float8_e4m3fn).view(torch.uint8))


def test_fused_equals_norm_rope_and_write(backend):
    g = torch.Generator().manual_seed(0)
    T, Dc, Dr = 6, 512, 64  # DeepSeek-V3's latent and rope widths
    kv_latent, k_pe = torch.randn(T, Dc, generator=g), torch.randn(T, Dr, generator=g)
    weight = 1 + 0.3 * torch.randn(Dc, generator=g)
    cos, sin = rope.rope_cos_sin(torch.arange(100, 100 + T),
                                 rope.rope_frequencies(Dr, 10000.0, {
                                     "rope_type": "yarn", "factor": 40.0,
                                     "original_max_position_embeddings": 4096}))
    slots = torch.tensor([9, 3, -1, 0, 63, 17])
    args = [t.to(DEVICE) for t in (kv_latent, k_pe, weight, cos, sin, slots)]
    kv_latent, k_pe, weight, cos, sin, slots = args
    fused_cache = torch.zeros(2, 32, Dc + Dr, device=DEVICE)
    parts_cache = fused_cache.clone()
    latent, rotated = mla_cache_write_fused(kv_latent, k_pe, weight, 1e-6, cos, sin, fused_cache,
                                            slots)
    want_latent = rms_norm(kv_latent, weight, 1e-6)
    want_rotated = apply_rope(k_pe, cos, sin, interleaved=True)
    mla_cache_write(want_latent, want_rotated, parts_cache, slots)
    assert_close(latent, want_latent, torch.float32, reduction=4)
    assert_close(rotated, want_rotated, torch.float32)
    assert_close(fused_cache, parts_cache, torch.float32, reduction=4)


@CACHES
@pytest.mark.parametrize("fused", [False, True])
def test_slots_out_of_range_never_write(backend, fused, fp8):
    """The host check rejects them; below it (as under CUDA graph capture, where it cannot
    run), each backend masks them."""
    Dc = 128 if fp8 else 8
    latent, k_pe = torch.randn(4, Dc, device=DEVICE), torch.randn(4, 4, device=DEVICE)
    if fp8:
        kv_cache = torch.zeros(2, 4, fp8_row_bytes(Dc, 4), dtype=torch.uint8, device=DEVICE)
    else:
        kv_cache = torch.zeros(2, 4, Dc + 4, device=DEVICE)
    slots = torch.tensor([8, -5, 2**40, 1], device=DEVICE)       # only token 3 is in range
    with pytest.raises(ValueError,
                       match=r"slot_mapping must be in \[-1, 8\).*\[-5, 1099511627776\]"):
        mla_cache_write(latent, k_pe, kv_cache, slots)
    assert not kv_cache.any()
    if fused:
        cos, sin = torch.ones(4, 2, device=DEVICE), torch.zeros(4, 2, device=DEVICE)
        returned, _ = dispatch.implementation("mla_cache_write_fused", kv_cache.device)(
            latent, k_pe, torch.ones(Dc, device=DEVICE), 0.0, cos, sin, kv_cache, slots, True)
        # A float row must equal the norm op's result; an FP8 row, the returned one quantised
        # (a one-ulp difference may round to another code).
        latent = returned if fp8 else rms_norm(latent, torch.ones(Dc, device=DEVICE), 0.0)
    else:
        dispatch.implementation("mla_cache_write", kv_cache.device)(latent, k_pe, kv_cache, slots)
    want = (quantize_row(latent[3], k_pe[3]) if fp8 else torch.cat([latent[3], k_pe[3]]))
    assert torch.equal(kv_cache[0, 1], want)
    kv_cache[0, 1] = 0
    assert not kv_cache.any()


@CACHES
def test_opcheck(fp8):
    g = torch.Generator().manual_seed(1)
    Dc = 128 if fp8 else 16
    latent, k_pe = torch.randn(5, Dc, generator=g), torch.randn(5, 8, generator=g)
    kv_cache = (torch.zeros(3, 4, fp8_row_bytes(Dc, 8), dtype=torch.uint8) if fp8
                else torch.zeros(3, 4, Dc + 8))
    slots = torch.tensor([0, 7, -1, 11, 2])
    cos, sin = rope.rope_cos_sin(torch.arange(5), rope.rope_frequencies(8, 10000.0))
    args = [t.to(DEVICE) for t in (latent, k_pe, kv_cache, slots, cos, sin)]
    latent, k_pe, kv_cache, slots, cos, sin = args
    torch.library.opcheck(torch.ops.ds_kernels.mla_cache_write.default,
                          (latent, k_pe, kv_cache, slots))
    torch.library.opcheck(torch.ops.ds_kernels.mla_cache_write_fused.default,
                          (latent, k_pe, torch.ones(Dc, device=DEVICE), 1e-6, cos, sin, kv_cache,
                           slots, True))


def _compile_inputs(Dc):
    """(kv_latent [5, Dc], k_pe [5, 8], norm weight, cos, sin, slots with a -1) on DEVICE."""
    g = torch.Generator().manual_seed(2)
    kv_latent, k_pe = torch.randn(5, Dc, generator=g), torch.randn(5, 8, generator=g)
    weight = 1 + torch.randn(Dc, generator=g)
    cos, sin = rope.rope_cos_sin(torch.arange(5), rope.rope_frequencies(8, 10000.0))
    slots = torch.tensor([0, 7, -1, 11, 2])
    return [t.to(DEVICE) for t in (kv_latent, k_pe, weight, cos, sin, slots)]


def test_torch_compile_fullgraph_fp8_cache():
    kv_latent, k_pe, weight, cos, sin, slots = _compile_inputs(128)

    @torch.compile(fullgraph=True)
    def step(kv_latent, k_pe, weight, cos, sin, kv_cache, plain_cache, slots):
        latent, rotated = mla_cache_write_fused(kv_latent, k_pe, weight, 1e-6, cos, sin, kv_cache,
                                                slots)
        mla_cache_write(latent * 2, rotated, plain_cache, slots)
        return latent, rotated

    width = fp8_row_bytes(128, 8)
    kv_cache, plain_cache = (torch.zeros(3, 4, width, dtype=torch.uint8, device=DEVICE)
                             for _ in range(2))
    latent, rotated = step(kv_latent, k_pe, weight, cos, sin, kv_cache, plain_cache, slots)
    want = reference.mla_cache_write_fused(kv_latent, k_pe, weight, 1e-6, cos, sin,
                                           torch.zeros_like(kv_cache), slots, True)
    assert_close(latent, want[0], torch.float32, reduction=4, what="latent")
    want_cache, want_plain = torch.zeros_like(kv_cache), torch.zeros_like(plain_cache)
    reference.mla_cache_write(latent, rotated, want_cache, slots)
    reference.mla_cache_write(latent * 2, rotated, want_plain, slots)
    assert torch.equal(kv_cache, want_cache) and torch.equal(plain_cache, want_plain)


def test_torch_compile_fullgraph():
    kv_latent, k_pe, weight, cos, sin, slots = _compile_inputs(16)

    @torch.compile(fullgraph=True)
    def step(kv_latent, k_pe, weight, cos, sin, kv_cache, plain_cache, slots):
        latent, rotated = mla_cache_write_fused(kv_latent, k_pe, weight, 1e-6, cos, sin, kv_cache,
                                                slots, interleaved=False)
        mla_cache_write(latent * 2, rotated, plain_cache, slots)
        return latent.sum() + rotated.sum()

    kv_cache, plain_cache = torch.zeros(3, 4, 24, device=DEVICE), torch.zeros(3, 4, 24,
                                                                             device=DEVICE)
    total = step(kv_latent, k_pe, weight, cos, sin, kv_cache, plain_cache, slots)
    want_cache = torch.zeros_like(kv_cache)
    latent, rotated = reference.mla_cache_write_fused(kv_latent, k_pe, weight, 1e-6, cos, sin,
                                                      want_cache, slots, False)
    want_plain = torch.zeros_like(plain_cache)
    reference.mla_cache_write(latent * 2, rotated, want_plain, slots)
    assert_close(kv_cache, want_cache, torch.float32, reduction=4, what="kv_cache")
    assert_close(plain_cache, want_plain, torch.float32, reduction=4, what="plain_cache")
    assert_close(total, latent.sum() + rotated.sum(), torch.float32, reduction=80, what="sum")


def test_fused_is_not_differentiable():
    kv_latent = torch.randn(2, 8, device=DEVICE, requires_grad=True)
    latent, _ = mla_cache_write_fused(kv_latent, torch.randn(2, 4, device=DEVICE),
                                      torch.ones(8, device=DEVICE), 1e-6,
                                      torch.ones(2, 2, device=DEVICE),
                                      torch.zeros(2, 2, device=DEVICE),
                                      torch.zeros(1, 4, 12, device=DEVICE),
                                      torch.tensor([0, 1], device=DEVICE))
    with pytest.raises(RuntimeError, match="no autograd formula"):
        latent.sum().backward()


@pytest.mark.parametrize("change,error,match", [
    (dict(k_pe=torch.zeros(3, 4, dtype=torch.float16)), TypeError, "k_pe has dtype"),
    (dict(kv_cache=torch.zeros(2, 4, 12, dtype=torch.float64)), TypeError,
     "kv_cache must have dtype"),
    (dict(kv_cache=torch.zeros(2, 4, 13)), ValueError,
     r"kv_cache must be \[num_blocks, block_size, Dc \+ Dr = 12\]"),
    (dict(kv_cache=torch.zeros(8, 12)), ValueError, "kv_cache must be 3-D"),
    (dict(k_pe=torch.zeros(3, 3)), ValueError, r"k_pe must be \[T=3, Dr\] with Dr even"),
    (dict(k_pe=torch.zeros(2, 4)), ValueError, r"k_pe must be \[T=3, Dr\]"),
    (dict(slot_mapping=torch.tensor([0.0, 1.0, 2.0])), TypeError, "slot_mapping must have dtype"),
    (dict(slot_mapping=torch.tensor([0, 1])), ValueError, r"slot_mapping must have shape \[T=3\]"),
    (dict(slot_mapping=torch.tensor([0, 1, 8])), ValueError, r"slot_mapping must be in \[-1, 8\)"),
    (dict(slot_mapping=torch.tensor([0, 1, -2])), ValueError, r"slot_mapping must be in \[-1, 8\)"),
    (dict(kv_cache=torch.zeros(2, 4, 12, device="meta")), ValueError, "kv_cache is on meta"),
    (dict(latent=torch.zeros(3, 8, 1)), ValueError, "latent must be 2-D"),
    # FP8 caches (uint8): Dc = 128, Dr = 4 rows are 128 + 4 + 8 = 140 bytes.
    (dict(kv_cache=torch.zeros(2, 4, 12, dtype=torch.uint8)), ValueError,
     r"an FP8 kv_cache \(uint8\) needs Dc to be a multiple of 128 .*, got Dc=8"),
    (dict(latent=torch.zeros(3, 136), kv_cache=torch.zeros(2, 4, 148, dtype=torch.uint8)),
     ValueError, "multiple of 128"),
    (dict(latent=torch.zeros(3, 128), kv_cache=torch.zeros(2, 4, 132, dtype=torch.uint8)),
     ValueError, r"must be \[num_blocks, block_size, Dc \+ 4 \* Dc/128 \+ 2 \* Dr = 140\] "
     r"bytes \(Dc=128 e4m3 codes, 1 fp32 scales, Dr=4 bf16 values\), got \(2, 4, 132\)"),
    (dict(latent=torch.zeros(3, 128),
          kv_cache=torch.zeros(2, 4, 143, dtype=torch.uint8)[..., :140]),
     ValueError, r"4-byte aligned .* got strides \(572, 143, 1\)"),
    (dict(latent=torch.zeros(3, 128), kv_cache=torch.zeros(2, 4, 141, dtype=torch.uint8)[..., 1:]),
     ValueError, r"4-byte aligned .* offset 1"),
    (dict(latent=torch.zeros(3, 128),
          kv_cache=torch.zeros(2, 4, 140, 2, dtype=torch.uint8)[..., 0]),
     ValueError, r"rows must be contiguous bytes"),
    (dict(latent=torch.zeros(3, 128), k_pe=torch.zeros(3, 4, dtype=torch.float16),
          kv_cache=torch.zeros(2, 4, 140, dtype=torch.uint8)), TypeError, "k_pe has dtype"),
    (dict(latent=torch.zeros(3, 128), kv_cache=torch.zeros(2, 4, 140, dtype=torch.int8)),
     TypeError, "kv_cache must have dtype"),
])
def test_bad_arguments_raise_clear_errors(change, error, match):
    args = dict(latent=torch.zeros(3, 8), k_pe=torch.zeros(3, 4), kv_cache=torch.zeros(2, 4, 12),
                slot_mapping=torch.tensor([0, 5, -1]))
    args.update(change)
    with pytest.raises(error, match=match):
        mla_cache_write(**args)


@pytest.mark.parametrize("change,error,match", [
    (dict(norm_weight=torch.ones(7)), ValueError, r"norm_weight must have shape \[8\]"),
    (dict(eps=-1e-6), ValueError, "eps must be finite and >= 0"),
    (dict(cos=torch.ones(3, 4)), ValueError, r"cos must be \[T=3, D/2=2\]"),
    (dict(sin=torch.ones(3, 2, dtype=torch.int32)), TypeError, "sin must have dtype"),
    (dict(interleaved=None), TypeError, "interleaved must be a bool"),
    (dict(kv_latent=torch.zeros(3, 8, dtype=torch.float16)), TypeError, "k_pe has dtype"),
    (dict(slot_mapping=torch.tensor([0, 1, 99])), ValueError, r"slot_mapping must be in \[-1, 8\)"),
])
def test_bad_fused_arguments_raise_clear_errors(change, error, match):
    args = dict(kv_latent=torch.zeros(3, 8), k_pe=torch.zeros(3, 4), norm_weight=torch.ones(8),
                eps=1e-6, cos=torch.ones(3, 2), sin=torch.zeros(3, 2),
                kv_cache=torch.zeros(2, 4, 12), slot_mapping=torch.tensor([0, 5, -1]),
                interleaved=True)
    args.update(change)
    interleaved = args.pop("interleaved")
    with pytest.raises(error, match=match):
        mla_cache_write_fused(**args, interleaved=interleaved)
