"""fused_moe: every backend against the reference (forward and all four gradients), against
transformers' DeepseekV3Experts and (swiglu_limit) DeepseekV4Experts, edge routings, errors,
opcheck, gradcheck, torch.compile."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ds_kernels
from conftest import DEVICE, backend_fixture
from ds_kernels import testing, tuning
from ds_kernels.reference.fused_moe import fused_moe as reference
from ds_kernels.reference.fused_moe import fused_moe_backward
from numerics import SEEDS, VIEWS, as_view, assert_close, random_like

SMALL_TILES = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)

backend = backend_fixture("mm_loop", "grouped_mm", "expert_threads")


def make_problem(g, T, H, I, E, k, dtype, routing="uniform", strided=False):
    hidden = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    if routing == "uniform":  # k distinct experts per token, as a router gives
        ids = torch.rand(T, E, generator=g).argsort(-1)[:, :k]
    elif routing == "one expert":  # every token's first choice is expert 0; many experts idle
        ids = torch.stack([torch.arange(j, j + 1).expand(T) for j in range(k)], dim=1)
    else:  # "half idle": only the lower half of the experts is ever used
        ids = torch.rand(T, max(k, E // 2), generator=g).argsort(-1)[:, :k]
    weights = torch.rand(T, k, generator=g)
    if strided:  # weights stored transposed, as some checkpoints keep them
        w13 = w13.transpose(1, 2).contiguous().transpose(1, 2)
        w2 = w2.transpose(1, 2).contiguous().transpose(1, 2)
    to = dict(device=DEVICE)
    return (hidden.to(dtype=dtype, **to), w13.to(dtype=dtype, **to), w2.to(dtype=dtype, **to),
            weights.to(**to), ids.to(dtype=torch.int32, **to))


@st.composite
def moe_problems(draw):
    E = draw(st.integers(1, 6))
    k = draw(st.integers(1, min(E, 3)))
    T = draw(st.sampled_from([0, 1, 5, 19]))
    H = draw(st.sampled_from([8, 24, 40]))
    I = draw(st.sampled_from([8, 20]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    problem = make_problem(g, T, H, I, E, k, dtype,
                           routing=draw(st.sampled_from(["uniform", "one expert", "half idle"])),
                           strided=draw(st.booleans()))
    # Any argument may be a strided or an expanded view (an expanded topk_ids routes every
    # token like the first; expanded weights make every expert the first).
    return tuple(as_view(t, draw(VIEWS)) for t in problem)


# DeepSeek-V4's clamp: None (off), one that clamps most pre-activations (~N(0, 1) here), one
# that clamps a few.
LIMITS = st.sampled_from([None, None, 0.5, 2.0])


def clear_limit(hidden, w13, ids, wanted):
    """A limit near ``wanted`` that no gate or up pre-activation of the problem's assignments
    lies within 2^-10 of (relative; fp16 rounds to 2^-11): where one does, the backends'
    rounded value may fall on the other side of the clamp than the reference's exact one, and
    its gradient (0 when clamped) differs by a whole term. The forward is continuous there and
    needs no such care."""
    if wanted is None or ids.numel() == 0:
        return wanted
    rows = hidden.double()[:, None, None, :]                          # [T, 1, 1, H]
    values = (rows * w13.double()[ids.long()]).sum(-1).abs().flatten()  # [T * k * 2I]
    for limit in wanted * (1 + torch.arange(512, dtype=torch.float64) / 512):
        if not ((values - limit).abs() <= limit * 2**-10).any():
            return float(limit)
    raise AssertionError(f"no clamp limit near {wanted} clear of {values.numel()} values")


@settings(max_examples=20)
@given(problem=moe_problems(), limit=LIMITS)
def test_fused_moe_matches_reference(backend, problem, limit):
    hidden, w13, w2, weights, ids = problem
    with tuning.override(**SMALL_TILES):
        out = ds_kernels.fused_moe(hidden, w13, w2, weights, ids, swiglu_limit=limit)
    assert out.dtype == hidden.dtype and out.shape == hidden.shape
    assert_close(out, reference(hidden, w13, w2, weights, ids, swiglu_limit=limit),
                 hidden.dtype, reduction=hidden.shape[1] + w2.shape[2], what="out")


@settings(max_examples=12)
@given(problem=moe_problems(), seed=SEEDS, limit=LIMITS)
def test_fused_moe_backward_matches_reference(backend, problem, seed, limit):
    hidden, w13, w2, weights, ids = problem
    limit = clear_limit(hidden, w13, ids, limit)
    inputs = [t.clone().requires_grad_() for t in (hidden, w13, w2, weights)]
    grad_out = random_like(hidden, seed)
    with tuning.override(**SMALL_TILES):
        ds_kernels.fused_moe(*inputs, ids, swiglu_limit=limit).backward(grad_out)
    want = fused_moe_backward(grad_out, hidden, w13, w2, weights, ids, swiglu_limit=limit)
    T, H = hidden.shape
    I = w2.shape[2]
    # The backends round the SwiGLU gradient to the input dtype before its GEMMs, so an error
    # follows the size of the terms a gradient sums, which can cancel (one token repeated
    # with opposite gradients: d w13 ~0.05 from terms ~1): their size is the backward of the
    # absolute values, spread over the reduction. d w13 sums over tokens a gradient that
    # itself reduced over H (through w2): T + H.
    sizes = fused_moe_backward(*(t.abs() for t in (grad_out, hidden, w13, w2, weights)), ids,
                               swiglu_limit=limit)
    for got, expected, size, name, n in zip([t.grad for t in inputs], want, sizes,
                                            ["d hidden", "d w13", "d w2", "d topk_weights"],
                                            [2 * I + H, T + H, T + H, H + I]):
        assert_close(got, expected, hidden.dtype, reduction=n, what=name,
                     scale=(size.double() / n).clamp_min(1))


def test_decode_sizes_use_small_tiles():
    # One token and k = 8 of 256 experts: 16-row tiles, not 64; 8 blocks, not 256.
    config = tuning.gemm_heuristic(tuning.bucket(1 * 8 / 256), 4096, 7168, torch.bfloat16)
    assert config["BLOCK_M"] == 16
    alignment = ds_kernels.moe_align(torch.arange(8).view(1, 8), 256, config["BLOCK_M"])
    assert alignment.sorted_token_ids.numel() == 8 * 16


def test_against_transformers_deepseek_v3_experts(backend):
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

    config = transformers.DeepseekV3Config(n_routed_experts=8, hidden_size=32,
                                           moe_intermediate_size=16, num_experts_per_tok=3)
    experts = DeepseekV3Experts(config).to(DEVICE)
    g = torch.Generator().manual_seed(5)
    hidden, w13, w2, weights, ids = make_problem(g, 13, 32, 16, 8, 3, torch.float32)
    with torch.no_grad():
        experts.gate_up_proj.copy_(w13)
        experts.down_proj.copy_(w2)
    x_hf = hidden.clone().requires_grad_()
    w_hf = weights.clone().requires_grad_()
    out_hf = experts(x_hf, ids.long(), w_hf)
    grad_out = torch.randn(out_hf.shape, generator=g).to(DEVICE)
    out_hf.backward(grad_out)

    inputs = [t.clone().requires_grad_() for t in (hidden, w13, w2, weights)]
    with tuning.override(**SMALL_TILES):
        out = ds_kernels.fused_moe(*inputs, ids)
        out.backward(grad_out)
    assert_close(out, out_hf, torch.float32, reduction=48, what="out")
    for got, want, name in zip([t.grad for t in inputs],
                               [x_hf.grad, experts.gate_up_proj.grad, experts.down_proj.grad,
                                w_hf.grad], ["d hidden", "d w13", "d w2", "d topk_weights"]):
        assert_close(got, want, torch.float32, reduction=48, what=name)


def test_against_transformers_deepseek_v4_experts(backend):
    """swiglu_limit against transformers' DeepseekV4Experts (silu(min(g, limit)) * clamp(u,
    -limit, limit)), forward and every gradient, with a limit that clamps about a third of
    the pre-activations (and none of them within 2^-8 of it)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Experts

    g = torch.Generator().manual_seed(15)
    hidden, w13, w2, weights, ids = make_problem(g, 13, 32, 16, 8, 3, torch.float32)
    limit = clear_limit(hidden, w13, ids, 1.0)
    config = transformers.DeepseekV4Config(n_routed_experts=8, hidden_size=32,
                                           moe_intermediate_size=16, num_experts_per_tok=3,
                                           swiglu_limit=limit, num_hidden_layers=1)
    experts = DeepseekV4Experts(config).to(DEVICE)
    with torch.no_grad():
        experts.gate_up_proj.copy_(w13)
        experts.down_proj.copy_(w2)
    x_hf, w_hf = hidden.clone().requires_grad_(), weights.clone().requires_grad_()
    out_hf = experts(x_hf, ids.long(), w_hf)
    grad_out = torch.randn(out_hf.shape, generator=g).to(DEVICE)
    out_hf.backward(grad_out)

    inputs = [t.clone().requires_grad_() for t in (hidden, w13, w2, weights)]
    with tuning.override(**SMALL_TILES):
        out = ds_kernels.fused_moe(*inputs, ids, swiglu_limit=limit)
        out.backward(grad_out)
    # The clamp is active: without it the output differs.
    assert not torch.allclose(out, ds_kernels.fused_moe(hidden, w13, w2, weights, ids), atol=1e-2)
    assert_close(out, out_hf, torch.float32, reduction=48, what="out")
    for got, want, name in zip([t.grad for t in inputs],
                               [x_hf.grad, experts.gate_up_proj.grad, experts.down_proj.grad,
                                w_hf.grad], ["d hidden", "d w13", "d w2", "d topk_weights"]):
        assert_close(got, want, torch.float32, reduction=48, what=name)


