"""fused_moe: every backend against the reference (forward and all four gradients), against
transformers' DeepseekV3Experts, edge routings, errors, opcheck, gradcheck, torch.compile."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ds_kernels
from conftest import DEVICE, backend_fixture
from ds_kernels import tuning
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


@settings(max_examples=20)
@given(problem=moe_problems())
def test_fused_moe_matches_reference(backend, problem):
    hidden, w13, w2, weights, ids = problem
    with tuning.override(**SMALL_TILES):
        out = ds_kernels.fused_moe(hidden, w13, w2, weights, ids)
    assert out.dtype == hidden.dtype and out.shape == hidden.shape
    assert_close(out, reference(hidden, w13, w2, weights, ids), hidden.dtype,
                 reduction=hidden.shape[1] + w2.shape[2], what="out")


@settings(max_examples=12)
@given(problem=moe_problems(), seed=SEEDS)
def test_fused_moe_backward_matches_reference(backend, problem, seed):
    hidden, w13, w2, weights, ids = problem
    inputs = [t.clone().requires_grad_() for t in (hidden, w13, w2, weights)]
    grad_out = random_like(hidden, seed)
    with tuning.override(**SMALL_TILES):
        ds_kernels.fused_moe(*inputs, ids).backward(grad_out)
    want = fused_moe_backward(grad_out, hidden, w13, w2, weights, ids)
    T, H = hidden.shape
    I = w2.shape[2]
    # The backends round the SwiGLU gradient to the input dtype before its GEMMs, so an error
    # follows the size of the terms a gradient sums, which can cancel (one token repeated
    # with opposite gradients: d w13 ~0.05 from terms ~1): their size is the backward of the
    # absolute values, spread over the reduction. d w13 sums over tokens a gradient that
    # itself reduced over H (through w2): T + H.
    sizes = fused_moe_backward(*(t.abs() for t in (grad_out, hidden, w13, w2, weights)), ids)
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


def test_gradcheck_float64(backend):
    g = torch.Generator().manual_seed(7)
    hidden, w13, w2, weights, ids = make_problem(g, 5, 8, 6, 3, 2, torch.float64)
    inputs = [t.double().requires_grad_() for t in (hidden, w13, w2, weights)]
    with tuning.override(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16):
        assert torch.autograd.gradcheck(lambda *x: ds_kernels.fused_moe(*x, ids), inputs,
                                        fast_mode=True)


def test_opcheck():
    g = torch.Generator().manual_seed(8)
    hidden, w13, w2, weights, ids = make_problem(g, 6, 16, 8, 4, 2, torch.float32)
    args = (hidden.requires_grad_(), w13.requires_grad_(), w2.requires_grad_(),
            weights.requires_grad_(), ids)
    torch.library.opcheck(torch.ops.ds_kernels.fused_moe.default, args)


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
