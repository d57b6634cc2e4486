"""mhc_pre / mhc_post (DeepSeek-V4's hyper-connections): every backend against the reference
(ragged sizes, 1 to 4 streams, widths not a multiple of the tiles, tiny and huge mixing logits,
1 to 20 Sinkhorn rounds, strided and expanded views), against transformers'
DeepseekV4HyperConnection and decoder-layer mix, gradients of every input, errors, opcheck,
torch.compile."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ds_kernels
from conftest import DEVICE, backend_fixture
from ds_kernels.reference import mhc as reference
from numerics import SEEDS, VIEWS, as_view, assert_close

backend = backend_fixture()
NORM_EPS, HC_EPS = 1e-6, 1e-6


def hc_params(g, n, D, logit_scale=1.0):
    """fn, base, scale as transformers' hc parameters (fp32); logit_scale sizes the mixing
    logits: tiny ones give a near-uniform comb, huge ones a saturated softmax."""
    m = (2 + n) * n
    fn = torch.randn(m, n * D, generator=g) * 0.5
    base = torch.randn(m, generator=g) * logit_scale
    scale = torch.rand(3, generator=g) * logit_scale
    return fn, base, scale


@st.composite
def pre_problems(draw):
    n = draw(st.sampled_from([1, 2, 4]))
    D = draw(st.sampled_from([1, 8, 40, 130]))
    T = draw(st.sampled_from([0, 1, 2, 17, 33]))
    g = torch.Generator().manual_seed(draw(SEEDS))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    streams = (torch.randn(T, n, D, generator=g) * draw(st.sampled_from([0.01, 1.0, 30.0])))
    fn, base, scale = hc_params(g, n, D, draw(st.sampled_from([1e-3, 1.0, 40.0])))
    views = [draw(VIEWS) for _ in range(4)]
    return ([as_view(t.to(DEVICE), v) for t, v in
             zip((streams.to(dtype), fn, base, scale), views)],
            draw(st.sampled_from([1, 3, 20])))


def _pre(streams, fn, base, scale, iters):
    return ds_kernels.mhc_pre(streams, fn, base, scale, norm_eps=NORM_EPS, hc_eps=HC_EPS,
                              sinkhorn_iters=iters)


@settings(max_examples=30)
@given(problem=pre_problems())
def test_mhc_pre_matches_reference(backend, problem):
    (streams, fn, base, scale), iters = problem
    collapsed, post, comb = _pre(streams, fn, base, scale, iters)
    want = reference.mhc_pre(streams, fn, base, scale, NORM_EPS, HC_EPS, iters)
    T, n, D = streams.shape
    assert collapsed.dtype == streams.dtype and post.dtype == comb.dtype == torch.float32
    # pre, post and comb come from an n D reduction; the collapse adds n terms of the streams'
    # size.
    assert_close(post, want[1], torch.float32, reduction=n * D, what="post")
    assert_close(comb, want[2], torch.float32, reduction=n * D * iters, what="comb")
    size = streams.double().abs().amax(dim=1).clamp_min(1)                   # [T, D]
    assert_close(collapsed, want[0], streams.dtype, reduction=n * D, what="collapsed",
                 scale=size)


def test_comb_is_nearly_doubly_stochastic(backend):
    """Moderate logits, 20 rounds: rows and columns sum to 1 within 1e-3. (With a saturated
    softmax a column can hold only hc_eps-sized entries, and x / (sum + hc_eps) leaves it at
    2/3: the reference does the same, the property test checks that.)"""
    g = torch.Generator().manual_seed(2)
    streams = torch.randn(33, 4, 40, generator=g).to(DEVICE)
    fn, base, scale = (t.to(DEVICE) for t in hc_params(g, 4, 40))
    _, _, comb = _pre(streams, fn * 0.05, base, scale, 20)  # logits of order 1
    ones = torch.ones(33, 4, device=DEVICE)
    torch.testing.assert_close(comb.sum(dim=1), ones, atol=1e-3, rtol=0)
    torch.testing.assert_close(comb.sum(dim=2), ones, atol=1e-3, rtol=0)


@st.composite
def post_problems(draw):
    n = draw(st.sampled_from([1, 2, 4]))
    D = draw(st.sampled_from([1, 8, 130]))
    T = draw(st.sampled_from([0, 1, 17, 33]))
    g = torch.Generator().manual_seed(draw(SEEDS))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    tensors = (torch.randn(T, n, D, generator=g).to(dtype), torch.randn(T, D, generator=g).to(dtype),
               2 * torch.rand(T, n, generator=g), torch.rand(T, n, n, generator=g))
    return [as_view(t.to(DEVICE), draw(VIEWS)) for t in tensors]


@settings(max_examples=30)
@given(problem=post_problems())
def test_mhc_post_matches_reference(backend, problem):
    streams, out, post, comb = problem
    mixed = ds_kernels.mhc_post(streams, out, post, comb)
    assert mixed.dtype == streams.dtype and mixed.shape == streams.shape
    assert_close(mixed, reference.mhc_post(streams, out, post, comb), streams.dtype,
                 reduction=streams.shape[1] + 1, what="mixed", scale=2.0)


def test_against_transformers_hyper_connection_and_layer_mix(backend):
    """transformers' DeepseekV4HyperConnection (fp32, as the layer holds it) gives the same
    (post, comb, collapsed); the decoder layer's mix post * out + comb^T @ streams equals
    mhc_post."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection

    config = transformers.DeepseekV4Config(hidden_size=48, hc_mult=4, num_hidden_layers=1)
    hc = DeepseekV4HyperConnection(config).to(DEVICE)
    g = torch.Generator().manual_seed(3)
    fn, base, scale = hc_params(g, 4, 48)
    with torch.no_grad():
        hc.fn.copy_(fn), hc.base.copy_(base), hc.scale.copy_(scale)
    streams = torch.randn(2, 7, 4, 48, generator=g).to(DEVICE)              # [B, S, n, D]
    post_hf, comb_hf, collapsed_hf = hc(streams)
    collapsed, post, comb = ds_kernels.mhc_pre(
        streams.flatten(0, 1), hc.fn, hc.base, hc.scale, norm_eps=config.rms_norm_eps,
        hc_eps=config.hc_eps, sinkhorn_iters=config.hc_sinkhorn_iters)
    assert_close(collapsed, collapsed_hf.flatten(0, 1), torch.float32, reduction=192)
    assert_close(post, post_hf.flatten(0, 1), torch.float32, reduction=192)
    assert_close(comb, comb_hf.flatten(0, 1), torch.float32, reduction=192 * 20)
    out = torch.randn(2, 7, 48, generator=g).to(DEVICE)
    mixed_hf = post_hf.unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(
        comb_hf.transpose(-1, -2), streams)
    mixed = ds_kernels.mhc_post(streams.flatten(0, 1), out.flatten(0, 1), post, comb)
    assert_close(mixed, mixed_hf.flatten(0, 1), torch.float32, reduction=8)