def test_gradcheck_float64(backend):
    g = torch.Generator().manual_seed(7)
    hidden, w13, w2, weights, ids = make_problem(g, 5, 8, 6, 3, 2, torch.float64)
    inputs = [t.double().requires_grad_() for t in (hidden, w13, w2, weights)]
    with tuning.override(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16):
        assert torch.autograd.gradcheck(lambda *x: ds_kernels.fused_moe(*x, ids), inputs,
                                        fast_mode=True)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_opcheck(layout):
    """Also with hidden and topk_weights transposed views: the fakes' outputs (and
    gradients) must have the real, contiguous strides."""
    g = torch.Generator().manual_seed(8)
    hidden, w13, w2, weights, ids = make_problem(g, 6, 16, 8, 4, 2, torch.float32)
    if layout == "transposed":
        hidden, weights = (t.t().contiguous().t() for t in (hidden, weights))
    args = (hidden.requires_grad_(), w13.requires_grad_(), w2.requires_grad_(),
            weights.requires_grad_(), ids)
    torch.library.opcheck(torch.ops.ds_kernels.fused_moe.default, args)
    torch.library.opcheck(torch.ops.ds_kernels.fused_moe.default, (*args, 0.7))


def test_torch_compile_fullgraph_forward_and_backward():
    g = torch.Generator().manual_seed(9)
    hidden, w13, w2, weights, ids = make_problem(g, 6, 16, 8, 4, 2, torch.float32)
    w13.requires_grad_()

    @torch.compile(fullgraph=True)
    def loss(hidden, w13, w2, weights, ids):
        return ds_kernels.fused_moe(hidden, w13, w2, weights, ids).square().sum()

    loss(hidden, w13, w2, weights, ids).backward()
    out = reference(hidden, w13.detach(), w2, weights, ids)
    want = fused_moe_backward(2 * out, hidden, w13.detach(), w2, weights, ids)[1]
    assert_close(w13.grad, want, torch.float32, reduction=16)


