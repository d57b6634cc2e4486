"""Vectorised routing with the reference's exact semantics, ties included.

Speed comes from never sorting a whole row: torch.topk (k+1 values, to see whether the k-th
place is tied), then a sort of the k winners alone. torch.topk does not promise which of two
equal values wins, so rows tied across the k-th place are redone with the reference's stable
sort. Experts of dropped groups are not masked but left out: top-k runs on the kept groups'
columns only (half of DeepSeek-V3's row).
"""

import torch

from ds_kernels import tuning
from ds_kernels.reference import route as reference
from ds_kernels.reference.route import RENORM_EPS, choice_scores, top_indices

# Strategies: "sort" is the reference's few whole-row sorts, which win at small T (per-op
# overhead dominates a decode step); "topk" is the code below. The crossover was measured on a
# 2-core x86 CPU with E=256 (bench/bench_route.py); `python -m autotune sweep --op route`
# stores the best strategy per token bucket for the user's machine.
SORT_BELOW_TOKENS = 64


def _top_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """Same result as reference ``top_indices`` (descending; ties to the lower index)."""
    if k == values.shape[-1]:
        return top_indices(values, k)
    candidates, positions = values.topk(k + 1, dim=-1)           # [T, k+1]
    ids = positions[:, :k].sort(dim=-1).values                    # [T, k] ascending index
    order = values.gather(1, ids).sort(dim=-1, descending=True, stable=True).indices
    ids = ids.gather(1, order)
    tied = candidates[:, k - 1] == candidates[:, k]
    if tied.any():
        rows = tied.nonzero().flatten()
        ids[rows] = top_indices(values[rows], k)
    return ids


def _two_best_sum(grouped: torch.Tensor) -> torch.Tensor:
    """Sum of the two largest values along the last dim (a repeated maximum counts twice)."""
    best, where = grouped.max(dim=-1, keepdim=True)
    second = grouped.scatter(-1, where, float("-inf")).amax(dim=-1, keepdim=True)
    return (best + second).squeeze(-1)


def route(logits, top_k, scoring, correction_bias, n_group, topk_group, renormalize,
          routed_scaling_factor):
    T, E = logits.shape
    default = "sort" if T < SORT_BELOW_TOKENS else "topk"
    key = tuning.shape_key("route", E=E)
    if tuning.config("route", "torch", key, T, logits.dtype, logits.device,
                     dict(strategy=default))["strategy"] == "sort":
        return reference.route(logits, top_k, scoring, correction_bias, n_group, topk_group,
                               renormalize, routed_scaling_factor)
    s, c = choice_scores(logits, scoring, correction_bias)        # [T, E] each

    if n_group > 1:
        group_size = E // n_group
        grouped = c.view(T, n_group, group_size)
        kept = _top_indices(_two_best_sum(grouped), topk_group)   # [T, topk_group]
        kept = kept.sort(dim=-1).values  # ascending, so column order is expert order
        columns = grouped.gather(1, kept.unsqueeze(-1).expand(-1, -1, group_size))
        j = _top_indices(columns.view(T, topk_group * group_size), top_k)  # [T, k]
        ids = kept.gather(1, j // group_size) * group_size + j % group_size
    else:
        ids = _top_indices(c, top_k)                              # [T, k]

    weights = s.gather(1, ids)                                    # [T, k]
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + RENORM_EPS)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return weights, ids.to(torch.int32)
