"""quant_linear: every backend against the reference (x @ dequantize(w).T + bias in fp64), for
FP8 (fp32, ue8m0 and e8m0 scales) and MXFP4 weights: 0 and 1 tokens, sizes off the tiles and
blocks, strided and expanded x, leading dims, bias or none; backward (d x, d bias), every code
decoded, NaN weights, errors, opcheck, gradcheck and torch.compile."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ds_kernels
from conftest import DEVICE
from ds_kernels import tuning
from ds_kernels.reference.quant_linear import quant_linear as reference
from ds_kernels.reference.quant_linear import quant_linear_backward
from numerics import SEEDS, VIEWS, as_view, assert_close, random_like

# Interpreter tiles (few programs, ragged tails) and torch-path chunks of a few rows, so that
# both cross scale blocks and groups.
TILES = [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32), dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64),
         dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16)]
CHUNKS = [1 << 18, 300, 4096]
FORMATS = ["fp8", "fp8 ue8m0", "fp8 e8m0 scales", "mxfp4"]


def dtypes(backend):
    # bf16 arithmetic is wrong in Triton's interpreter (ENVIRONMENT.md): GPU only there.
    return [torch.float32, torch.float16] + (
        [torch.bfloat16] if backend == "torch" or DEVICE == "cuda" else [])


def quantized(fmt, w):
    if fmt == "mxfp4":
        return ds_kernels.quantize_mxfp4(w)
    w_q, scale = ds_kernels.quantize_fp8_block(w, scale_fmt="float" if fmt == "fp8" else "ue8m0")
    return w_q, scale.to(torch.float8_e8m0fnu) if fmt == "fp8 e8m0 scales" else scale


@st.composite
def problems(draw, backend):
    fmt = draw(st.sampled_from(FORMATS))
    N = draw(st.sampled_from([1, 17, 40, 130]))
    K = draw(st.sampled_from([32, 64, 96] if fmt == "mxfp4" else [1, 16, 33, 130]))
    lead = draw(st.sampled_from([(), (0,), (1,), (5,), (2, 3), (20,)]))  # 20: bf16 chunks
    dtype = draw(st.sampled_from(dtypes(backend)))
    g = torch.Generator().manual_seed(draw(SEEDS, label="seed"))
    w = torch.randn(N, K, generator=g) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    x = as_view(torch.randn(*lead, K, generator=g).to(DEVICE, dtype), draw(VIEWS))
    bias = None
    if draw(st.booleans()):
        bias = as_view(torch.randn(N, generator=g).to(
            DEVICE, draw(st.sampled_from([dtype, torch.float32]))), draw(VIEWS))
    config = {**draw(st.sampled_from(TILES)), "chunk_elements": draw(st.sampled_from(CHUNKS))}
    return x, quantized(fmt, w.to(DEVICE)), bias, config


def _terms(x, w_q, scale):
    """The size of out's summands, sum_k |x_k| |w_k|: the error scale of every backend."""
    w = ds_kernels.dequantize(w_q, scale, torch.float64)
    return x.double().abs() @ w.abs().T


@settings(max_examples=30)
@given(data=st.data())
def test_quant_linear_matches_reference(backend, data):
    x, (w_q, scale), bias, config = data.draw(problems(backend))
    with tuning.override(**config):
        out = ds_kernels.quant_linear(x, w_q, scale, bias)
    N = w_q.shape[0]
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], N) and out.is_contiguous()
    want = reference(x, w_q, scale, bias)
    # Weight tiles are rounded to x's dtype (fp16/bf16) before the GEMM: an error relative to
    # the summands, not to their (possibly cancelling) sum.
    scale_of_terms = _terms(x, w_q, scale).clamp_min(1) / x.shape[-1] ** 0.5
    assert_close(out, want, x.dtype, reduction=x.shape[-1], what="out", scale=scale_of_terms)