@pytest.mark.parametrize("change,error,match", [
    (dict(topk_ids=torch.tensor([[0, 4]])), ValueError, r"topk_ids must be in \[0, 4\), got values in \[0, 4\]"),
    (dict(topk_ids=torch.tensor([[-1, 2]])), ValueError, r"topk_ids must be in \[0, 4\)"),
    (dict(topk_ids=torch.tensor([[0.0, 1.0]])), TypeError, "topk_ids must have dtype"),
    (dict(topk_weights=torch.ones(1, 3)), ValueError, "must have the same shape"),
    (dict(w13=torch.zeros(4, 16, 7)), ValueError, r"w13 must be \[E, 2I, H=8\]"),
    (dict(w2=torch.zeros(4, 8, 7)), ValueError, r"w2 must be \[E=4, H=8, I=8\]"),
    (dict(w2=torch.zeros(4, 8, 8, dtype=torch.float16)), TypeError, "w2 has dtype"),
    (dict(hidden=torch.zeros(8)), ValueError, "hidden must be 2-D"),
    (dict(activation="gelu"), ValueError, "activation must be one of"),
    (dict(swiglu_limit=0.0), ValueError, r"swiglu_limit must be > 0"),
    (dict(swiglu_limit=float("inf")), ValueError, "swiglu_limit must be finite"),
    (dict(swiglu_limit="10"), TypeError, "swiglu_limit must be a float"),
])
def test_bad_arguments_raise_clear_errors(change, error, match):
    args = dict(hidden=torch.zeros(1, 8), w13=torch.zeros(4, 16, 8), w2=torch.zeros(4, 8, 8),
                topk_weights=torch.ones(1, 2), topk_ids=torch.tensor([[0, 1]]))
    args.update(change)
    with pytest.raises(error, match=match):
        ds_kernels.fused_moe(**args)


def test_strided_routing_tensors(backend):
    # top-1 slices of wider tensors: their flattened views are strided
    g = torch.Generator().manual_seed(11)
    hidden, w13, w2, weights, ids = make_problem(g, 7, 16, 8, 4, 2, torch.float32)
    weights, ids = weights[:, :1], ids[:, :1]
    with tuning.override(**SMALL_TILES):
        out = ds_kernels.fused_moe(hidden, w13, w2, weights, ids)
    assert_close(out, reference(hidden, w13, w2, weights, ids), torch.float32, reduction=24)


