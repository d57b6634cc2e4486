"""Expert placement from recorded routing: an expert_map for MoE(ep_group=..., expert_map=...)
that evens out the tokens each rank's experts receive (EPLB's aim: the busiest rank sets an
expert-parallel layer's time).

1. load[e]: the assignments to expert e in the recording (ds_model generate --record-routing).
2. ``redundant`` extra replicas go, one at a time, to the expert with the most load per copy
   (the dispatch splits an expert's assignments evenly over its copies, by token).
3. The copies go to the least-loaded rank that has a free slot and no copy of that expert yet,
   heaviest first (greedy longest-processing-time, each rank holding (E + redundant) / W) -
   the most-copied experts before all others, while every rank still has room for one.
The result is reported as the busiest rank's load over the mean, before (contiguous E/W
experts a rank) and after.
"""

import heapq

import torch


def expert_load(topk_ids: torch.Tensor, num_experts: int) -> list[int]:
    """Assignments per expert of recorded topk_ids [T, k]."""
    if topk_ids.numel() and (int(topk_ids.min()) < 0 or int(topk_ids.max()) >= num_experts):
        raise ValueError(f"the recorded routing names experts in [{int(topk_ids.min())}, "
                         f"{int(topk_ids.max())}], outside [0, {num_experts})")
    return torch.bincount(topk_ids.reshape(-1).long(), minlength=num_experts).tolist()


def rank_loads(load: list[int], expert_map: list[list[int]]) -> list[float]:
    """Tokens each rank receives under ``expert_map``: an expert's load split over its copies."""
    copies = [0] * len(load)
    for ids in expert_map:
        for e in ids:
            copies[e] += 1
    return [sum(load[e] / copies[e] for e in ids) for ids in expert_map]


def imbalance(loads: list[float]) -> float:
    """The busiest rank's load over the mean (1.0: perfectly even; 0 load: 1.0)."""
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean else 1.0


def balanced_map(load: list[int], ranks: int, redundant: int = 0) -> list[list[int]]:
    """expert_map (each rank's sorted expert ids) for per-expert ``load`` over ``ranks``, with
    ``redundant`` extra copies of the hottest experts."""
    E = len(load)
    if ranks < 1 or redundant < 0:
        raise ValueError(f"ranks must be >= 1 and redundant >= 0, got {ranks}, {redundant}")
    if (E + redundant) % ranks:
        raise ValueError(f"{E} experts + {redundant} redundant copies do not fill {ranks} ranks "
                         f"evenly: pick redundant so that E + redundant is a multiple of ranks")
    if redundant > E * (ranks - 1):
        raise ValueError(f"{redundant} redundant copies: an expert can have at most one copy a "
                         f"rank ({E * (ranks - 1)} extra copies at most)")
    copies = [1] * E
    for _ in range(redundant):  # the most load per copy gets one more, ties to the lower id
        e = max(range(E), key=lambda e: (load[e] / copies[e] if copies[e] < ranks else -1, -e))
        copies[e] += 1
    pieces = sorted(((load[e] / copies[e], e) for e in range(E) for _ in range(copies[e])),
                    key=lambda piece: (-copies[piece[1]], -piece[0], piece[1]))
    slots = (E + redundant) // ranks
    expert_map = [[] for _ in range(ranks)]
    heap = [(0.0, r) for r in range(ranks)]                       # (load, rank)
    for weight, e in pieces:
        skipped = []
        while True:  # the least-loaded rank with room and no copy of e yet
            total, r = heapq.heappop(heap)
            if len(expert_map[r]) < slots and e not in expert_map[r]:
                break
            skipped.append((total, r))
        expert_map[r].append(e)
        heapq.heappush(heap, (total + weight, r))
        for item in skipped:
            heapq.heappush(heap, item)
    return [sorted(ids) for ids in expert_map]
