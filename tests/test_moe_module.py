"""ds_kernels.MoE against transformers' DeepseekV3MoE: same state_dict keys, same outputs and
gradients."""

import pytest
import torch

import ds_kernels
from conftest import DEVICE
from ds_kernels import tuning
from numerics import assert_close

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402


def _config(**overrides):
    fields = dict(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16,
                  num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2,
                  norm_topk_prob=True, routed_scaling_factor=2.5)
    fields.update(overrides)
    return transformers.DeepseekV3Config(**fields)


def _hf_moe(config, seed):
    torch.manual_seed(seed)
    moe = DeepseekV3MoE(config)
    with torch.no_grad():  # transformers leaves these uninitialised until a model inits them
        for p in moe.parameters():
            p.normal_(0, 0.2)
        moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return moe.to(DEVICE)


@pytest.mark.parametrize("overrides", [{}, dict(n_group=1, topk_group=1, n_shared_experts=2),
                                       dict(norm_topk_prob=False, routed_scaling_factor=1.0)])
def test_state_dict_loads_strictly_and_outputs_match(backend, overrides):
    config = _config(**overrides)
    hf = _hf_moe(config, seed=0)
    ours = ds_kernels.MoE.from_hf_config(config).to(DEVICE)
    assert set(ours.state_dict()) == set(hf.state_dict())
    ours.load_state_dict(hf.state_dict(), strict=True)

    x = torch.randn(2, 7, 32, device=DEVICE)
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_hf = hf(x_hf)
    with tuning.override(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32):
        out = ours(x_ours)
        assert_close(out, out_hf, torch.float32, reduction=64, what="out")
        grad = torch.randn_like(out)
        out_hf.backward(grad)
        out.backward(grad)
    assert_close(x_ours.grad, x_hf.grad, torch.float32, reduction=64, what="d x")
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad, hf_params[name].grad, torch.float32, reduction=64, what=f"d {name}")


def test_hidden_act_other_than_silu_is_rejected():
    with pytest.raises(ValueError, match="only 'silu'"):
        ds_kernels.MoE.from_hf_config(_config(hidden_act="gelu"))
