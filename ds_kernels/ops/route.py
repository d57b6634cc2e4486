"""ds_kernels.route: DeepSeek expert routing, as ``torch.ops.ds_kernels.route``.

Differentiable in router_logits through the weights (the ids are a discrete choice; the
correction bias only chooses, so it gets no gradient, as in DeepSeek-V3's aux-loss-free
balancing, which updates the bias outside autograd).
"""

import torch

from ds_kernels import dispatch
from ds_kernels.ops.checks import (FLOAT_DTYPES, INDEX_DTYPES, check_ids_in_range, check_int,
                                   check_same_device, check_tensor, device_checks_allowed)
from ds_kernels.reference.route import GROUP_TOP, RENORM_EPS, scores

SCORINGS = ("sigmoid", "softmax", "sqrtsoftplus")
GROUP_SCORINGS = tuple(GROUP_TOP)


def route(router_logits: torch.Tensor, top_k: int, *, scoring: str = "sigmoid",
          correction_bias: torch.Tensor | None = None, n_group: int = 1, topk_group: int = 1,
          renormalize: bool = True, routed_scaling_factor: float = 1.0,
          group_scoring: str = "top2_sum", fixed_ids: torch.Tensor | None = None):
    """DeepSeek gate: (topk_weights float32 [T, k], topk_ids int32 [T, k]).

    router_logits [T, E] (fp16/bf16/fp32; math in fp32). Steps (API.md "Routing"): scores
    s = sigmoid, softmax or sqrt(softplus) (DeepSeek-V4) of the logits; choice scores c = s + correction_bias; with
    n_group > 1, only the topk_group best groups stay eligible, a group scored by the sum of
    its two best c (group_scoring="top2_sum", DeepSeek-V3's noaux_tc) or by its best s ("max",
    DeepSeek-V2's group_limited_greedy; unbiased even when a bias is given); the top_k experts
    by c (descending, ties to the lower index); weights = s at those experts, renormalised to
    sum 1 if ``renormalize``, times routed_scaling_factor.
    fixed_ids int32/int64 [T, top_k] (DeepSeek-V4's hash layers: tid2eid[input_ids]): the
    experts are given - distinct in each row, in [0, E) - and only the weights are computed;
    no correction bias or groups then (they only choose).
    NaN policy: see ds_kernels/reference/route.py. T = 0 gives empty outputs.
    """
    args = (router_logits, top_k, scoring, correction_bias, n_group, topk_group, renormalize,
            float(routed_scaling_factor), group_scoring, fixed_ids)
    if dispatch.direct_call_allowed(router_logits, correction_bias, fixed_ids):
        return _route(*args)  # checks the arguments itself
    _check(*args[:6], group_scoring, fixed_ids)  # before torch.ops: its errors name no argument
    return torch.ops.ds_kernels.route(*args)