def test_fp16_intermediate_overflow_is_loud_never_wrong(backend):
    """The documented fp16 limit (ops/fused_moe.py): token 0's silu(g) * u is ~1.6e5, past
    fp16's 65504, although its output (~60) is not. Its output is then non-finite on every
    backend, the other tokens stay exact, and fp32 has no such limit."""
    g = torch.Generator().manual_seed(8)
    hidden, w13, w2, weights, ids = make_problem(g, 3, 16, 8, 2, 1, torch.float32)
    hidden[0] = 25.0
    w13[:, :, :] = 1.0                                            # g = u = 16 * 25 = 400
    w2 *= 1e-3
    want = reference(hidden, w13, w2, weights, ids)
    assert want.isfinite().all() and want[0].abs().max() > 1
    with tuning.override(**SMALL_TILES):
        out32 = ds_kernels.fused_moe(hidden, w13, w2, weights, ids)
        out16 = ds_kernels.fused_moe(*(t.half() for t in (hidden, w13, w2)), weights, ids)
    assert_close(out32, want, torch.float32, reduction=24, what="fp32 out")
    assert not out16[0].isfinite().any(), "an fp16 overflow must show as inf/NaN"
    assert_close(out16[1:], want[1:], torch.float16, reduction=24, what="fp16 out, other tokens")


# Quantised experts (FP8 blocks with fp32 / ue8m0-valued / e8m0 scales, MXFP4), on every
# backend against the reference on the dequantised weights.
FORMATS = ["fp8", "fp8 ue8m0", "fp8 e8m0 scales", "mxfp4"]


def quantized(fmt, w):
    """(w_q, scale) of w [..., N, K] in one of FORMATS."""
    if fmt == "mxfp4":
        return ds_kernels.quantize_mxfp4(w)
    w_q, scale = ds_kernels.quantize_fp8_block(w, scale_fmt="float" if fmt == "fp8" else "ue8m0")
    return w_q, scale.to(torch.float8_e8m0fnu) if fmt == "fp8 e8m0 scales" else scale


def code_view(t, view):
    """as_view for code and scale tensors (float8/float4 have few ops): through their bytes."""
    if t.dtype == torch.float32:
        return as_view(t, view)
    return as_view(t.view(torch.uint8), view).view(t.dtype)


def quantized_dtypes(backend):
    # bf16 arithmetic is wrong in Triton's interpreter (ENVIRONMENT.md): GPU only there.
    return [torch.float32, torch.float16] + (
        [torch.bfloat16] if backend.startswith("torch") or DEVICE == "cuda" else [])


@st.composite
def quantized_moe_problems(draw, backend, formats=FORMATS, w8a8=False):
    """Quantised experts in one of ``formats``; for w8a8 (FP8) hidden sizes past one 128-column
    activation group and hidden states at a drawn magnitude (the scales follow them)."""
    fmt = draw(st.sampled_from(formats))
    E = draw(st.integers(1, 5))
    k = draw(st.integers(1, min(E, 3)))
    T = draw(st.sampled_from([0, 1, 5, 19]))
    # Sizes off the tiles and off the 128-blocks (2I = 144: a scale block across gate and up);
    # MXFP4 needs H and I to be multiples of its 32-group.
    H = draw(st.sampled_from([32, 64] if fmt == "mxfp4" else [24, 136, 200] if w8a8
                             else [24, 40, 136]))
    I = draw(st.sampled_from([32] if fmt == "mxfp4" else [8, 20, 72]))
    dtype = draw(st.sampled_from(quantized_dtypes(backend)))
    g = torch.Generator().manual_seed(draw(SEEDS, label="seed"))
    hidden, w13, w2, weights, ids = make_problem(
        g, T, H, I, E, k, torch.float32,
        routing=draw(st.sampled_from(["uniform", "one expert", "half idle"])))
    if w8a8:
        hidden = hidden * 10.0 ** draw(st.integers(-3, 3))
    (q13, s13), (q2, s2) = quantized(fmt, w13), quantized(fmt, w2)
    if draw(st.booleans()):  # codes stored transposed (a strided view, as for the plain weights)
        q13, q2 = (code_view(q, "dense").mT.contiguous().mT if fmt != "mxfp4" else
                   q.view(torch.uint8).mT.contiguous().mT.view(q.dtype) for q in (q13, q2))
    views = [draw(VIEWS) for _ in range(7)]
    return (as_view(hidden.to(dtype), views[0]), code_view(q13, views[1]),
            code_view(q2, views[2]), as_view(weights, views[3]), as_view(ids, views[4]),
            code_view(s13, views[5]), code_view(s2, views[6]))


def _quantized_terms(hidden, w13, w2, weights, ids, s13, s2):
    """The size of out's terms: the reference on absolute values (no cancellation)."""
    absolute = [ds_kernels.dequantize(w, s).abs() for w, s in ((w13, s13), (w2, s2))]
    return reference(hidden.double().abs(), *absolute, weights.double().abs(), ids)


