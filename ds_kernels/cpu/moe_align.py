"""Vectorised moe_align: one stable sort by expert, then each assignment's padded slot."""

import torch

from ds_kernels.reference.moe_align import padded_length


def moe_align(topk_ids, num_experts, block_m):
    flat = topk_ids.reshape(-1)                                   # [T*k]
    device = flat.device
    P = padded_length(flat.numel(), num_experts, block_m)
    valid = (flat >= 0) & (flat < num_experts)
    # Excluded ids sort after every expert; the stable sort keeps assignment order per expert.
    expert = torch.where(valid, flat, num_experts).long()
    order = torch.sort(expert, stable=True).indices               # [T*k]
    sorted_expert = expert[order]

    counts = torch.bincount(expert, minlength=num_experts + 1)[:num_experts]  # [E]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)                                 # [E]
    padded_start = padded_end - padded
    unpadded_start = counts.cumsum(0) - counts

    real = sorted_expert < num_experts
    e = sorted_expert[real]
    rank = torch.arange(e.numel(), device=device) - unpadded_start[e]
    sorted_ids = torch.full((P,), flat.numel(), dtype=torch.int32, device=device)
    sorted_ids[padded_start[e] + rank] = order[real].to(torch.int32)

    block_starts = torch.arange(0, P, block_m, device=device)     # [P // block_m]
    block_expert = torch.searchsorted(padded_end, block_starts, right=True)
    expert_ids = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)

    num_post = padded_end[-1] if num_experts else padded_end.new_zeros(())
    return sorted_ids, expert_ids, num_post.to(torch.int32), counts.to(torch.int32)
