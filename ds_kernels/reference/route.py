"""Reference DeepSeek routing: the numbered steps of API.md, one per block.

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


def choice_scores(logits: torch.Tensor, scoring: str, correction_bias: torch.Tensor | None):
    """Steps 1-2: (s, c) in fp32, where s weighs the experts and c chooses them."""
    x = logits.float()                                            # [T, E]
    s = x.sigmoid() if scoring == "sigmoid" else x.softmax(dim=-1)
    c = s if correction_bias is None else s + correction_bias.float()
    return s, nan_last(c)


def group_basis(s: torch.Tensor, c: torch.Tensor, group_scoring: str) -> torch.Tensor:
    """The per-expert values that groups are scored by: c for "top2_sum", s for "max"."""
    return c if group_scoring == "top2_sum" else nan_last(s)


def top_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values of each row, in descending order; ties to the lower index."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[:, :k]


def route(logits, top_k, scoring, correction_bias, n_group, topk_group, renormalize,
          routed_scaling_factor, group_scoring):
    T, E = logits.shape
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
    weights = s.gather(1, ids)                                    # [T, k]
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + RENORM_EPS)
    weights = weights * routed_scaling_factor
    return weights, ids.to(torch.int32)
