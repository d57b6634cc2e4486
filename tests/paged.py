"""Paged caches for the attention tests: sequences on shuffled pages, with garbage wherever
no sequence's token lies (spare pages, rows past a sequence's end, table entries past its
last page), which the ops must never read."""

import torch


def shuffled_pages(g, lens, block_size, spare_pages=2, spare_columns=1):
    """(block_table int64 [B, max_blocks], used bool [num_blocks, block_size]): each sequence
    of lens[b] tokens on pages drawn in random order, its table entries past its last page
    junk (-1, num_blocks, int32 extremes)."""
    pages = [-(-n // block_size) for n in lens]
    num_blocks = sum(pages) + spare_pages
    max_blocks = max(pages + [0]) + spare_columns
    order = torch.randperm(num_blocks, generator=g)
    junk = torch.tensor([-1, num_blocks, 2**31 - 1, -(2**31)])
    table = junk[torch.randint(0, 4, (len(lens), max_blocks), generator=g)]
    used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    taken = 0
    for b, (n, p) in enumerate(zip(lens, pages)):
        table[b, :p] = order[taken:taken + p]
        rows = torch.arange(n)
        used[table[b, rows // block_size], rows % block_size] = True
        taken += p
    return table, used
