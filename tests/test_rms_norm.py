"""rms_norm: every backend against the reference (forward, both gradients), against
transformers' DeepseekV3RMSNorm, tiled rows, edge sizes, errors, opcheck, gradcheck, compile."""

import contextlib
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ds_kernels
from conftest import DEVICE
from ds_kernels.ops.rms_norm import rms_norm
from ds_kernels.reference.rms_norm import rms_norm as reference
from ds_kernels.reference.rms_norm import rms_norm_backward
from numerics import SEEDS, VIEWS, as_view, assert_close, random_like

# Makes the Triton kernels cut rows wider than 32 into 16-column tiles (the path of rows wider
# than 8192, at toy sizes).
SMALL_TILES = mock.patch("ds_kernels.kernels.rms_norm._MAX_BLOCK_D", 32)


def dtypes(backend):
    # bf16 arithmetic is wrong in Triton's interpreter (ENVIRONMENT.md): GPU only there.
    return [torch.float32, torch.float16] + (
        [torch.bfloat16] if backend == "torch" or DEVICE == "cuda" else [])


@st.composite
def norm_problems(draw, backend):
    lead = draw(st.sampled_from([(), (0,), (1,), (5,), (2, 3), (17,)]))
    D = draw(st.sampled_from([1, 7, 16, 48, 100]))
    dtype = draw(st.sampled_from(dtypes(backend)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(*lead, D, generator=g) * draw(st.sampled_from([1e-3, 1.0, 30.0]))
    if draw(st.booleans()) and len(lead) == 1:  # rows of a wider activation, as kv_a's output
        x = torch.cat([x, torch.randn(*lead, 3, generator=g)], dim=-1).to(DEVICE, dtype)[..., :D]
    weight = 1 + 0.3 * torch.randn(D, generator=g)
    weight_dtype = draw(st.sampled_from([dtype, torch.float32]))
    eps = draw(st.sampled_from([1e-6, 1e-5, 0.0]))
    return (as_view(x.to(DEVICE, dtype), draw(VIEWS)),
            as_view(weight.to(DEVICE, weight_dtype), draw(VIEWS)), eps, draw(st.booleans()))


@settings(max_examples=30)
@given(data=st.data())
def test_rms_norm_matches_reference(backend, data):
    x, weight, eps, tiled = data.draw(norm_problems(backend))
    with SMALL_TILES if tiled else contextlib.nullcontext():
        y = rms_norm(x, weight, eps)
    assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous()
    # The weight multiplies a value rounded to x's dtype: one ulp there may show.
    assert_close(y, reference(x, weight, eps), x.dtype, reduction=4, what="y")


@settings(max_examples=20)
@given(data=st.data())
def test_rms_norm_backward_matches_reference(backend, data):
    x, weight, eps, tiled = data.draw(norm_problems(backend))
    eps = eps or 1e-6  # a zero row with eps = 0 has no gradient
    xg, wg = x.clone().requires_grad_(), weight.clone().requires_grad_()
    grad_out = random_like(x, data.draw(SEEDS, label="grad_out seed"))
    with SMALL_TILES if tiled else contextlib.nullcontext():
        rms_norm(xg, wg, eps).backward(grad_out)
    want_x, want_w = rms_norm_backward(grad_out, x, weight, eps)
    D = x.shape[-1]
    # d x = inv_rms * (g w - n mean(g w n)): the two terms cancel where mean(x^2) >> eps (a
    # 1-wide row: d x ~ eps), so its error follows inv_rms * |g w|, not d x itself.
    h = x.double()
    terms = (h.pow(2).mean(-1, keepdim=True) + eps).rsqrt() * (grad_out.double() * weight.double()
                                                               ).abs().amax(-1, keepdim=True)
    assert_close(xg.grad, want_x, x.dtype, reduction=4 * D, what="d x", scale=terms.clamp_min(1))
    assert_close(wg.grad, want_w, weight.dtype if weight.dtype == x.dtype else x.dtype,
                 reduction=4 * max(1, x.numel() // D), what="d weight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_against_transformers_deepseek_v3_rmsnorm(backend, dtype):
    """Forward and gradients of DeepseekV3RMSNorm (D = the 512-wide latent); the torch path
    runs its very ops, so its forward matches bit for bit."""
    if dtype == torch.bfloat16 and backend == "triton" and DEVICE != "cuda":
        pytest.skip("bf16 arithmetic is wrong in Triton's interpreter")
    pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    g = torch.Generator().manual_seed(0)
    hf = DeepseekV3RMSNorm(512, eps=1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.2 * torch.randn(512, generator=g))
    x = (3 * torch.randn(6, 512, generator=g)).to(DEVICE, dtype)
    x_hf, x_ds = x.clone().requires_grad_(), x.clone().requires_grad_()
    weight = hf.weight.detach().clone().requires_grad_()
    grad_out = torch.randn(6, 512, generator=g).to(DEVICE, dtype)

    y_hf, y = hf(x_hf), rms_norm(x_ds, weight, 1e-6)
    y_hf.backward(grad_out)
    y.backward(grad_out)
    if backend == "torch":
        assert torch.equal(y, y_hf)
    assert_close(y, y_hf, dtype, reduction=4, what="y")
    assert_close(x_ds.grad, x_hf.grad, dtype, reduction=4 * 512, what="d x")
    assert_close(weight.grad, hf.weight.grad, dtype, reduction=4 * 6, what="d weight")


def test_gradcheck_float64(backend):
    x = torch.randn(2, 5, 40, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = (1 + 0.3 * torch.randn(40, dtype=torch.float64, device=DEVICE)).requires_grad_()
    with SMALL_TILES:  # the tiled kernels' backward too: 40 columns in three tiles
        assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-5), (x, w), fast_mode=True)


def test_triton_backward_loops_over_row_blocks_deterministically():
    x = torch.randn(70, 16, device=DEVICE, requires_grad=True)  # 5 row blocks of 16 rows
    w = torch.randn(16, device=DEVICE, requires_grad=True)
    grads = []
    with ds_kernels.use_backend("triton"), mock.patch(
            "ds_kernels.kernels.rms_norm._PROGRAMS_OFF_CUDA", 2):  # 3 + 2 blocks on 2 programs
        for _ in range(2):
            x.grad = w.grad = None
            rms_norm(x, w, 1e-6).sum().backward()
            grads.append((x.grad.clone(), w.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    want_x, want_w = rms_norm_backward(torch.ones(70, 16, device=DEVICE), x.detach(), w.detach(),
                                       1e-6)
    assert_close(x.grad, want_x, torch.float32, reduction=16, what="d x")
    assert_close(w.grad, want_w, torch.float32, reduction=70, what="d weight")


def test_opcheck():
    x = torch.randn(3, 5, 32, device=DEVICE, requires_grad=True)
    w = torch.randn(32, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.ds_kernels.rms_norm.default, (x, w, 1e-6))
    torch.library.opcheck(torch.ops.ds_kernels.rms_norm_backward.default,
                          (torch.randn(3, 5, 32, device=DEVICE), x.detach(), w.detach(), 1e-6))


def test_torch_compile_fullgraph_forward_and_backward():
    x = torch.randn(4, 48, device=DEVICE, requires_grad=True)
    w = torch.randn(48, device=DEVICE, requires_grad=True)

    @torch.compile(fullgraph=True)
    def loss(x, w):
        return rms_norm(x, w, 1e-6).square().sum()

    loss(x, w).backward()
    y = reference(x.detach(), w.detach(), 1e-6)
    want_x, want_w = rms_norm_backward(2 * y, x.detach(), w.detach(), 1e-6)
    assert_close(x.grad, want_x, torch.float32, reduction=48)
    assert_close(w.grad, want_w, torch.float32, reduction=4)


@pytest.mark.parametrize("args,error,match", [
    ((torch.zeros(3, 8), torch.ones(7), 1e-6), ValueError, r"weight must have shape \[8\]"),
    ((torch.zeros(3, 8), torch.ones(1, 8), 1e-6), ValueError, "weight must be 1-D"),
    ((torch.zeros(3, 8, dtype=torch.int32), torch.ones(8), 1e-6), TypeError, "x must have dtype"),
    ((torch.zeros(3, 0), torch.ones(0), 1e-6), ValueError, "D >= 1"),
    ((torch.zeros(3, 8), torch.ones(8), -1.0), ValueError, "eps must be finite and >= 0"),
    ((torch.zeros(3, 8), torch.ones(8), float("nan")), ValueError, "eps must be finite"),
    ((torch.zeros(3, 8), torch.ones(8), "1e-6"), TypeError, "eps must be a float"),
    ((torch.zeros(3, 8), torch.ones(8, device="meta"), 1e-6), ValueError, "weight is on meta"),
    (([1.0] * 8, torch.ones(8), 1e-6), TypeError, "x must be a torch.Tensor"),
])
def test_bad_arguments_raise_clear_errors(args, error, match):
    with pytest.raises(error, match=match):
        rms_norm(*args)
