"""Reference DeepSeek routing: the numbered steps of API.md, one per block. With fixed_ids
(DeepSeek-V4's hash layers, tid2eid[input_ids]) the experts are given and only step 5 runs.

Group scoring (step 3): "top2_sum" (DeepSeek-V3's noaux_tc) scores a group by the sum of its two
best choice scores c; "max" (DeepSeek-V2's group_limited_greedy) by its best score s. V2 has no
correction bias; given one, "max" still scores groups by the unbiased s (as API.md defines it)
while the experts inside the kept groups are chosen by the biased c, as in every other case.

NaN policy (shared by every backend): a NaN choice score ranks below every real score, so a
token picks a NaN expert only when its kept groups hold fewer than k real scores; ids are
always distinct and in [0, E). A NaN group score ranks the same way. The weights are the raw
scores at the chosen ids, so a NaN that was chosen (or a NaN anywhere in a softmax row) shows
up as NaN weights instead of being hidden.
"""

import torch

# Stand-in for NaN choice scores: below every real score, above the -inf of dropped groups.
NAN_CHOICE_SCORE = -torch.finfo(torch.float32).max
# Added to the renormalising sum, as transformers' DeepseekV3TopkRouter does, so that a row
# whose chosen scores are all 0 gives 0 weights instead of 0/0.
RENORM_EPS = 1e-20
# group_scoring -> how many of a group's best values add up to its score.
GROUP_TOP = {"top2_sum": 2, "max": 1}


def nan_last(x: torch.Tensor) -> torch.Tensor:
    """x with NaN replaced by NAN_CHOICE_SCORE (infinities kept), so NaN ranks last."""
    return torch.nan_to_num(x, nan=NAN_CHOICE_SCORE, posinf=float("inf"), neginf=float("-inf"))


def scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """Step 1: s in fp32. "sqrtsoftplus" is DeepSeek-V4's sqrt(softplus(x)) (transformers'
    ACT2FN["sqrtsoftplus"]: torch's softplus, x itself above 20)."""
    x = logits.float()                                            # [T, E]
    if scoring == "sigmoid":
        return x.sigmoid()
    if scoring == "softmax":
        return x.softmax(dim=-1)
    return torch.nn.functional.softplus(x).sqrt()


def choice_scores(logits: torch.Tensor, scoring: str, correction_bias: torch.Tensor | None):
    """Steps 1-2: (s, c) in fp32, where s weighs the experts and c chooses them."""
    s = scores(logits, scoring)                                   # [T, E]
    c = s if correction_bias is None else s + correction_bias.float()
    return s, nan_last(c)


def group_basis(s: torch.Tensor, c: torch.Tensor, group_scoring: str) -> torch.Tensor:
    """The per-expert values that groups are scored by: c for "top2_sum", s for "max"."""
    return c if group_scoring == "top2_sum" else nan_last(s)


def top_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values of each row, in descending order; ties to the lower index."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[:, :k]


def weigh(s, ids, renormalize, routed_scaling_factor):
    """Step 5: the weights of the chosen ids [T, k]: s there, renormalised, scaled."""
    weights = s.gather(1, ids.long())                             # [T, k]
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + RENORM_EPS)
    return weights * routed_scaling_factor


def route(logits, top_k, scoring, correction_bias, n_group, topk_group, renormalize,
          routed_scaling_factor, group_scoring, fixed_ids=None):
    T, E = logits.shape
    if fixed_ids is not None:  # DeepSeek-V4's hash layers: the experts are given
        return (weigh(scores(logits, scoring), fixed_ids, renormalize, routed_scaling_factor),
                fixed_ids.to(torch.int32))
    s, c = choice_scores(logits, scoring, correction_bias)        # [T, E] each

    if n_group > 1:
        group_size = E // n_group
        basis = group_basis(s, c, group_scoring).view(T, n_group, group_size)
        best = torch.sort(basis, dim=-1, descending=True).values[..., :GROUP_TOP[group_scoring]]
        group_scores = best.sum(dim=-1)                           # [T, n_group]
        kept_groups = top_indices(group_scores, topk_group)       # [T, topk_group]
        kept = torch.zeros(T, n_group, dtype=torch.bool, device=c.device)
        kept.scatter_(1, kept_groups, True)
        kept_experts = kept.repeat_interleave(group_size, dim=1)  # [T, E]
        c = c.masked_fill(~kept_experts, float("-inf"))

    ids = top_indices(c, top_k)                                   # [T, k]
    return weigh(s, ids, renormalize, routed_scaling_factor), ids.to(torch.int32)
