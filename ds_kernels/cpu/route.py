"""Vectorised routing with the reference's exact semantics, ties included: the same expert
ids, bit for bit, with every strategy.

"topk" (many tokens): never sorts a whole row: torch.topk (k+1 values, to see whether the k-th
place is tied), then a sort of the k winners alone. torch.topk does not promise which of two
equal values wins, so rows tied across the k-th place are redone with the reference's stable
sort. Experts of dropped groups are not masked but left out: top-k runs on the kept groups'
columns only (half of DeepSeek-V3's row).

"numpy" (a decode step's few tokens on CPU): the reference's stable sorts, on numpy arrays.
Per-op overhead is most of the time there, and numpy's is ~1 us an op to torch's ~4 us. The
scores come from torch (the reference's own); the weights' sum runs in numpy's order, within
fp32 rounding of the reference's.

"sort": the reference itself, for other devices that run the torch path (numpy cannot).
"""

import numpy as np
import torch

from ds_kernels import tuning
from ds_kernels.reference import route as reference
from ds_kernels.reference.route import (GROUP_TOP, RENORM_EPS, choice_scores, group_basis,
                                        top_indices, weigh)

# The crossover from "numpy" to "topk", measured on a 2-core x86 CPU with E=256
# (bench/bench_route.py); `python -m autotune sweep --op route` stores the best strategy per
# token bucket for the user's machine.
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


def _best_sum(grouped: torch.Tensor, top: int) -> torch.Tensor:
    """Sum of the ``top`` (1 or 2) largest values along the last dim (a repeated maximum counts
    twice): max and scatter instead of the reference's sort of every group."""
    if top == 1:
        return grouped.amax(dim=-1)
    best, where = grouped.max(dim=-1, keepdim=True)
    second = grouped.scatter(-1, where, float("-inf")).amax(dim=-1, keepdim=True)
    return (best + second).squeeze(-1)


def route(logits, top_k, scoring, correction_bias, n_group, topk_group, renormalize,
          routed_scaling_factor, group_scoring, fixed_ids=None):
    if fixed_ids is not None:  # nothing to choose: the reference's few ops are the whole job
        return reference.route(logits, top_k, scoring, None, 1, 1, renormalize,
                               routed_scaling_factor, group_scoring, fixed_ids)
    T, E = logits.shape
    on_cpu = logits.device.type == "cpu"
    default = ("numpy" if on_cpu else "sort") if T < SORT_BELOW_TOKENS else "topk"
    key = tuning.shape_key("route", E=E)
    strategy = tuning.config("route", "torch", key, T, logits.dtype, logits.device,
                             dict(strategy=default))["strategy"]
    if strategy == "numpy" and on_cpu:
        return _route_numpy(logits, top_k, scoring, correction_bias, n_group, topk_group,
                            renormalize, routed_scaling_factor, group_scoring)
    if strategy != "topk":
        return reference.route(logits, top_k, scoring, correction_bias, n_group, topk_group,
                               renormalize, routed_scaling_factor, group_scoring)
    s, c = choice_scores(logits, scoring, correction_bias)        # [T, E] each

    if n_group > 1:
        group_size = E // n_group
        grouped = c.view(T, n_group, group_size)
        basis = group_basis(s, c, group_scoring).view(T, n_group, group_size)
        group_scores = _best_sum(basis, GROUP_TOP[group_scoring])  # [T, n_group]
        kept = _top_indices(group_scores, topk_group)             # [T, topk_group]
        kept = kept.sort(dim=-1).values  # ascending, so column order is expert order
        columns = grouped.gather(1, kept.unsqueeze(-1).expand(-1, -1, group_size))
        j = _top_indices(columns.view(T, topk_group * group_size), top_k)  # [T, k]
        ids = kept.gather(1, j // group_size) * group_size + j % group_size
    else:
        ids = _top_indices(c, top_k)                              # [T, k]

    return weigh(s, ids, renormalize, routed_scaling_factor), ids.to(torch.int32)


def _route_numpy(logits, top_k, scoring, correction_bias, n_group, topk_group, renormalize,
                 routed_scaling_factor, group_scoring):
    s_t, c_t = choice_scores(logits, scoring, correction_bias)
    s, c = s_t.detach().numpy(), c_t.detach().numpy()                       # [T, E] each
    T, E = c.shape
    rows = np.arange(T)[:, None]
    if n_group > 1:
        group_size = E // n_group
        basis = group_basis(s_t, c_t, group_scoring).detach().numpy()      # [T, E]
        top = GROUP_TOP[group_scoring]
        # The best one or two of each group (two values add up alike in either order).
        best = np.sort(basis.reshape(T, n_group, group_size), axis=-1)[..., -top:]
        with np.errstate(over="ignore"):  # two NaN scores (-max each) make -inf, as in torch
            group_scores = best.sum(axis=-1)                                # [T, n_group]
        kept = np.zeros((T, n_group), dtype=bool)
        kept[rows, _top_indices_numpy(group_scores, topk_group)] = True
        c = np.where(np.repeat(kept, group_size, axis=1), c, -np.inf)
    ids = _top_indices_numpy(c, top_k)                                      # [T, k]
    weights = s[rows, ids]                                                  # [T, k]
    if renormalize:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + np.float32(RENORM_EPS))
    weights = weights * np.float32(routed_scaling_factor)
    return torch.from_numpy(weights), torch.from_numpy(ids.astype(np.int32))


def _top_indices_numpy(values, k):
    """The reference's top_indices: descending, ties to the lower index (a stable sort of the
    negated values; -0.0 and 0.0 stay equal)."""
    return np.argsort(-values, axis=-1, kind="stable")[:, :k]