def test_gradients_match_the_reference(backend):
    """Every input's gradient, through both ops chained as a block uses them (collapse, a
    block in between, mix), against autograd through the float64 reference."""
    g = torch.Generator().manual_seed(4)
    T, n, D = 9, 4, 24
    streams = torch.randn(T, n, D, generator=g).to(DEVICE)
    fn, base, scale = (t.to(DEVICE) for t in hc_params(g, n, D))
    block = torch.randn(D, D, generator=g).to(DEVICE) / D**0.5
    upstream = torch.randn(T, n, D, generator=g).to(DEVICE)

    def loss(pre, post_op, tensors):
        s, f, b, c = tensors
        collapsed, post, comb = pre(s, f, b, c)
        return (post_op(s, torch.tanh(collapsed @ block), post, comb) * upstream).sum()

    ours = [t.clone().requires_grad_() for t in (streams, fn, base, scale)]
    loss(lambda *t: _pre(*t, 20), ds_kernels.mhc_post, ours).backward()
    exact = [t.double().requires_grad_() for t in (streams, fn, base, scale)]
    block, upstream = block.double(), upstream.double()
    loss(lambda *t: reference.mhc_pre(*t, NORM_EPS, HC_EPS, 20), reference.mhc_post,
         exact).backward()
    for got, want, name in zip(ours, exact, ["d streams", "d fn", "d base", "d scale"]):
        assert_close(got.grad, want.grad, torch.float32, reduction=n * D * 20, what=name,
                     scale=want.grad.abs().amax().clamp_min(1))


