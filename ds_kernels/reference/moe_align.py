"""Reference moe_align: vLLM's moe_align_block_size contract, one expert at a time.

The T*k assignments (flattened topk_ids) are grouped by expert, in assignment order within each
expert; each expert's run is padded with the sentinel T*k up to a multiple of block_m. Ids
outside [0, E) - e.g. -1 for an expert that lives on another rank - are excluded: they appear
in no run and in no count.
"""

import torch


def padded_length(num_assignments: int, num_experts: int, block_m: int) -> int:
    """Length P of sorted_token_ids: the worst case over all routings, a multiple of block_m.

    Each of the (at most min(E, T*k)) non-empty experts wastes at most block_m - 1 slots. The
    bound depends on shapes only, so no kernel ever waits on the device for the real length.
    """
    worst = min(num_assignments + num_experts * (block_m - 1), num_assignments * block_m)
    return -(-worst // block_m) * block_m


def moe_align(topk_ids, num_experts, block_m):
    flat = topk_ids.reshape(-1).long()                            # [T*k]
    sentinel = flat.numel()
    P = padded_length(flat.numel(), num_experts, block_m)
    sorted_ids = torch.full((P,), sentinel, dtype=torch.int32, device=flat.device)
    expert_ids = torch.full((P // block_m,), -1, dtype=torch.int32, device=flat.device)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device)

    start = 0
    for e in range(num_experts):
        assignments = (flat == e).nonzero().flatten()            # in assignment order
        n = assignments.numel()
        sorted_ids[start:start + n] = assignments.to(torch.int32)
        run = -(-n // block_m) * block_m
        expert_ids[start // block_m:(start + run) // block_m] = e
        counts[e] = n
        start += run

    num_post = torch.tensor(start, dtype=torch.int32, device=flat.device)
    return sorted_ids, expert_ids, num_post, counts
