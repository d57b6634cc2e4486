"""quantize_fp8_block, quantize_mxfp4, dequantize: bit for bit against the block-by-block
reference recipe (edge blocks, zeros, tiny and huge values, non-finite weights), the recipe's
own properties (scales, powers of two, nothing clipped, round-trip error), every code decoded,
edge-block scales that transformers' rows // scale_rows gets wrong, and bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ds_kernels
from conftest import DEVICE
from ds_kernels.reference import quantize as reference
from numerics import SEEDS

E4M3_BIT_STEP = 2.0 ** -3  # e4m3's mantissa step, relative to a normal value
E8M0 = torch.float8_e8m0fnu
FP4 = torch.float4_e2m1fn_x2


def _bytes(t):
    return t.view(torch.uint8)


def _same(a, b):
    """Equal values, NaN matching NaN."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


def _weights(draw, shape, dtype, seed):
    """Normal weights at a drawn magnitude, some blocks zeroed, some entries far off the rest."""
    g = torch.Generator().manual_seed(seed)
    magnitude = draw(st.sampled_from([1e-9, 1e-3, 1.0, 300.0] + (
        [1e30] if dtype != torch.float16 else [])))
    w = torch.randn(shape, generator=g) * magnitude
    if draw(st.booleans()):  # a zero region: an all-zero block or group
        w[..., : w.shape[-2] // 2, : 64] = 0
    if draw(st.booleans()) and w.numel() and magnitude < 1e30:  # outliers, 1000x the rest
        w.view(-1)[torch.randint(0, w.numel(), (3,), generator=g)] *= 1000
    special = draw(st.sampled_from(["none", "nan", "inf"]))
    if special != "none" and w.numel():
        value = torch.nan if special == "nan" else -torch.inf
        w.view(-1)[torch.randint(0, w.numel(), (2,), generator=g)] = value
    return w.to(DEVICE, dtype)


@st.composite
def fp8_problems(draw):
    lead = draw(st.sampled_from([(), (2,), (0,)]))
    N = draw(st.sampled_from([1, 7, 128, 129, 200]))
    K = draw(st.sampled_from([1, 33, 128, 257]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
    w = _weights(draw, (*lead, N, K), dtype, draw(SEEDS, label="seed"))
    return w, draw(st.sampled_from(["float", "ue8m0"]))


@settings(max_examples=40)
@given(problem=fp8_problems())
def test_fp8_block_matches_the_reference_recipe(problem):
    w, scale_fmt = problem
    w_q, scale = ds_kernels.quantize_fp8_block(w, scale_fmt=scale_fmt)
    want_q, want_scale = reference.quantize_fp8_block(w, scale_fmt)
    N, K = w.shape[-2:]
    assert w_q.dtype == torch.float8_e4m3fn and w_q.shape == w.shape
    assert scale.dtype == torch.float32
    assert scale.shape == (*w.shape[:-2], math.ceil(N / 128), math.ceil(K / 128))
    assert torch.equal(_bytes(w_q), _bytes(want_q)), "codes differ from the reference"
    assert torch.equal(scale, want_scale), "scales differ from the reference"
    w_deq = ds_kernels.dequantize(w_q, scale)
    assert _same(w_deq, reference.dequantize(want_q, want_scale))
    _check_fp8_properties(w, w_q, scale, w_deq, scale_fmt)


def _check_fp8_properties(w, w_q, scale, w_deq, scale_fmt):
    w = w.double()
    finite = w.isfinite()
    block = torch.nn.functional.pad(torch.where(finite, w.abs(), 0), (0, (-w.shape[-1]) % 128,
                                                                      0, (-w.shape[-2]) % 128))
    amax = block.unflatten(-1, (-1, 128)).unflatten(-3, (-1, 128)).amax(dim=(-3, -1))
    s = scale.double()
    assert (s * 448 >= amax * (1 - 2 ** -23)).all(), "a block's scale clips its amax"
    assert (s >= 1e-4 / 448 * (1 - 2 ** -23)).all(), "the amax floor 1e-4 is missing"
    if scale_fmt == "ue8m0":
        assert (torch.frexp(s).mantissa == 0.5).all(), "ue8m0 scales must be powers of two"
        assert (s * 448 < 2 * amax.clamp_min(1e-4) * (1 + 2 ** -20)).all(), "not the smallest"
    else:
        assert torch.equal(scale, (amax.clamp_min(1e-4).float() / 448))
    # Round trip: half an e4m3 step of each value, or half the subnormal step 2^-9 of the scale.
    s_full = s.repeat_interleave(128, -2)[..., : w.shape[-2], :].repeat_interleave(128, -1)[
        ..., : w.shape[-1]]
    error = (w_deq.double() - w).abs()
    bound = E4M3_BIT_STEP / 2 * w.abs() + 2 ** -10 * s_full
    assert (error[finite] <= bound[finite] * (1 + 1e-5)).all(), "round trip beyond half a step"
    assert w_deq[~finite].isnan().all(), "NaN and inf weights must dequantise to NaN"
    assert w_deq[finite].isfinite().all()


@settings(max_examples=40)
@given(problem=fp8_problems())
def test_fp8_activations_match_the_reference_recipe(problem):
    """w8a8's activations (per token and 128 columns): the vectorised torch path is the
    reference's, bit for bit; a group's scale keeps its amax, the round trip stays within half
    an e4m3 step, and a group holding NaN or inf comes back all NaN (its token's outputs)."""
    from ds_kernels.cpu.quantize import fake_quantize_fp8_activations, quantize_fp8_activations

    w, _ = problem
    x = w.reshape(-1, w.shape[-1])                                # [M, K]
    got = fake_quantize_fp8_activations(x)
    want = reference.fake_quantize_fp8_activations(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert _same(got.cpu(), want.cpu()), "differs from the reference"
    x_q, scale = reference.quantize_fp8_activations(x)
    got_q, got_scale = quantize_fp8_activations(x)              # FP8 dispatch's codes
    assert torch.equal(got_q.cpu().view(torch.uint8), x_q.cpu().view(torch.uint8))
    assert _same(got_scale.cpu(), scale.cpu())
    groups = torch.nn.functional.pad(x.double().cpu(), (0, (-x.shape[1]) % 128)).unflatten(
        1, (-1, 128))                                             # [M, groups, 128]
    finite = groups.isfinite().all(dim=-1)
    amax = torch.where(groups.isfinite(), groups.abs(), 0).amax(dim=-1)
    assert torch.equal(scale[finite], (amax.clamp_min(1e-4).float() / 448)[finite])
    assert scale[~finite].isnan().all()
    s_full = scale.double().repeat_interleave(128, 1)[:, :x.shape[1]]
    error = (want.double() - x.double().cpu()).abs()
    ok = s_full.isfinite()
    bound = E4M3_BIT_STEP / 2 * x.double().cpu().abs() + 2 ** -10 * s_full
    assert (error[ok] <= bound[ok] * (1 + 1e-5)).all(), "round trip beyond half a step"
    assert want[~ok].isnan().all()


@st.composite
def mxfp4_problems(draw):
    lead = draw(st.sampled_from([(), (3,), (0,)]))
    N = draw(st.sampled_from([1, 5, 17]))
    K = draw(st.sampled_from([32, 64, 96, 160]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
    seed = draw(SEEDS, label="seed")
    w = _weights(draw, (*lead, N, K), dtype, seed)
    if draw(st.booleans()):  # exact ties between e2m1 values, at a group scale of 2^-3
        g = torch.Generator().manual_seed(seed)
        ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]) * 2.0 ** -3
        picks = ties[torch.randint(0, 8, w.shape, generator=g)]
        signs = torch.randint(0, 2, w.shape, generator=g) * 2 - 1
        w = (picks * signs).to(DEVICE, dtype)
    return w


@settings(max_examples=40)
@given(w=mxfp4_problems())
def test_mxfp4_matches_the_reference_recipe(w):
    w_q, scale = ds_kernels.quantize_mxfp4(w)
    want_q, want_scale = reference.quantize_mxfp4(w)
    N, K = w.shape[-2:]
    assert w_q.dtype == FP4 and w_q.shape == (*w.shape[:-1], K // 2)
    assert scale.dtype == E8M0 and scale.shape == (*w.shape[:-1], K // 32)
    assert torch.equal(_bytes(w_q), _bytes(want_q)), "codes differ from the reference"
    assert torch.equal(_bytes(scale), _bytes(want_scale)), "scales differ from the reference"
    w_deq = ds_kernels.dequantize(w_q, scale)
    assert _same(w_deq, reference.dequantize(want_q, want_scale))

    groups = w.double().unflatten(-1, (-1, 32))
    finite = groups.isfinite().all(-1)
    amax = torch.where(groups.isfinite(), groups.abs(), 0).amax(-1)
    s = scale.double()
    assert (s[finite] * 6 >= amax[finite] * (1 - 2 ** -23)).all(), "a group's scale clips"
    assert (s[finite] * 6 < 2 * amax[finite].clamp_min(6 * 2.0 ** -126)).all(), "not the smallest"
    assert _bytes(scale)[~finite].eq(255).all(), "a group with NaN or inf needs a NaN scale"
    # Round trip: half the e2m1 gap around each value: a quarter of it, or a quarter of the scale.
    error = (w_deq.double().unflatten(-1, (-1, 32)) - groups).abs()
    bound = 0.25 * groups.abs() + 0.25 * s.unsqueeze(-1)
    assert (error <= bound)[finite].all(), "round trip beyond half an e2m1 step"


def test_e2m1_rounds_ties_to_even_and_packs_the_even_column_low():
    # amax 6 makes the group's scale exactly 1, so each value is its own e2m1 input.
    values = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -0.0, 0.2, -5.5, 2.9, 0.0]
    w = torch.tensor(values + [0.0] * (32 - len(values)))[None]
    w_q, scale = ds_kernels.quantize_mxfp4(w)
    assert _bytes(scale).item() == 127  # 2^0
    codes = torch.stack([_bytes(w_q) & 0xF, _bytes(w_q) >> 4], -1).flatten(-2)[0]
    # 6 -> 7; ties: 0.25 -> 0, 0.75 -> 1.0 (2), 1.25 -> 1.0 (2), 1.75 -> 2 (4), 2.5 -> 2 (4),
    # 3.5 -> 4 (6), 5 -> 4 (6); signs in bit 3, -0 kept; 0.2 -> 0, -5.5 -> -6, 2.9 -> 3.
    want = [7, 0, 2, 2, 4, 4, 6, 6, 8 | 2, 8, 0, 8 | 7, 5, 0]
    assert codes[:len(want)].tolist() == want
    assert _bytes(w_q)[0, 0].item() == 7 | (0 << 4)  # column 0 in the low nibble


def test_every_code_dequantises_exactly():
    e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(2, 128)
    for scale in (0.37, 2.0 ** 100, 2.0 ** 120):  # 448 * 2^120 overflows fp32, as it should
        s = torch.tensor([[scale]])
        got, want = ds_kernels.dequantize(e4m3, s), reference.dequantize(e4m3, s)
        assert _same(got, want), scale
        assert torch.equal(got.isnan(), e4m3.float().isnan())
    # Every MXFP4 byte, under e8m0 scales 2^-127 (byte 0), 2^-3, 2^0, 2^100 and NaN (255).
    packed = torch.arange(256, dtype=torch.uint8).repeat(5, 1).view(FP4)  # [5, 256]: K = 512
    exponents = torch.tensor([0, 124, 127, 227, 255], dtype=torch.uint8)
    scale = exponents[:, None].repeat(1, 16).view(E8M0)                    # [5, 512 / 32]
    got, want = ds_kernels.dequantize(packed, scale), reference.dequantize(packed, scale)
    assert _same(got, want)
    assert got[4].isnan().all() and not got[:4].isnan().any()
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
    byte = torch.arange(256)
    assert torch.equal(got[2, 0::2], grid[byte & 0xF]), "the low nibble is the even column"
    assert torch.equal(got[2, 1::2], grid[byte >> 4])
    assert torch.equal(got[0], grid[torch.stack([byte & 0xF, byte >> 4], -1).flatten()]
                       * 2.0 ** -127)


def test_edge_blocks_use_their_own_scale_row():
    """DeepSeek-V3's kv_a_proj_with_mqa has 576 rows: 4.5 blocks, 5 scale rows. transformers
    derives the block size as 576 // 5 = 115 rows and so scales rows 115-127 with the second
    scale row; the block is 128 rows whatever the grid says."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(576, 160, generator=g)
    w[:128] *= 1000  # the first block row's scale is ~1000x the others'
    w_q, scale = ds_kernels.quantize_fp8_block(w)
    assert scale.shape == (5, 2)
    w_deq = ds_kernels.dequantize(w_q, scale)
    assert torch.equal(w_deq, reference.dequantize(w_q, scale))
    assert ((w_deq - w).abs() <= 2 ** -4 * w.abs() + 2 ** -10 * scale.max()).all()
    misscaled = w_q[115:128].float() * scale[1, 0]  # rows 115-127 as transformers scales them
    assert not torch.allclose(misscaled, w[115:128], rtol=0.1)


def test_dequantize_takes_e8m0_scales_for_fp8_and_any_dtype_out():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 130, 70, generator=g)
    w_q, scale = ds_kernels.quantize_fp8_block(w, scale_fmt="ue8m0")
    e8m0 = scale.to(E8M0)  # exact: ue8m0 scales are powers of two
    assert torch.equal(scale, e8m0.float())
    want = reference.dequantize(w_q, scale)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        got = ds_kernels.dequantize(w_q, e8m0, dtype)
        assert got.dtype == dtype and torch.equal(got, want.to(dtype))


def test_quantize_is_deterministic_and_leaves_w_alone():
    w = torch.randn(2, 200, 96, device=DEVICE)
    before = w.clone()
    a = ds_kernels.quantize_fp8_block(w)
    b = ds_kernels.quantize_fp8_block(w)
    c, d = ds_kernels.quantize_mxfp4(w), ds_kernels.quantize_mxfp4(w)
    assert torch.equal(_bytes(a[0]), _bytes(b[0])) and torch.equal(a[1], b[1])
    assert torch.equal(_bytes(c[0]), _bytes(d[0])) and torch.equal(_bytes(c[1]), _bytes(d[1]))
    assert torch.equal(w, before)


def _fp8(N=200, K=96):
    return ds_kernels.quantize_fp8_block(torch.randn(N, K))


def _mxfp4(N=8, K=64):
    return ds_kernels.quantize_mxfp4(torch.randn(N, K))


@pytest.mark.parametrize("call,error,match", [
    (lambda: ds_kernels.quantize_fp8_block(torch.randn(4, 4), (64, 64)), ValueError,
     r"block_size must be \(128, 128\)"),
    (lambda: ds_kernels.quantize_fp8_block(torch.randn(4, 4), 128), TypeError,
     "block_size must be a pair of ints"),
    (lambda: ds_kernels.quantize_fp8_block(torch.randn(4, 4), scale_fmt="e8m0"), ValueError,
     "scale_fmt must be one of"),
    (lambda: ds_kernels.quantize_fp8_block(torch.randn(4)), ValueError, r"w must be \[..., N, K\]"),
    (lambda: ds_kernels.quantize_fp8_block(torch.ones(4, 4, dtype=torch.int32)), TypeError,
     "w must have dtype"),
    (lambda: ds_kernels.quantize_mxfp4(torch.randn(4, 48)), ValueError,
     "multiple of 32"),
    (lambda: ds_kernels.dequantize(torch.randn(4, 4), torch.ones(1, 1)), TypeError,
     "w_q must be float8_e4m3fn .* or float4_e2m1fn_x2"),
    (lambda: ds_kernels.dequantize(torch.zeros(4, 4, dtype=torch.int8), torch.ones(1, 1)),
     TypeError, "w_q must be float8_e4m3fn"),
    (lambda: ds_kernels.dequantize(_fp8()[0], _fp8()[1][:1]), ValueError,
     r"scale must have shape \[2, 1\] for w_q of shape \(200, 96\)"),
    (lambda: ds_kernels.dequantize(_fp8()[0], _fp8()[1].half()), TypeError,
     "scale of the fp8 weight w_q must have dtype in"),
    (lambda: ds_kernels.dequantize(_mxfp4()[0], _mxfp4()[1].float()), TypeError,
     r"scale of the mxfp4 weight w_q must have dtype in \(float8_e8m0fnu\)"),
    (lambda: ds_kernels.dequantize(_mxfp4()[0], _mxfp4()[1].view(torch.uint8)), TypeError,
     r"view\(torch.float8_e8m0fnu\)"),
    (lambda: ds_kernels.dequantize(_mxfp4()[0], _mxfp4()[1][:, :1]), ValueError,
     r"scale must have shape \[8, 2\]"),
    (lambda: ds_kernels.dequantize(_mxfp4()[0][:, :8], _mxfp4()[1][:, :1]), ValueError,
     "MXFP4 needs K = 16 to be a multiple of 32"),
    (lambda: ds_kernels.dequantize(_fp8()[0].expand(2, 200, 96), _fp8()[1]), ValueError,
     r"scale must have shape \[2, 2, 1\]"),
    (lambda: ds_kernels.dequantize(*_fp8(), torch.int32), TypeError, "dtype must be one of"),
    (lambda: ds_kernels.dequantize(_fp8()[0], _fp8()[1].to("meta")), ValueError,
     "scale is on meta"),
])
def test_bad_arguments_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