def _check(logits, top_k, scoring, correction_bias, n_group, topk_group, group_scoring,
           fixed_ids):
    check_tensor("router_logits", logits, dim=2, dtypes=FLOAT_DTYPES)
    E = logits.shape[1]
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if group_scoring not in GROUP_SCORINGS:
        raise ValueError(f"group_scoring must be one of {GROUP_SCORINGS}, got {group_scoring!r}")
    check_int("n_group", n_group, low=1)
    if E % n_group:
        raise ValueError(f"the number of experts E={E} is not divisible by n_group={n_group}")
    if n_group > 1 and E // n_group < GROUP_TOP[group_scoring]:
        raise ValueError(f"group_scoring={group_scoring!r} needs at least "
                         f"{GROUP_TOP[group_scoring]} experts per group, but E={E} with "
                         f"n_group={n_group} leaves {E // n_group}")
    check_int("topk_group", topk_group, low=1, high=n_group)
    check_int("top_k", top_k, low=1, high=topk_group * (E // n_group))
    if correction_bias is not None:
        check_tensor("correction_bias", correction_bias, dim=1, dtypes=FLOAT_DTYPES)
        if correction_bias.shape[0] != E:
            raise ValueError(f"correction_bias must have shape [{E}] (one per expert), "
                             f"got {tuple(correction_bias.shape)}")
        check_same_device("router_logits", logits, correction_bias=correction_bias)
    if fixed_ids is not None:
        _check_fixed_ids(fixed_ids, logits, top_k, correction_bias, n_group)


def _check_fixed_ids(fixed_ids, logits, top_k, correction_bias, n_group):
    check_tensor("fixed_ids", fixed_ids, dim=2, dtypes=INDEX_DTYPES)
    T, E = logits.shape
    if fixed_ids.shape != (T, top_k):
        raise ValueError(f"fixed_ids must be [T={T}, top_k={top_k}], got "
                         f"{tuple(fixed_ids.shape)}")
    if correction_bias is not None or n_group != 1:
        raise ValueError("with fixed_ids the experts are given: correction_bias and n_group "
                         "(which only choose them) must be left at None and 1")
    check_same_device("router_logits", logits, fixed_ids=fixed_ids)


def _check_fixed_values(fixed_ids, num_experts):
    """In range and distinct in each row (one device sync, skipped under capture)."""
    check_ids_in_range("fixed_ids", fixed_ids, num_experts)
    if fixed_ids.shape[0] and fixed_ids.shape[1] > 1 and device_checks_allowed(fixed_ids):
        repeated = (fixed_ids.sort(dim=-1).values.diff(dim=-1) == 0).any(dim=-1)   # [T]
        if bool(repeated.any()):
            row = int(repeated.nonzero()[0])
            raise ValueError(f"fixed_ids must name distinct experts in each row, got "
                             f"{fixed_ids[row].tolist()} in row {row}")


# group_scoring and fixed_ids last, with defaults, so that the op's earlier positional forms
# stay valid.
def _route(router_logits: torch.Tensor, top_k: int, scoring: str,
           correction_bias: torch.Tensor | None, n_group: int, topk_group: int,
           renormalize: bool, routed_scaling_factor: float, group_scoring: str = "top2_sum",
           fixed_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    _check(router_logits, top_k, scoring, correction_bias, n_group, topk_group, group_scoring,
           fixed_ids)
    if fixed_ids is not None:
        _check_fixed_values(fixed_ids, router_logits.shape[1])
    impl = dispatch.implementation("route", router_logits.device)
    return impl(router_logits, top_k, scoring, correction_bias, n_group, topk_group,
                renormalize, routed_scaling_factor, group_scoring, fixed_ids)


_route_op = torch.library.custom_op("ds_kernels::route", _route, mutates_args=())


@_route_op.register_fake
def _(router_logits, top_k, scoring, correction_bias, n_group, topk_group, renormalize,
      routed_scaling_factor, group_scoring="top2_sum", fixed_ids=None):
    _check(router_logits, top_k, scoring, correction_bias, n_group, topk_group, group_scoring,
           fixed_ids)
    T = router_logits.shape[0]
    return (router_logits.new_empty(T, top_k, dtype=torch.float32),
            router_logits.new_empty(T, top_k, dtype=torch.int32))


def _setup_context(ctx, inputs, output):
    router_logits, _, scoring, _, _, _, renormalize, routed_scaling_factor = inputs[:8]
    ctx.save_for_backward(router_logits, output[1])
    ctx.scoring, ctx.renormalize, ctx.scale = scoring, renormalize, routed_scaling_factor


def _backward(ctx, grad_weights, _grad_ids):
    logits, ids = ctx.saved_tensors
    x = logits.float()                                            # [T, E]
    s = scores(x, ctx.scoring)
    ids = ids.long()                                              # [T, k]
    g = grad_weights.float() * ctx.scale                          # [T, k]
    if ctx.renormalize:
        chosen = s.gather(1, ids)
        total = chosen.sum(dim=-1, keepdim=True) + RENORM_EPS
        g = g / total - (g * chosen).sum(dim=-1, keepdim=True) / total**2
    grad_s = torch.zeros_like(s).scatter_add_(1, ids, g)          # [T, E]
    if ctx.scoring == "sigmoid":
        grad_x = grad_s * s * (1 - s)
    elif ctx.scoring == "softmax":
        grad_x = s * (grad_s - (grad_s * s).sum(dim=-1, keepdim=True))
    else:  # d sqrt(softplus(x)) = sigmoid(x) / (2 s); 0 where softplus underflowed to 0
        grad_x = grad_s * torch.where(s > 0, x.sigmoid() / (2 * s), 0.0)
    return grad_x.to(logits.dtype), None, None, None, None, None, None, None, None, None


_route_op.register_autograd(_backward, setup_context=_setup_context)