@settings(max_examples=20)
@given(data=st.data(), seed=SEEDS)
def test_quant_linear_backward_matches_reference(backend, data, seed):
    x, (w_q, scale), bias, config = data.draw(problems(backend))
    x = x.detach().clone().requires_grad_()
    if bias is not None:
        bias = bias.detach().clone().requires_grad_()
    grad_out = random_like(x.new_empty(*x.shape[:-1], w_q.shape[0]), seed)
    with tuning.override(**config):
        ds_kernels.quant_linear(x, w_q, scale, bias).backward(grad_out)
    want = quant_linear_backward(grad_out, w_q, scale)
    w = ds_kernels.dequantize(w_q, scale, torch.float64)
    terms = (grad_out.double().abs() @ w.abs()).clamp_min(1) / w_q.shape[0] ** 0.5
    assert x.grad.dtype == x.dtype
    assert_close(x.grad, want, x.dtype, reduction=w_q.shape[0], what="d x", scale=terms)
    if bias is not None:
        want_bias = grad_out.double().reshape(-1, w_q.shape[0]).sum(0)
        assert_close(bias.grad, want_bias, bias.dtype if bias.dtype == x.dtype else x.dtype,
                     reduction=max(1, grad_out.numel() // w_q.shape[0]), what="d bias")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", [3, 40])  # the torch path's fp32 and bf16 chunks
def test_bf16_activations(backend, fmt, T):
    if torch.bfloat16 not in dtypes(backend):
        pytest.skip("bf16 arithmetic is wrong in Triton's interpreter")
    g = torch.Generator().manual_seed(T)
    w_q, scale = quantized(fmt, torch.randn(70, 96, generator=g).to(DEVICE))
    x = torch.randn(T, 96, generator=g).to(DEVICE, torch.bfloat16)
    bias = torch.randn(70, generator=g).to(DEVICE, torch.bfloat16)
    with tuning.override(**TILES[0], chunk_elements=2000):
        out = ds_kernels.quant_linear(x, w_q, scale, bias)
    assert out.dtype == torch.bfloat16
    assert_close(out, reference(x, w_q, scale, bias), torch.bfloat16, reduction=96, what="out",
                 scale=_terms(x, w_q, scale).clamp_min(1) / 96 ** 0.5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_code_decodes_exactly(backend, fmt):
    """x = I reads W^T back, column by column: each code times its scale, exactly in fp32."""
    if fmt == "mxfp4":
        codes = torch.arange(256, dtype=torch.uint8).repeat(2, 1)       # [2, 256]: K = 512
        w_q = codes.view(torch.float4_e2m1fn_x2)
        scale = torch.tensor([[119, 130] * 8] * 2, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    else:
        codes = torch.arange(256, dtype=torch.uint8).reshape(2, 128)
        codes[(codes & 0x7F) == 0x7F] = 0  # NaN codes: NaN * 0 would poison every column
        w_q, scale = codes.view(torch.float8_e4m3fn), torch.tensor([[0.37]])
        if fmt != "fp8":
            scale = torch.tensor([[2.0 ** -5]]).to(
                torch.float8_e8m0fnu if fmt == "fp8 e8m0 scales" else torch.float32)
    w_q, scale = w_q.to(DEVICE), scale.to(DEVICE)
    K = w_q.shape[1] * (2 if fmt == "mxfp4" else 1)
    with tuning.override(BLOCK_M=64, BLOCK_N=16, BLOCK_K=64):
        out = ds_kernels.quant_linear(torch.eye(K, device=DEVICE), w_q, scale)
    assert torch.equal(out, ds_kernels.dequantize(w_q, scale).T)


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_nan_weights_give_nan_outputs(backend, fmt):
    w = torch.randn(40, 64, device=DEVICE)
    w[3, 5] = torch.nan
    w_q, scale = quantized(fmt, w)
    with tuning.override(**TILES[0]):
        out = ds_kernels.quant_linear(torch.randn(2, 64, device=DEVICE), w_q, scale)
    assert out[:, 3].isnan().all() and not out[:, :3].isnan().any() and not out[:, 4:].isnan().any()


def test_gradcheck_float64(backend):
    w_q, scale = quantized("fp8", torch.randn(20, 33))
    x = torch.randn(3, 33, dtype=torch.float64, device=DEVICE, requires_grad=True)
    bias = torch.randn(20, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w_q, scale = w_q.to(DEVICE), scale.to(DEVICE)
    with tuning.override(**TILES[0]):
        assert torch.autograd.gradcheck(lambda x, b: ds_kernels.quant_linear(x, w_q, scale, b),
                                        (x, bias), fast_mode=True)


@pytest.mark.parametrize("fmt", ["fp8 e8m0 scales", "mxfp4"])
def test_opcheck(backend, fmt):
    w_q, scale = quantized(fmt, torch.randn(40, 64, device=DEVICE))
    codes = w_q.view(torch.uint8)
    scales = scale.view(torch.uint8)
    name = "mxfp4" if fmt == "mxfp4" else "fp8"
    x = torch.randn(3, 64, device=DEVICE, requires_grad=True)
    bias = torch.randn(40, device=DEVICE, requires_grad=True)
    with tuning.override(**TILES[0]):
        torch.library.opcheck(torch.ops.ds_kernels.quant_linear.default,
                              (x, codes, scales, bias, name))
        torch.library.opcheck(torch.ops.ds_kernels.quant_linear.default,
                              (x, codes, scales, None, name))
        torch.library.opcheck(torch.ops.ds_kernels.quant_linear_backward.default,
                              (torch.randn(3, 40, device=DEVICE), codes, scales, name))


def test_torch_compile_fullgraph_forward_and_backward():
    w_q, scale = quantized("mxfp4", torch.randn(24, 64, device=DEVICE))
    x = torch.randn(5, 64, device=DEVICE, requires_grad=True)

    @torch.compile(fullgraph=True)
    def loss(x):
        return ds_kernels.quant_linear(x, w_q, scale).square().sum()

    loss(x).backward()
    y = reference(x.detach(), w_q, scale)
    assert_close(x.grad, quant_linear_backward(2 * y, w_q, scale), torch.float32, reduction=24)


def _fp8(N=40, K=64):
    return ds_kernels.quantize_fp8_block(torch.randn(N, K))


@pytest.mark.parametrize("args,error,match", [
    ((torch.randn(3, 65), *_fp8()), ValueError, r"x must be \[..., K\] with K = 64"),
    ((torch.randn(3, 64), *ds_kernels.quantize_mxfp4(torch.randn(40, 32))), ValueError,
     r"K = 32 \(the in-features of w_q, shape \(40, 16\), mxfp4\)"),
    ((torch.ones(3, 64, dtype=torch.int32), *_fp8()), TypeError, "x must have dtype"),
    ((torch.randn(3, 64), _fp8()[0][None], _fp8()[1][None]), ValueError, "w_q must be 2-D"),
    ((torch.randn(3, 64), torch.randn(40, 64), torch.ones(1, 1)), TypeError,
     "w_q must be float8_e4m3fn"),
    ((torch.randn(3, 64), _fp8()[0], torch.ones(2, 2)), ValueError,
     r"scale must have shape \[1, 1\]"),
    ((torch.randn(3, 64), _fp8()[0], torch.ones(1, 1, dtype=torch.float16)), TypeError,
     "scale of the fp8 weight w_q must have dtype"),
    ((torch.randn(3, 64), *_fp8(), torch.randn(41)), ValueError, r"bias must have shape \[40\]"),
    ((torch.randn(3, 64), *_fp8(), torch.ones(40, dtype=torch.int64)), TypeError,
     "bias must have dtype"),
    ((torch.randn(3, 64), *_fp8(), torch.randn(40, device="meta")), ValueError,
     "bias is on meta"),
])
def test_bad_arguments_raise_clear_errors(args, error, match):
    with pytest.raises(error, match=match):
        ds_kernels.quant_linear(*args)


@pytest.mark.parametrize("trainable", ["w_q", "scale"])
def test_a_quantised_weight_that_asks_for_a_gradient_is_refused(trainable):
    """The weight is frozen: no gradient reaches it or its scale, so asking for one is an
    error rather than a silent None."""
    g = torch.Generator().manual_seed(4)
    w_q, scale = ds_kernels.quantize_fp8_block(torch.randn(8, 16, generator=g))
    args = dict(w_q=w_q, scale=scale)
    args[trainable] = args[trainable].clone().requires_grad_()
    with pytest.raises(ValueError, match=f"quant_linear: {trainable} requires grad"):
        ds_kernels.quant_linear(torch.randn(2, 16, generator=g), args["w_q"], args["scale"])
    with torch.no_grad():  # inference on such a tensor is fine
        ds_kernels.quant_linear(torch.randn(2, 16, generator=g), args["w_q"], args["scale"])
