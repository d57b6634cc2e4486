"""mla_cache_write and mla_cache_write_fused: every backend against the reference (padding
slots, strided inputs and caches, untouched rows), the fused op against its parts, bad slots
never written, errors, opcheck and torch.compile."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DEVICE
from ds_kernels import dispatch, rope
from ds_kernels.ops.apply_rope import apply_rope
from ds_kernels.ops.mla_cache_write import mla_cache_write, mla_cache_write_fused
from ds_kernels.ops.rms_norm import rms_norm
from ds_kernels.reference import mla_cache_write as reference
from numerics import assert_close


def dtypes(backend):
    # bf16 arithmetic is wrong in Triton's interpreter (ENVIRONMENT.md): GPU only there.
    return [torch.float32, torch.float16] + (
        [torch.bfloat16] if backend == "torch" or DEVICE == "cuda" else [])


@st.composite
def cache_problems(draw, backend):
    """Inputs of mla_cache_write_fused: (kv_latent, k_pe, norm_weight, eps, cos, sin, kv_cache,
    slot_mapping, interleaved); the plain write takes (kv_latent, k_pe, kv_cache, slot_mapping)."""
    T = draw(st.sampled_from([0, 1, 4, 11]))
    Dc = draw(st.sampled_from([8, 20, 64]))
    Dr = draw(st.sampled_from([2, 6, 16]))
    block_size = draw(st.sampled_from([1, 4, 16]))
    num_blocks = -(-T // block_size) + draw(st.integers(1, 2))
    dtype = draw(st.sampled_from(dtypes(backend)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    to = dict(device=DEVICE, dtype=dtype)
    if draw(st.booleans()):  # column slices of kv_a_proj's output [T, Dc + Dr]: strided rows
        compressed = torch.randn(T, Dc + Dr, generator=g).to(**to)
        kv_latent, k_pe = compressed[:, :Dc], compressed[:, Dc:]
    else:
        kv_latent, k_pe = (torch.randn(T, Dc, generator=g).to(**to),
                           torch.randn(T, Dr, generator=g).to(**to))
    # Distinct slots anywhere in the cache; some tokens are padding (-1).
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T]
    slots[torch.rand(T, generator=g) < draw(st.sampled_from([0.0, 0.3]))] = -1
    # The cache starts full of other tokens' rows, which must survive; maybe a view of a larger
    # pool whose rows are wider, or whose blocks are farther apart.
    layout = draw(st.sampled_from(["contiguous", "wide rows", "spread blocks"]))
    pool = torch.randn(num_blocks, block_size * (2 if layout == "spread blocks" else 1),
                       Dc + Dr + (3 if layout == "wide rows" else 0), generator=g)
    kv_cache = pool.to(DEVICE, dtype)[:, :block_size, :Dc + Dr]
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


@settings(max_examples=25)
@given(data=st.data())
def test_mla_cache_write_matches_reference(backend, data):
    latent, k_pe, kv_cache, slots = plain_args(data.draw(cache_problems(backend)))
    want = kv_cache.clone()
    reference.mla_cache_write(latent, k_pe, want, slots)
    mla_cache_write(latent, k_pe, kv_cache, slots)
    assert torch.equal(kv_cache, want)  # a copy: bit for bit, other rows untouched


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


@pytest.mark.parametrize("fused", [False, True])
def test_slots_out_of_range_never_write(backend, fused):
    """The host check rejects them; below it (as under CUDA graph capture, where it cannot
    run), each backend masks them."""
    latent, k_pe = torch.randn(4, 8, device=DEVICE), torch.randn(4, 4, device=DEVICE)
    kv_cache = torch.zeros(2, 4, 12, device=DEVICE)
    slots = torch.tensor([8, -5, 2**40, 1], device=DEVICE)       # only token 3 is in range
    with pytest.raises(ValueError,
                       match=r"slot_mapping must be in \[-1, 8\).*\[-5, 1099511627776\]"):
        mla_cache_write(latent, k_pe, kv_cache, slots)
    assert not kv_cache.any()
    if fused:
        cos, sin = torch.ones(4, 2, device=DEVICE), torch.zeros(4, 2, device=DEVICE)
        dispatch.implementation("mla_cache_write_fused", kv_cache.device)(
            latent, k_pe, torch.ones(8, device=DEVICE), 0.0, cos, sin, kv_cache, slots, True)
        latent = rms_norm(latent, torch.ones(8, device=DEVICE), 0.0)
    else:
        dispatch.implementation("mla_cache_write", kv_cache.device)(latent, k_pe, kv_cache, slots)
    assert torch.equal(kv_cache[0, 1], torch.cat([latent[3], k_pe[3]]))
    kv_cache[0, 1] = 0
    assert not kv_cache.any()


def test_opcheck():
    g = torch.Generator().manual_seed(1)
    latent, k_pe = torch.randn(5, 16, generator=g), torch.randn(5, 8, generator=g)
    kv_cache = torch.zeros(3, 4, 24)
    slots = torch.tensor([0, 7, -1, 11, 2])
    cos, sin = rope.rope_cos_sin(torch.arange(5), rope.rope_frequencies(8, 10000.0))
    args = [t.to(DEVICE) for t in (latent, k_pe, kv_cache, slots, cos, sin)]
    latent, k_pe, kv_cache, slots, cos, sin = args
    torch.library.opcheck(torch.ops.ds_kernels.mla_cache_write.default,
                          (latent, k_pe, kv_cache, slots))
    torch.library.opcheck(torch.ops.ds_kernels.mla_cache_write_fused.default,
                          (latent, k_pe, torch.ones(16, device=DEVICE), 1e-6, cos, sin, kv_cache,
                           slots, True))


def test_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(2)
    kv_latent, k_pe = torch.randn(5, 16, generator=g), torch.randn(5, 8, generator=g)
    weight = 1 + torch.randn(16, generator=g)
    cos, sin = rope.rope_cos_sin(torch.arange(5), rope.rope_frequencies(8, 10000.0))
    slots = torch.tensor([0, 7, -1, 11, 2])
    args = [t.to(DEVICE) for t in (kv_latent, k_pe, weight, cos, sin, slots)]
    kv_latent, k_pe, weight, cos, sin, slots = args

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