@settings(max_examples=20)
@given(data=st.data(), limit=LIMITS)
def test_quantized_fused_moe_matches_reference(backend, data, limit):
    hidden, w13, w2, weights, ids, s13, s2 = data.draw(quantized_moe_problems(backend))
    with tuning.override(**SMALL_TILES, chunk_elements=700):  # chunks of a few weight rows
        out = ds_kernels.fused_moe(hidden, w13, w2, weights, ids, w13_scale=s13, w2_scale=s2,
                                   swiglu_limit=limit)
    assert out.dtype == hidden.dtype and out.shape == hidden.shape
    want = reference(hidden, w13, w2, weights, ids, s13, s2, swiglu_limit=limit)
    # Weight tiles are rounded to hidden's dtype before the GEMMs: an error relative to the
    # terms, not to their (possibly cancelling) sum.
    H, I = hidden.shape[1], w13.shape[1] // 2
    terms = _quantized_terms(hidden, w13, w2, weights, ids, s13, s2).double()
    assert_close(out, want, hidden.dtype, reduction=H + I, what="out",
                 scale=(terms / (H + I) ** 0.5).clamp_min(1))


@settings(max_examples=12)
@given(data=st.data(), seed=SEEDS)
def test_quantized_fused_moe_backward_matches_reference(backend, data, seed):
    hidden, w13, w2, weights, ids, s13, s2 = data.draw(quantized_moe_problems(backend))
    hidden, weights = (t.clone().requires_grad_() for t in (hidden, weights))
    grad_out = random_like(hidden, seed)
    with tuning.override(**SMALL_TILES, chunk_elements=700):
        ds_kernels.fused_moe(hidden, w13, w2, weights, ids, w13_scale=s13,
                             w2_scale=s2).backward(grad_out)
    want = fused_moe_backward(grad_out, hidden.detach(), w13, w2, weights.detach(), ids, s13,
                              s2)
    H, I = hidden.shape[1], w13.shape[1] // 2
    absolute = [ds_kernels.dequantize(w, s).abs() for w, s in ((w13, s13), (w2, s2))]
    sizes = fused_moe_backward(grad_out.abs(), hidden.detach().abs(), *absolute,
                               weights.detach().abs(), ids)
    for got, expected, size, name, n in [(hidden.grad, want[0], sizes[0], "d hidden", 2 * I + H),
                                          (weights.grad, want[3], sizes[3], "d topk_weights",
                                           H + I)]:
        assert got.dtype == expected.dtype
        assert_close(got, expected, hidden.dtype, reduction=n, what=name,
                     scale=(size.double() / n).clamp_min(1))


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
@pytest.mark.parametrize("T,routing", [(0, "uniform"), (1, "uniform"), (9, "one expert"),
                                       (9, "half idle")])
def test_quantized_edge_routings(backend, fmt, T, routing):
    """No tokens, one token, every token's first choice on expert 0, experts without tokens."""
    g = torch.Generator().manual_seed(T)
    hidden, w13, w2, weights, ids = make_problem(g, T, 64, 32, 4, 2, torch.float32, routing)
    (q13, s13), (q2, s2) = quantized(fmt, w13), quantized(fmt, w2)
    hidden.requires_grad_()
    with tuning.override(**SMALL_TILES):
        out = ds_kernels.fused_moe(hidden, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2)
        out.sum().backward()
    assert_close(out, reference(hidden.detach(), q13, q2, weights, ids, s13, s2),
                 torch.float32, reduction=96, what="out")
    want = fused_moe_backward(torch.ones_like(out), hidden.detach(), q13, q2, weights, ids,
                              s13, s2)[0]
    assert_close(hidden.grad, want, torch.float32, reduction=128, what="d hidden")


def test_quantized_nan_weight_poisons_only_its_tokens(backend):
    g = torch.Generator().manual_seed(3)
    hidden, w13, w2, weights, ids = make_problem(g, 6, 64, 32, 4, 1, torch.float32)
    ids[:] = torch.tensor([[0], [1], [0], [2], [3], [1]], dtype=torch.int32)
    w13[1, 5, 7] = torch.nan                                      # expert 1: tokens 1 and 5
    for fmt in ["fp8", "mxfp4"]:
        (q13, s13), (q2, s2) = quantized(fmt, w13), quantized(fmt, w2)
        with tuning.override(**SMALL_TILES):
            out = ds_kernels.fused_moe(hidden, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2)
        poisoned = torch.tensor([False, True, False, False, False, True])
        assert out[poisoned].isnan().all() and out[~poisoned].isfinite().all(), fmt