def test_unused_outputs_get_no_gradient_but_the_rest_do():
    """post and comb unused (autograd hands the backward None for them)."""
    g = torch.Generator().manual_seed(5)
    streams = torch.randn(3, 2, 8, generator=g).requires_grad_()
    fn, base, scale = hc_params(g, 2, 8)
    collapsed, _, _ = _pre(streams, fn, base, scale, 20)
    collapsed.sum().backward()
    exact = streams.detach().double().requires_grad_()
    reference.mhc_pre(exact, fn, base, scale, NORM_EPS, HC_EPS, 20)[0].sum().backward()
    assert_close(streams.grad, exact.grad, torch.float32, reduction=16)


def test_opcheck():
    g = torch.Generator().manual_seed(6)
    streams = torch.randn(5, 4, 16, generator=g).requires_grad_()
    fn, base, scale = (t.requires_grad_() for t in hc_params(g, 4, 16))
    torch.library.opcheck(torch.ops.ds_kernels.mhc_pre.default,
                          (streams, fn, base, scale, NORM_EPS, HC_EPS, 3))
    out = torch.randn(5, 16, generator=g).requires_grad_()
    post = torch.rand(5, 4, generator=g).requires_grad_()
    comb = torch.rand(5, 4, 4, generator=g).transpose(1, 2).requires_grad_()  # a strided view
    torch.library.opcheck(torch.ops.ds_kernels.mhc_post.default, (streams, out, post, comb))


def test_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(7)
    streams = torch.randn(6, 4, 16, generator=g)
    fn, base, scale = hc_params(g, 4, 16)

    @torch.compile(fullgraph=True)
    def layer(streams):
        collapsed, post, comb = _pre(streams, fn, base, scale, 20)
        return ds_kernels.mhc_post(streams, collapsed * 2, post, comb)

    collapsed, post, comb = _pre(streams, fn, base, scale, 20)
    assert_close(layer(streams), ds_kernels.mhc_post(streams, collapsed * 2, post, comb),
                 torch.float32)


@pytest.mark.parametrize("change,error,match", [
    (dict(streams=torch.zeros(3, 8)), ValueError, "streams must be 3-D"),
    (dict(streams=torch.zeros(3, 4, 8, dtype=torch.int32)), TypeError, "streams must have dtype"),
    (dict(fn=torch.zeros(24, 31)), ValueError, r"fn must be \[24, 32\] for n=4 streams of D=8"),
    (dict(base=torch.zeros(23)), ValueError, r"base must be \[24\]"),
    (dict(scale=torch.zeros(2)), ValueError, r"scale must be \[3\]"),
    (dict(norm_eps=-1.0), ValueError, "eps must be finite and >= 0"),
    (dict(hc_eps=float("nan")), ValueError, "hc_eps must be finite"),
    (dict(sinkhorn_iters=0), ValueError, "sinkhorn_iters must be >= 1"),
    (dict(sinkhorn_iters=2.0), TypeError, "sinkhorn_iters must be an int"),
])
def test_mhc_pre_bad_arguments(change, error, match):
    args = dict(streams=torch.zeros(3, 4, 8), fn=torch.zeros(24, 32), base=torch.zeros(24),
                scale=torch.zeros(3), norm_eps=1e-6, hc_eps=1e-6, sinkhorn_iters=20)
    args.update(change)
    with pytest.raises(error, match=match):
        ds_kernels.mhc_pre(args.pop("streams"), args.pop("fn"), args.pop("base"),
                           args.pop("scale"), **args)


@pytest.mark.parametrize("change,error,match", [
    (dict(out=torch.zeros(3, 7)), ValueError, r"out must be \[T=3, D=8\]"),
    (dict(out=torch.zeros(3, 8, dtype=torch.float16)), TypeError, "out has dtype"),
    (dict(post=torch.zeros(3, 3)), ValueError, r"post must be \[3, 4\]"),
    (dict(comb=torch.zeros(3, 4, 3)), ValueError, r"comb must be \[3, 4, 4\]"),
])
def test_mhc_post_bad_arguments(change, error, match):
    args = dict(streams=torch.zeros(3, 4, 8), out=torch.zeros(3, 8), post=torch.zeros(3, 4),
                comb=torch.zeros(3, 4, 4))
    args.update(change)
    with pytest.raises(error, match=match):
        ds_kernels.mhc_post(**args)
