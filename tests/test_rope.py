"""apply_rope and the rope tables: every backend against the reference; both layouts against
DeepSeek-V3's apply_rotary_emb and transformers' apply_rotary_pos_emb(_interleave); the YaRN
tables against transformers' DeepseekV3RotaryEmbedding and DeepSeek-V3's precompute_freqs_cis;
gradients, errors, opcheck, gradcheck, torch.compile."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DEVICE
from ds_kernels import rope
from ds_kernels.ops.apply_rope import apply_rope
from ds_kernels.reference.apply_rope import apply_rope as reference
from numerics import SEEDS, VIEWS, as_view, assert_close, random_like

# DeepSeek-V3's config.json "rope_scaling", in transformers' rope_parameters form.
V3_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
           "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
           "mscale": 1.0, "mscale_all_dim": 1.0}


# ---- transcriptions of DeepSeek-V3's inference/model.py (github.com/deepseek-ai/DeepSeek-V3,
# commit 9b4e978), with ModelArgs' fields as arguments -------------------------------------

def deepseek_precompute_freqs_cis(dim=64, seqlen=16384, beta_fast=32, beta_slow=1, base=10000.0,
                                  factor=40, original_seq_len=4096):
    def find_correction_dim(num_rotations, dim, base, max_seq_len):
        return dim * math.log(max_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    def find_correction_range(low_rot, high_rot, dim, base, max_seq_len):
        low = math.floor(find_correction_dim(low_rot, dim, base, max_seq_len))
        high = math.ceil(find_correction_dim(high_rot, dim, base, max_seq_len))
        return max(low, 0), min(high, dim - 1)

    def linear_ramp_factor(min, max, dim):
        if min == max:
            max += 0.001
        linear_func = (torch.arange(dim, dtype=torch.float32) - min) / (max - min)
        ramp_func = torch.clamp(linear_func, 0, 1)
        return ramp_func

    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if seqlen > original_seq_len:
        low, high = find_correction_range(beta_fast, beta_slow, dim, base, original_seq_len)
        smooth = 1 - linear_ramp_factor(low, high, dim // 2)
        freqs = freqs / factor * (1 - smooth) + freqs * smooth

    t = torch.arange(seqlen)
    freqs = torch.outer(t, freqs)
    freqs_cis = torch.polar(torch.ones_like(freqs), freqs)
    return freqs_cis


def deepseek_softmax_scale(qk_head_dim=192, max_seq_len=16384, original_seq_len=4096,
                           mscale=1.0, rope_factor=40):
    softmax_scale = qk_head_dim ** -0.5
    if max_seq_len > original_seq_len:
        mscale = 0.1 * mscale * math.log(rope_factor) + 1.0
        softmax_scale = softmax_scale * mscale * mscale
    return softmax_scale


def deepseek_apply_rotary_emb(x, freqs_cis):
    """x [B, S, H, D]; freqs_cis [S, D/2] complex."""
    dtype = x.dtype
    x = torch.view_as_complex(x.float().view(*x.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.view(1, x.size(1), 1, x.size(-1))
    y = torch.view_as_real(x * freqs_cis).flatten(3)
    return y.to(dtype)


# ---- apply_rope -----------------------------------------------------------------------------

def dtypes(backend):
    # bf16 arithmetic is wrong in Triton's interpreter (ENVIRONMENT.md): GPU only there.
    return [torch.float32, torch.float16] + (
        [torch.bfloat16] if backend == "torch" or DEVICE == "cuda" else [])


def tables(g, T, half, dtype=torch.float32, sliced=False):
    positions = torch.randint(0, 200_000, (T,), generator=g)
    inv_freq = rope.rope_frequencies(2 * half, 10000.0, V3_YARN)
    cos, sin = rope.rope_cos_sin(positions, inv_freq)
    if sliced:  # transformers' layout, cat(freqs, freqs), cut to its first half: strided rows
        cos, sin = torch.cat([cos, cos], dim=-1)[:, :half], torch.cat([sin, sin], dim=-1)[:, :half]
    return cos.to(DEVICE, dtype), sin.to(DEVICE, dtype)


@st.composite
def rope_problems(draw, backend):
    T = draw(st.sampled_from([0, 1, 5, 13]))
    H = draw(st.sampled_from([None, 1, 3]))
    D = draw(st.sampled_from([2, 6, 16, 64]))
    dtype = draw(st.sampled_from(dtypes(backend)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    heads = () if H is None else (H,)
    if draw(st.booleans()):  # the rope part of q [T, H, Dn + Dr]: strided rows
        x = torch.randn(T, *heads, 5 + D, generator=g).to(DEVICE, dtype)[..., 5:]
    else:
        x = torch.randn(T, *heads, D, generator=g).to(DEVICE, dtype)
    table_dtype = draw(st.sampled_from([torch.float32, dtype]))
    cos, sin = tables(g, T, D // 2, table_dtype, sliced=draw(st.booleans()))
    x, cos, sin = (as_view(t, draw(VIEWS)) for t in (x, cos, sin))
    return x, cos, sin, draw(st.booleans())


@settings(max_examples=30)
@given(data=st.data())
def test_apply_rope_matches_reference(backend, data):
    x, cos, sin, interleaved = data.draw(rope_problems(backend))
    out = apply_rope(x, cos, sin, interleaved=interleaved)
    assert out.dtype == x.dtype and out.shape == x.shape and out.is_contiguous()
    assert_close(out, reference(x, cos, sin, interleaved), x.dtype, reduction=2, what="out")


@settings(max_examples=15)
@given(data=st.data())
def test_apply_rope_backward_matches_autograd_through_reference(backend, data):
    x, cos, sin, interleaved = data.draw(rope_problems(backend))
    grad_out = random_like(x, data.draw(SEEDS, label="grad_out seed"))
    xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    apply_rope(xg, cos, sin, interleaved=interleaved).backward(grad_out)
    reference(xr, cos, sin, interleaved).backward(grad_out)
    assert_close(xg.grad, xr.grad, x.dtype, reduction=2, what="d x")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interleaved_matches_deepseek_apply_rotary_emb(backend, dtype):
    if dtype == torch.bfloat16 and backend == "triton" and DEVICE != "cuda":
        pytest.skip("bf16 arithmetic is wrong in Triton's interpreter")
    freqs_cis = deepseek_precompute_freqs_cis(seqlen=4200)[4090:4100]  # [T=10, 32]
    x = torch.randn(10, 4, 64).to(dtype)                                  # [T, H, Dr]
    want = deepseek_apply_rotary_emb(x.unsqueeze(0), freqs_cis)[0]
    cos, sin = freqs_cis.real.contiguous(), freqs_cis.imag.contiguous()
    out = apply_rope(x.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE), interleaved=True)
    assert_close(out, want, dtype, reduction=2)


def test_layouts_match_transformers(backend):
    """interleaved=False is apply_rotary_pos_emb (rotate_half); interleaved=True is
    apply_rotary_pos_emb_interleave up to its de-interleaving permutation of the output."""
    pytest.importorskip("transformers")
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    g = torch.Generator().manual_seed(1)
    T, H, D = 7, 3, 64
    q, k = torch.randn(T, H, D, generator=g), torch.randn(T, D, generator=g)
    cos, sin = tables(g, T, D // 2)
    cos_hf, sin_hf = torch.cat([cos, cos], -1).unsqueeze(0), torch.cat([sin, sin], -1).unsqueeze(0)
    q_hf, k_hf = q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0).unsqueeze(0)  # [1, H, T, D]

    half_q, half_k = hf.apply_rotary_pos_emb(q_hf, k_hf, cos_hf.cpu(), sin_hf.cpu())
    assert_close(apply_rope(q.to(DEVICE), cos, sin, interleaved=False),
                 half_q[0].transpose(0, 1), torch.float32, reduction=2, what="rotate_half q")
    assert_close(apply_rope(k.to(DEVICE), cos, sin, interleaved=False), half_k[0, 0],
                 torch.float32, reduction=2, what="rotate_half k")

    pair_q, pair_k = hf.apply_rotary_pos_emb_interleave(q_hf, k_hf, cos_hf.cpu(), sin_hf.cpu())
    ours_q = apply_rope(q.to(DEVICE), cos, sin, interleaved=True)
    ours_k = apply_rope(k.to(DEVICE), cos, sin, interleaved=True)
    deinterleave = torch.cat([torch.arange(0, D, 2), torch.arange(1, D, 2)])
    assert_close(ours_q[..., deinterleave], pair_q[0].transpose(0, 1), torch.float32,
                 reduction=2, what="interleave q")
    assert_close(ours_k[..., deinterleave], pair_k[0, 0], torch.float32, reduction=2,
                 what="interleave k")


def test_gradcheck_float64(backend):
    x = torch.randn(4, 3, 8, dtype=torch.float64, device=DEVICE, requires_grad=True)
    angles = torch.randn(4, 4, dtype=torch.float64, device=DEVICE)
    for interleaved in (True, False):
        assert torch.autograd.gradcheck(
            lambda x: apply_rope(x, angles.cos(), angles.sin(), interleaved=interleaved), (x,),
            fast_mode=True)


def test_opcheck():
    x = torch.randn(5, 2, 8, device=DEVICE, requires_grad=True)
    cos, sin = tables(torch.Generator().manual_seed(2), 5, 4)
    for interleaved in (True, False):
        torch.library.opcheck(torch.ops.ds_kernels.apply_rope.default, (x, cos, sin, interleaved))


def test_torch_compile_fullgraph_forward_and_backward():
    x = torch.randn(6, 2, 16, device=DEVICE, requires_grad=True)
    cos, sin = tables(torch.Generator().manual_seed(3), 6, 8)

    @torch.compile(fullgraph=True)
    def loss(x, cos, sin):
        return (apply_rope(x, cos, sin, interleaved=True) * torch.arange(16.0)).sum()

    loss(x, cos, sin).backward()
    xr = x.detach().clone().requires_grad_()
    (reference(xr, cos, sin, True) * torch.arange(16.0)).sum().backward()
    assert_close(x.grad, xr.grad, torch.float32, reduction=2)


@pytest.mark.parametrize("change,error,match", [
    (dict(x=torch.zeros(3, 2, 7)), ValueError, "rope dim .* must be even and >= 2, got 7"),
    (dict(x=torch.zeros(3, 2, 2, 8)), ValueError, r"x must be \[T, D\] or \[T, H, D\]"),
    (dict(x=torch.zeros(3, 8, dtype=torch.int64)), TypeError, "x must have dtype"),
    (dict(cos=torch.zeros(3, 8)), ValueError, r"cos must be \[T=3, D/2=4\]"),
    (dict(sin=torch.zeros(2, 4)), ValueError, r"sin must be \[T=3, D/2=4\]"),
    (dict(cos=torch.zeros(3, 4, dtype=torch.int32)), TypeError, "cos must have dtype"),
    (dict(sin=torch.zeros(3, 4, device="meta")), ValueError, "sin is on meta"),
    (dict(interleaved=1), TypeError, "interleaved must be a bool"),
])
def test_bad_arguments_raise_clear_errors(change, error, match):
    args = dict(x=torch.zeros(3, 2, 8), cos=torch.ones(3, 4), sin=torch.zeros(3, 4),
                interleaved=True)
    args.update(change)
    with pytest.raises(error, match=match):
        apply_rope(args.pop("x"), args.pop("cos"), args.pop("sin"), **args)


# ---- tables ---------------------------------------------------------------------------------

POSITIONS = torch.tensor([0, 1, 2, 100, 4095, 4096, 4097, 16383, 100_000, 163_839])


@pytest.mark.parametrize("parameters", [None, V3_YARN, dict(V3_YARN, mscale=0.707),
                                        dict(V3_YARN, factor=4.0, beta_fast=16, mscale=None)],
                         ids=["default", "v3-yarn", "attention-factor", "mscale-from-factor"])
def test_tables_match_transformers_rotary_embedding(parameters):
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (DeepseekV3Attention,
                                                                       DeepseekV3RotaryEmbedding)

    extra = {} if parameters is None else dict(
        rope_parameters={k: v for k, v in parameters.items() if v is not None})
    config = transformers.DeepseekV3Config(hidden_size=64, num_attention_heads=4,
                                           num_key_value_heads=4, max_position_embeddings=163840,
                                           **extra)
    hf = DeepseekV3RotaryEmbedding(config)
    cos_hf, sin_hf = hf(torch.zeros(1), POSITIONS.unsqueeze(0))            # [1, T, 64]
    dim = config.qk_rope_head_dim
    inv_freq = rope.rope_frequencies(dim, 10000.0, parameters)
    factor = rope.rope_attention_factor(parameters)
    cos, sin = rope.rope_cos_sin(POSITIONS, inv_freq, factor)
    assert factor == hf.attention_scaling
    assert torch.equal(inv_freq, hf.inv_freq)
    assert torch.equal(cos, cos_hf[0, :, : dim // 2]) and torch.equal(sin, sin_hf[0, :, : dim // 2])
    assert rope.mla_softmax_scale(config.qk_head_dim, parameters) == DeepseekV3Attention(
        config, 0).scaling


def test_yarn_tables_match_deepseek_precompute_freqs_cis():
    """Every position of model.py's default max_seq_len, with YaRN (max_seq_len > 4096) and
    without. They agree to an ulp or two: the inverse frequencies are computed in another order
    (1 / (factor * f) vs (1 / f) / factor), and torch.polar rounds unlike cos and sin."""
    for seqlen, parameters in ((16384, V3_YARN), (4096, None)):
        freqs_cis = deepseek_precompute_freqs_cis(seqlen=seqlen)        # [seqlen, 32]
        cos, sin = rope.rope_cos_sin(torch.arange(seqlen),
                                     rope.rope_frequencies(64, 10000.0, parameters))
        torch.testing.assert_close(cos, freqs_cis.real, atol=2e-7, rtol=0)
        torch.testing.assert_close(sin, freqs_cis.imag, atol=2e-7, rtol=0)


def test_softmax_scale_for_deepseek_v3():
    scale = rope.mla_softmax_scale(192, V3_YARN)
    assert scale == pytest.approx(deepseek_softmax_scale(), rel=1e-15)
    assert scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2, rel=1e-15)
    assert scale == pytest.approx(0.1352338, rel=1e-6)
    assert rope.mla_softmax_scale(192) == 192 ** -0.5
    assert rope.yarn_mscale(40, 1.0) == pytest.approx(1.3688879)
    assert rope.yarn_mscale(1.0, 1.0) == rope.yarn_mscale(0.5) == 1.0


@pytest.mark.parametrize("call,match", [
    (lambda: rope.rope_frequencies(63, 10000.0), "dim must be an even int"),
    (lambda: rope.rope_frequencies(64, 10000.0, dict(V3_YARN, partial_rotary_factor=0.5)),
     "keys this module does not implement: \\['partial_rotary_factor'\\]"),
    (lambda: rope.rope_frequencies(64, 10000.0, {"rope_type": "linear", "factor": 2.0}),
     "rope_type must be one of"),
    (lambda: rope.rope_frequencies(64, 10000.0, {"rope_type": "yarn", "factor": 40.0}),
     "yarn scaling needs 'original_max_position_embeddings'"),
    (lambda: rope.rope_frequencies(64, 500000.0, V3_YARN), "rope_theta=10000.0 but base=500000.0"),
    (lambda: rope.rope_cos_sin(torch.tensor([0.0, 1.0]), torch.ones(4)),
     "positions must be a 1-D integer tensor"),
    (lambda: rope.rope_cos_sin(torch.arange(3), torch.ones(2, 4)), "inv_freq must be a 1-D"),
])
def test_bad_table_arguments_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