def test_quantized_opcheck():
    g = torch.Generator().manual_seed(12)
    hidden, w13, w2, weights, ids = make_problem(g, 6, 64, 32, 4, 2, torch.float32)
    for fmt in ["fp8 e8m0 scales", "mxfp4"]:
        (q13, s13), (q2, s2) = quantized(fmt, w13), quantized(fmt, w2)
        name = "mxfp4" if fmt == "mxfp4" else "fp8"
        codes = (q13.view(torch.uint8), s13.view(torch.uint8), q2.view(torch.uint8),
                 s2.view(torch.uint8))
        with tuning.override(**SMALL_TILES):
            torch.library.opcheck(torch.ops.ds_kernels.fused_moe_quant.default,
                                  (hidden.clone().requires_grad_(), *codes,
                                   weights.clone().requires_grad_(), ids, name, False))
            if name == "fp8":  # w8a8: inference only
                torch.library.opcheck(torch.ops.ds_kernels.fused_moe_quant.default,
                                      (hidden, *codes, weights, ids, name, True))
            torch.library.opcheck(torch.ops.ds_kernels.fused_moe_quant_backward.default,
                                  (torch.randn(6, 64, generator=g).to(DEVICE), hidden, *codes,
                                   weights, ids, name))


def test_quantized_torch_compile_fullgraph_forward_and_backward():
    g = torch.Generator().manual_seed(13)
    hidden, w13, w2, weights, ids = make_problem(g, 6, 64, 32, 4, 2, torch.float32)
    (q13, s13), (q2, s2) = quantized("fp8", w13), quantized("fp8", w2)
    hidden.requires_grad_()

    @torch.compile(fullgraph=True)
    def loss(hidden):
        return ds_kernels.fused_moe(hidden, q13, q2, weights, ids, w13_scale=s13,
                                    w2_scale=s2).square().sum()

    loss(hidden).backward()
    out = reference(hidden.detach(), q13, q2, weights, ids, s13, s2)
    want = fused_moe_backward(2 * out, hidden.detach(), q13, q2, weights, ids, s13, s2)[0]
    assert_close(hidden.grad, want, torch.float32, reduction=128)

    @torch.compile(fullgraph=True)
    def w8a8(hidden):
        return ds_kernels.fused_moe(hidden, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2,
                                    act_quant="fp8")

    with torch.no_grad():
        assert_close(w8a8(hidden), reference(hidden.detach(), q13, q2, weights, ids, s13, s2,
                                             w8a8=True), torch.float32, reduction=96)


def _fp8_experts(E=4, H=64, I=32):
    w13, s13 = ds_kernels.quantize_fp8_block(torch.randn(E, 2 * I, H))
    w2, s2 = ds_kernels.quantize_fp8_block(torch.randn(E, H, I))
    return dict(w13=w13, w13_scale=s13, w2=w2, w2_scale=s2)


def _mxfp4_experts(E=4, H=64, I=32):
    w13, s13 = ds_kernels.quantize_mxfp4(torch.randn(E, 2 * I, H))
    w2, s2 = ds_kernels.quantize_mxfp4(torch.randn(E, H, I))
    return dict(w13=w13, w13_scale=s13, w2=w2, w2_scale=s2)


@pytest.mark.parametrize("change,error,match", [
    (dict(w13_scale=torch.ones(4, 1, 2)), ValueError,
     r"w13_scale must have shape \[4, 1, 1\] for w13 of shape \(4, 64, 64\)"),
    (dict(w2_scale=torch.ones(4, 1, 1, dtype=torch.float16)), TypeError,
     "w2_scale of the fp8 weight w2 must have dtype"),
    (dict(w2=torch.zeros(4, 64, 32), w2_scale=None), ValueError,
     "w13 and w2 must be quantised alike .* got w13 fp8 and w2 unquantised torch.float32"),
    (dict(w2=_mxfp4_experts()["w2"], w2_scale=_mxfp4_experts()["w2_scale"]), ValueError,
     "got w13 fp8 and w2 mxfp4"),
    (dict(w13=torch.zeros(4, 64, 64)), TypeError,
     "w13_scale is given, so w13 must be quantised .* got torch.float32"),
    (dict(w13_scale=None), TypeError, "w13 is torch.float8_e4m3fn, a quantised weight: pass "
     "its scales as w13_scale"),
    (dict(w13=_fp8_experts(H=72)["w13"], w13_scale=_fp8_experts(H=72)["w13_scale"]),
     ValueError, r"w13 must be \[E, 2I, H=64\], got \(4, 64, 72\)"),
    (dict(w2_scale=torch.ones(4, 1, 1, device="meta")), ValueError, "w2_scale is on meta"),
])
def test_quantized_bad_arguments_raise_clear_errors(change, error, match):
    args = dict(hidden=torch.zeros(1, 64), topk_weights=torch.ones(1, 2),
                topk_ids=torch.tensor([[0, 1]]), **_fp8_experts())
    args.update(change)
    with pytest.raises(error, match=match):
        ds_kernels.fused_moe(**args)


