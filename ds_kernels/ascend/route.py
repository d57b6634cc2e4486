"""Routing on torch_npu's fused operator ``npu_moe_gating_top_k`` (Ascend C).

What the operator computes, from its documentation: Ascend/op-plugin,
docs/zh/custom_APIs/torch_npu/torch_npu-npu_moe_gating_top_k.md (formulas, constraints and an
"equivalent computation" numpy model); CANN's aclnnMoeGatingTopK page (hicann/ops-transformer,
moe/moe_gating_top_k/docs/aclnnMoeGatingTopK_en.md) says the same.
  normOut = softmax(x) (norm_type=0) or sigmoid(x) (norm_type=1); normValue = normOut + bias
  group score = max (group_select_mode=0) or sum of the two largest (=1) normValue of a group;
    the k_group best groups stay, the others' normValue becomes -inf
    (so mode 0 is our group_scoring="max" only without a bias: ours scores groups unbiased)
  expert_idx = the k largest normValue, descending (int32)
  y = normOut at expert_idx (unbiased); with norm_type=1 divided by (its sum + eps); times
    routed_scaling_factor. y has x's dtype; normOut (float32) comes out only with out_flag.
The English page (docs/en/...) says the same, except that its parameter list swaps norm_type's
values (1: Softmax), against its own formulas and numpy model; we follow those.
renorm=0 ("norm before top-k") is its only documented value; with it, softmax weights are
never renormalised (the numpy model, and aclnn's "normType=0: renorm decides").
Ties: the docs give no tie rule except through the numpy model, whose stable argsorts send
ties to the lower index (our contract); the kernel's own tie order is undocumented.
Older torch_npu releases documented narrower limits (E = 256, k_group = 4, group_count = 8, bias
required, sigmoid only, k <= 32); this file follows the current page.
NaN logits: the operator's handling is undocumented. The reference's NaN policy is not enforced
here, because finding NaN rows would cost a host sync on every call (and break graph capture).
"""

import logging

from ds_kernels.cpu.route import route as torch_route
from ds_kernels.reference.route import RENORM_EPS

log = logging.getLogger("ds_kernels")
_warned: set[str] = set()

# Documented limits: at most 2048 experts, and more than 2 per group, whose count rounded up to
# a multiple of 32, times the number of groups, is at most 2048 too.
MAX_EXPERTS = 2048
MIN_GROUP_SIZE = 3
GROUP_ALIGN = 32

NORM_TYPE = {"softmax": 0, "sigmoid": 1}
GROUP_SELECT_MODE = {"max": 0, "top2_sum": 1}
RENORM_BEFORE_TOPK = 0  # the only documented renorm value


def _supported(num_tokens: int, num_experts: int, scoring: str, n_group: int,
               renormalize: bool, group_scoring: str, has_bias: bool,
               fixed: bool = False) -> str | None:
    """None if the operator computes this call, else why the torch path must."""
    group_size = num_experts // n_group
    aligned = -(-group_size // GROUP_ALIGN) * GROUP_ALIGN * n_group
    if scoring not in NORM_TYPE:
        return f"the operator's norm types are softmax and sigmoid, not {scoring}"
    if fixed:
        return "fixed_ids (hash routing) is not mapped onto the operator yet"
    if num_tokens == 0:
        return "T = 0 is outside the operator's documented inputs"
    if num_experts > MAX_EXPERTS:
        return f"the operator takes at most {MAX_EXPERTS} experts, got {num_experts}"
    if group_size < MIN_GROUP_SIZE:
        return f"the operator needs at least {MIN_GROUP_SIZE} experts per group, got {group_size}"
    if aligned > MAX_EXPERTS:
        return (f"the operator needs n_group * (experts per group rounded up to {GROUP_ALIGN}) "
                f"<= {MAX_EXPERTS}, got {aligned}")
    if scoring == "sigmoid" and not renormalize:
        return "with sigmoid scores the operator always renormalises the weights"
    if group_scoring == "max" and has_bias and n_group > 1:
        return ("with a correction bias the operator's group maximum is of the biased scores, "
                "group_scoring='max' takes the unbiased ones")
    return None


def _renormalise_after(scoring: str, renormalize: bool) -> bool:
    """Whether route renormalises the operator's weights itself (it never does for softmax)."""
    return scoring == "softmax" and renormalize


def gating_args(top_k, scoring, correction_bias, n_group, topk_group, renormalize,
                routed_scaling_factor, group_scoring) -> dict:
    """Keyword arguments of ``npu_moe_gating_top_k(x, **...)``, x in fp32, for a call that
    ``_supported`` accepts."""
    after = _renormalise_after(scoring, renormalize)
    return dict(
        k=top_k,
        # The operator wants bias in x's dtype, and x goes in as fp32.
        bias=None if correction_bias is None else correction_bias.float(),
        k_group=topk_group,
        group_count=n_group,
        group_select_mode=GROUP_SELECT_MODE[group_scoring],
        renorm=RENORM_BEFORE_TOPK,
        norm_type=NORM_TYPE[scoring],
        out_flag=False,  # normOut [T, E] would be written for nothing
        # Renormalising after the operator must come before the scaling: scale 1 there.
        routed_scaling_factor=1.0 if after else float(routed_scaling_factor),
        eps=RENORM_EPS,
    )


def route(logits, top_k, scoring, correction_bias, n_group, topk_group, renormalize,
          routed_scaling_factor, group_scoring, fixed_ids=None):
    T, E = logits.shape
    reason = _supported(T, E, scoring, n_group, renormalize, group_scoring,
                        correction_bias is not None, fixed_ids is not None)
    if reason is not None:
        if reason not in _warned:
            _warned.add(reason)
            log.warning("ds_kernels.route: npu_moe_gating_top_k cannot run this call (%s); "
                        "using the torch path", reason)
        return torch_route(logits, top_k, scoring, correction_bias, n_group, topk_group,
                           renormalize, routed_scaling_factor, group_scoring, fixed_ids)

    import torch_npu  # here, not at the top: importing ds_kernels must not need CANN

    # fp32 in: our contract scores in fp32, and the operator returns y in x's dtype.
    weights, ids, _ = torch_npu.npu_moe_gating_top_k(
        logits.float(), **gating_args(top_k, scoring, correction_bias, n_group, topk_group,
                                      renormalize, routed_scaling_factor,
                                      group_scoring))  # [T, k] fp32, int32
    if _renormalise_after(scoring, renormalize):
        total = weights.sum(dim=-1, keepdim=True) + RENORM_EPS   # [T, 1]
        weights = weights / total * routed_scaling_factor        # [T, k]
    return weights, ids
