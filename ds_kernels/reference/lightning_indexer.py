"""Reference lightning indexer (DeepSeek-V3.2's DSA key selection): one query, one key at a time.

Query t belongs to sequence query_seq[t] and sees that sequence's keys at positions
0..query_pos[t]; the key at position p is k_cache[block_table[b, p // block_size],
p % block_size], its slot page * block_size + p % block_size. Each key's score is
sum_h weights[t, h] * relu(q[t, h] . k), in fp64 (the answer the fast paths approach). The
top_k keys by score, descending, ties to the lower position, give the slots; -1 pads when
fewer than top_k keys are visible.

Non-finite input: relu keeps NaN, so a NaN anywhere in a key's dot products or the weights makes
its score NaN, which ranks as -inf: below every number, still above the padding. Keys past
query_pos[t] (and other sequences' keys) are never read, so nothing they hold can reach t.
"""

import torch


def lightning_indexer(q, weights, k_cache, block_table, query_seq, query_pos, top_k):
    T, H, D = q.shape
    block_size = k_cache.shape[1]
    keys = k_cache.reshape(-1, D)                                 # [num_blocks * block_size, D]
    slots = torch.full((T, top_k), -1, dtype=torch.int32)
    for t in range(T):
        b, last = int(query_seq[t]), int(query_pos[t])
        scored = []                                               # (score, position, slot)
        for p in range(last + 1):
            slot = int(block_table[b, p // block_size]) * block_size + p % block_size
            dots = q[t].double() @ keys[slot].double()            # [H]
            score = float((weights[t].double() * dots.clamp_min(0)).sum())
            scored.append((float("-inf") if score != score else score, p, slot))
        scored.sort(key=lambda e: (-e[0], e[1]))
        for i, (_, _, slot) in enumerate(scored[:top_k]):
            slots[t, i] = slot
    return slots.to(q.device)