def test_quantized_mxfp4_sizes_must_fill_groups():
    experts = _mxfp4_experts()
    w2, s2 = ds_kernels.quantize_mxfp4(torch.randn(4, 64, 64))  # I = 64: not w13's 32
    with pytest.raises(ValueError, match=r"w2 must be \[E=4, H=64, I=32\], got \(4, 64, 64\) "
                       r"\(mxfp4 codes"):
        ds_kernels.fused_moe(torch.zeros(1, 64), experts["w13"], w2, torch.ones(1, 2),
                             torch.tensor([[0, 1]]), w13_scale=experts["w13_scale"], w2_scale=s2)
    with pytest.raises(ValueError, match="MXFP4 needs K = 48 to be a multiple of 32"):
        ds_kernels.fused_moe(torch.zeros(1, 48), torch.zeros(4, 64, 24, dtype=torch.uint8).view(
            torch.float4_e2m1fn_x2), experts["w2"], torch.ones(1, 2), torch.tensor([[0, 1]]),
            w13_scale=torch.zeros(4, 64, 1, dtype=torch.uint8).view(torch.float8_e8m0fnu),
            w2_scale=experts["w2_scale"])


@pytest.mark.parametrize("frozen", ["w13", "w2_scale"])
def test_quantized_weights_refuse_gradients(frozen):
    """Quantised experts get no gradient: asking for one is an error, not a silent None."""
    args = dict(hidden=torch.zeros(1, 64, requires_grad=True), topk_weights=torch.ones(1, 2),
                topk_ids=torch.tensor([[0, 1]]), **_fp8_experts())
    args[frozen].requires_grad_()
    with pytest.raises(ValueError, match=f"{frozen} requires grad, but quantised weights are "
                       "frozen"):
        ds_kernels.fused_moe(**args)
    with torch.no_grad():  # inference with such a tensor is fine
        ds_kernels.fused_moe(**args)


@pytest.mark.parametrize("fmt", [None, "fp8"])
def test_inference_mode(backend, fmt):
    """Under torch.inference_mode, as serving runs, on every strategy (expert_threads' worker
    threads do not inherit the mode, yet update outputs made under it)."""
    g = torch.Generator().manual_seed(14)
    hidden, w13, w2, weights, ids = make_problem(g, 9, 64, 32, 4, 2, torch.float32)
    scales = {}
    if fmt is not None:
        (w13, scales["w13_scale"]), (w2, scales["w2_scale"]) = (quantized(fmt, w13),
                                                                quantized(fmt, w2))
    with torch.inference_mode(), tuning.override(**SMALL_TILES):
        out = ds_kernels.fused_moe(hidden, w13, w2, weights, ids, **scales)
    want = reference(hidden, w13, w2, weights, ids, *scales.values())
    assert_close(out, want, torch.float32, reduction=96)


# w8a8 (act_quant="fp8"): FP8 experts times activations quantised to e4m3 per token and 128
# columns, against the reference of the same recipe.
FP8_FORMATS = [f for f in FORMATS if f.startswith("fp8")]
E4M3_STEP = 2.0 ** -3  # e4m3's largest step relative to a value (3 mantissa bits)


def _act_step_allowance(hidden, w13, w2, weights, ids, s13, s2, dtype):
    """[T, H]: how far each output may move because GEMM 2's input act (computed by an fp32
    GEMM 1 in the kernels, fp64 in the reference, then rounded to ``dtype``) lands on another
    e4m3 code. Each act element is widened by GEMM 1's fp32 error bound, its dtype rounding
    and its group scale's own move; where that interval spans a rounding boundary of e4m3, the
    gap between its two codes times the element's weight row is allowed. Elsewhere nothing
    is: an act that is not quantised, or quantised with the wrong scale, moves every element."""
    from ds_kernels.reference.quantize import fake_quantize_fp8_activations

    x = fake_quantize_fp8_activations(hidden).double()
    w13d, w2d = (ds_kernels.dequantize(w, s).double() for w, s in ((w13, s13), (w2, s2)))
    fp32_rtol = testing.tolerance(torch.float32, hidden.shape[1])[1]
    ulp = torch.finfo(dtype).eps
    allowance = torch.zeros(hidden.shape, dtype=torch.float64)
    for t, j in ((t, j) for t in range(ids.shape[0]) for j in range(ids.shape[1])):
        e = int(ids[t, j])
        gate, up = (w13d[e] @ x[t]).chunk(2)                      # [I] each
        d_gate, d_up = (fp32_rtol * (w13d[e].abs() @ x[t].abs())).chunk(2)
        act = torch.nn.functional.silu(gate) * up
        # |silu'| <= 1.1; the dtype's rounding may fall either way of the exact value.
        d_act = 1.1 * up.abs() * d_gate + torch.nn.functional.silu(gate).abs() * d_up
        d_act += ulp * act.abs() + torch.finfo(dtype).smallest_normal * ulp
        groups = torch.split(torch.arange(act.numel()), 128)
        gap = torch.zeros_like(act)
        for cols in groups:
            amax = act[cols].abs().max().clamp_min(1e-4)
            scale = float(amax) / 448
            widen = d_act[cols] + act[cols].abs() * float(d_act[cols].max() / amax)
            low, high = ((act[cols] + sign * widen) / scale for sign in (-1, 1))
            codes = [v.clamp(-448, 448).to(torch.float8_e4m3fn).double() for v in (low, high)]
            gap[cols] = (codes[1] - codes[0]).abs() * scale
        allowance[t] += float(weights[t, j].abs()) * (w2d[e].abs() @ gap)  # [H]
    return allowance


