"""ds_kernels.MoE against transformers' DeepseekV3MoE (and DeepseekV2Moe): same state_dict keys,
same outputs and gradients; from_hf_config follows the checkpoint's topk_method."""

import pytest
import torch

import ds_kernels
from conftest import DEVICE
from ds_kernels import tuning
from numerics import assert_close

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402

MOE_FIELDS = dict(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16,
                  num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2)


def _config(**overrides):
    fields = dict(MOE_FIELDS, norm_topk_prob=True, routed_scaling_factor=2.5)
    fields.update(overrides)
    return transformers.DeepseekV3Config(**fields)


def _v2_config(**overrides):
    # transformers' V2 router never renormalises and its config defaults norm_topk_prob=False.
    fields = dict(MOE_FIELDS, routed_scaling_factor=2.0, topk_method="group_limited_greedy")
    fields.update(overrides)
    return transformers.DeepseekV2Config(**fields)


def _randomised(moe, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # transformers leaves these uninitialised until a model inits them
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for b in moe.buffers():  # V3's e_score_correction_bias
            b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    return moe.to(DEVICE)


def _check_outputs_and_gradients(hf, ours):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 32, generator=g).to(DEVICE)
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_hf = hf(x_hf)
    with tuning.override(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32):
        out = ours(x_ours)
        assert_close(out, out_hf, torch.float32, reduction=64, what="out")
        grad = torch.randn(out.shape, generator=g).to(DEVICE)
        out_hf.backward(grad)
        out.backward(grad)
    assert_close(x_ours.grad, x_hf.grad, torch.float32, reduction=64, what="d x")
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad, hf_params[name].grad, torch.float32, reduction=64, what=f"d {name}")


@pytest.mark.parametrize("overrides", [{}, dict(n_group=1, topk_group=1, n_shared_experts=2),
                                       dict(norm_topk_prob=False, routed_scaling_factor=1.0)])
def test_state_dict_loads_strictly_and_outputs_match(backend, overrides):
    config = _config(**overrides)
    hf = _randomised(DeepseekV3MoE(config), seed=0)
    ours = ds_kernels.MoE.from_hf_config(config).to(DEVICE)
    assert set(ours.state_dict()) == set(hf.state_dict())
    ours.load_state_dict(hf.state_dict(), strict=True)
    _check_outputs_and_gradients(hf, ours)


@pytest.mark.parametrize("overrides", [dict(topk_method="group_limited_greedy"),
                                       dict(topk_method="greedy", n_group=None, topk_group=None)])
def test_deepseek_v2_moe_outputs_match(backend, overrides):
    """V2 routing (softmax; groups by their best expert, or plain top-k), through a
    DeepseekV2Config as transformers has it: no scoring_func, n_group None when greedy."""
    config = _v2_config(**overrides)
    hf = _randomised(DeepseekV2Moe(config), seed=2)
    ours = ds_kernels.MoE.from_hf_config(config).to(DEVICE)
    # V2 has no correction bias, and ours holds none: the state_dicts match key for key.
    assert ours.gate.e_score_correction_bias is None
    ours.load_state_dict(hf.state_dict())
    _check_outputs_and_gradients(hf, ours)


@pytest.mark.parametrize("topk_method, scoring, group_scoring, n_group", [
    (None, "sigmoid", "top2_sum", 4),  # DeepseekV3Config has no topk_method: noaux_tc
    ("noaux_tc", "sigmoid", "top2_sum", 4),
    ("group_limited_greedy", "softmax", "max", 4),
    ("greedy", "softmax", "max", 1),
])
def test_from_hf_config_follows_topk_method(topk_method, scoring, group_scoring, n_group):
    extra = {} if topk_method is None else dict(topk_method=topk_method)
    gate = ds_kernels.MoE.from_hf_config(_config(**extra)).gate
    assert (gate.scoring, gate.group_scoring, gate.n_group) == (scoring, group_scoring, n_group)
    assert gate.topk_group == (1 if n_group == 1 else 2)


def test_from_hf_config_takes_an_explicit_scoring_func():
    gate = ds_kernels.MoE.from_hf_config(_config(topk_method="group_limited_greedy",
                                                 scoring_func="sigmoid")).gate
    assert (gate.scoring, gate.group_scoring) == ("sigmoid", "max")


def test_unknown_topk_method_is_rejected():
    with pytest.raises(ValueError, match="topk_method='gready' is not supported"):
        ds_kernels.MoE.from_hf_config(_config(topk_method="gready"))


def test_router_passes_group_scoring(backend):
    gate = ds_kernels.MoE(32, 16, 16, 4, n_group=4, topk_group=1, group_scoring="max").gate
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(16, 32, generator=g))
    gate.to(DEVICE)
    x = torch.randn(64, 32, generator=g).to(DEVICE)
    with torch.no_grad():
        weights, ids = gate(x)
        logits = torch.nn.functional.linear(x, gate.weight)       # as the router computes them
    kw = dict(n_group=4, topk_group=1, correction_bias=gate.e_score_correction_bias)
    ref_weights, ref_ids = ds_kernels.route(logits, 4, group_scoring="max", **kw)
    assert torch.equal(ids, ref_ids)
    assert_close(weights, ref_weights, torch.float32)
    assert not torch.equal(ids, ds_kernels.route(logits, 4, **kw)[1])  # the scoring mattered


def test_hidden_act_other_than_silu_is_rejected():
    with pytest.raises(ValueError, match="only 'silu'"):
        ds_kernels.MoE.from_hf_config(_config(hidden_act="gelu"))
