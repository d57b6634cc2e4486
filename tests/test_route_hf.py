"""route against transformers' routers: DeepseekV3TopkRouter (noaux_tc) and
DeepseekV2TopkRouter (group_limited_greedy, greedy): same chosen experts, same weights."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ds_kernels
from conftest import DEVICE
from numerics import SEEDS, assert_close

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter  # noqa: E402


def _hf_router(E, k, n_group, topk_group, hidden, norm, scale, seed):
    config = transformers.DeepseekV3Config(
        n_routed_experts=E, num_experts_per_tok=k, n_group=n_group, topk_group=topk_group,
        hidden_size=hidden, norm_topk_prob=norm, routed_scaling_factor=scale)
    router = DeepseekV3TopkRouter(config).to(DEVICE)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, hidden, generator=g) / hidden**0.5)
        router.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.05)
    return router


def _hf_v2_router(E, k, n_group, topk_group, hidden, scale, method, seed):
    config = transformers.DeepseekV2Config(
        n_routed_experts=E, num_experts_per_tok=k, n_group=n_group, topk_group=topk_group,
        hidden_size=hidden, routed_scaling_factor=scale, topk_method=method)
    router = DeepseekV2TopkRouter(config).to(DEVICE)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        router.weight.copy_(torch.randn(E, hidden, generator=g) / hidden**0.5)
    return router


def _compare(router, hidden_states, k, **route_kwargs):
    logits, hf_weights, hf_ids = router(hidden_states)
    weights, ids = ds_kernels.route(logits, k, **route_kwargs)
    # transformers returns its top-k unsorted: compare as sets, weights in id order.
    hf_order, order = hf_ids.argsort(-1), ids.long().argsort(-1)
    assert torch.equal(hf_ids.gather(1, hf_order).int(), ids.gather(1, order))
    assert_close(weights.gather(1, order), hf_weights.gather(1, hf_order), torch.float32,
                 reduction=k, what="weights")


def _compare_v3(router, hidden_states, k, n_group, topk_group, norm, scale):
    _compare(router, hidden_states, k, correction_bias=router.e_score_correction_bias,
             n_group=n_group, topk_group=topk_group, renormalize=norm,
             routed_scaling_factor=scale)


def test_deepseek_v3_router_shape(backend):
    router = _hf_router(256, 8, 8, 4, hidden=64, norm=True, scale=2.5, seed=0)
    x = torch.randn(96, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        _compare_v3(router, x, 8, 8, 4, True, 2.5)


@settings(max_examples=25)
@given(n_group=st.sampled_from([1, 2, 4, 8]), group_size=st.integers(2, 16),
       T=st.sampled_from([1, 5, 33]), norm=st.booleans(), seed=SEEDS,
       data=st.data())
def test_random_routers(backend, n_group, group_size, T, norm, seed, data):
    E = n_group * group_size
    topk_group = data.draw(st.integers(1, n_group))
    k = data.draw(st.integers(1, min(16, topk_group * group_size)))
    router = _hf_router(E, k, n_group, topk_group, hidden=32, norm=norm, scale=1.5, seed=seed)
    x = torch.randn(T, 32, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
    with torch.no_grad():
        _compare_v3(router, x, k, n_group, topk_group, norm, 1.5)


def test_deepseek_v2_router_shape(backend):
    # DeepSeek-V2: 160 experts in 8 groups, 3 groups kept, k = 6, weights scaled by 16.
    router = _hf_v2_router(160, 6, 8, 3, hidden=64, scale=16.0, method="group_limited_greedy",
                           seed=2)
    x = torch.randn(96, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        _compare(router, x, 6, scoring="softmax", n_group=8, topk_group=3, renormalize=False,
                 routed_scaling_factor=16.0, group_scoring="max")


@settings(max_examples=25)
@given(n_group=st.sampled_from([1, 2, 4, 8]), group_size=st.integers(1, 16),
       T=st.sampled_from([1, 5, 33]), method=st.sampled_from(["group_limited_greedy", "greedy"]),
       seed=SEEDS, data=st.data())
def test_random_v2_routers(backend, n_group, group_size, T, method, seed, data):
    E = n_group * group_size
    topk_group = data.draw(st.integers(1, n_group))
    k = data.draw(st.integers(1, min(16, topk_group * group_size)))
    router = _hf_v2_router(E, k, n_group, topk_group, hidden=32, scale=1.5, method=method,
                           seed=seed)
    x = torch.randn(T, 32, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
    if method == "greedy":  # plain top-k: transformers ignores the groups
        n_group, topk_group = 1, 1
    with torch.no_grad():
        _compare(router, x, k, scoring="softmax", n_group=n_group, topk_group=topk_group,
                 renormalize=False, routed_scaling_factor=1.5, group_scoring="max")