@settings(max_examples=15)
@given(data=st.data())
def test_w8a8_fused_moe_matches_reference(backend, data):
    hidden, w13, w2, weights, ids, s13, s2 = data.draw(
        quantized_moe_problems(backend, FP8_FORMATS, w8a8=True))
    with tuning.override(**SMALL_TILES, chunk_elements=700):  # w8a8 keeps BLOCK_K = 128
        out = ds_kernels.fused_moe(hidden, w13, w2, weights, ids, w13_scale=s13, w2_scale=s2,
                                   act_quant="fp8")
    assert out.dtype == hidden.dtype and out.shape == hidden.shape
    want = reference(hidden, w13, w2, weights, ids, s13, s2, w8a8=True)
    H, I = hidden.shape[1], w13.shape[1] // 2
    terms = _quantized_terms(hidden, w13, w2, weights, ids, s13, s2).double()
    atol, _ = testing.tolerance(hidden.dtype, H + I)
    scale = (terms / (H + I) ** 0.5).clamp_min(1) + _act_step_allowance(
        hidden.float(), w13, w2, weights, ids, s13, s2, hidden.dtype) / atol
    assert_close(out, want, hidden.dtype, reduction=H + I, what="out", scale=scale)


def test_w8a8_is_the_quantised_activations_not_the_plain_ones(backend):
    """w8a8 rounds both GEMMs' inputs: here ~4% (in norm) from the weight-only result, and
    ~2% from the weight-only op on e4m3-rounded hidden rows (act's own rounding remains)."""
    from ds_kernels.reference.quantize import fake_quantize_fp8_activations

    g = torch.Generator().manual_seed(21)
    hidden, w13, w2, weights, ids = make_problem(g, 9, 200, 72, 4, 2, torch.float32)
    (q13, s13), (q2, s2) = quantized("fp8", w13), quantized("fp8", w2)
    with tuning.override(**SMALL_TILES):
        out = ds_kernels.fused_moe(hidden, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2,
                                   act_quant="fp8")
    plain = reference(hidden, q13, q2, weights, ids, s13, s2)
    quantised_input = reference(fake_quantize_fp8_activations(hidden), q13, q2, weights, ids,
                                s13, s2)
    relative = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert 0.01 < relative(out, plain) < 0.1
    assert 0.005 < relative(out, quantised_input) < 0.8 * relative(out, plain)


def test_w8a8_nan_activation_poisons_only_its_token(backend):
    g = torch.Generator().manual_seed(22)
    hidden, w13, w2, weights, ids = make_problem(g, 5, 200, 72, 4, 2, torch.float32)
    hidden[3, 150] = torch.nan                                    # the second 128-group
    hidden[1, 7] = torch.inf
    (q13, s13), (q2, s2) = quantized("fp8", w13), quantized("fp8", w2)
    with tuning.override(**SMALL_TILES):
        out = ds_kernels.fused_moe(hidden, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2,
                                   act_quant="fp8")
    poisoned = torch.tensor([False, True, False, True, False])
    assert out[poisoned].isnan().all() and out[~poisoned].isfinite().all()


@pytest.mark.parametrize("change,error,match", [
    (dict(act_quant="int8"), ValueError, r"act_quant must be one of \(None, 'fp8'\)"),
    (dict(**_mxfp4_experts()), ValueError, "w13 and w2 must be float8_e4m3fn .* got mxfp4"),
    (dict(w13=torch.zeros(4, 64, 64), w13_scale=None, w2=torch.zeros(4, 64, 32),
          w2_scale=None), ValueError, "got torch.float32"),
    (dict(hidden=torch.zeros(1, 64, requires_grad=True)), RuntimeError,
     r"fused_moe\(act_quant='fp8'\) is an inference path"),
])
def test_w8a8_bad_arguments_raise_clear_errors(change, error, match):
    args = dict(hidden=torch.zeros(1, 64), topk_weights=torch.ones(1, 2),
                topk_ids=torch.tensor([[0, 1]]), act_quant="fp8", **_fp8_experts())
    args.update(change)
    with pytest.raises(error, match=match):
        ds_kernels.fused_moe(**args)


def test_w8a8_refuses_a_gpu_without_fp8_tensor_cores(monkeypatch):
    from ds_kernels.kernels import grouped_mm as kernel

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(RuntimeError, match="NVIDIA A100 is sm_80: use act_quant=None"):
        kernel.check_fp8_tensor_cores(torch.device("cuda"))
    kernel.check_fp8_tensor_cores(torch.device("cpu"))  # the interpreter: no limit
