"""moe_align in four small launches, with no host synchronisation and a deterministic order.

The T*k assignments are cut into chunks of CHUNK. Within a chunk, a sort of
(expert * CHUNK + position) puts each expert's assignments in assignment order; a scan over the
chunks gives each (chunk, expert) its first slot. So the output is the reference's exactly,
run after run (no atomics decide an order), and fused_moe's sums are reproducible.

  1. _chunk_histogram_kernel   (one program per chunk)  counts[chunk, expert]
  2. _scan_kernel              (one program)            expert counts, padded run ends, and
                                                         per (chunk, expert) slot bases
  3. _scatter_kernel           (one program per chunk)  real entries of sorted_token_ids
  4. _fill_blocks_kernel       (one program per tile)   expert_ids and the padding sentinels
Launches 3 and 4 write disjoint slots, so nothing needs zeroing first.
"""

import torch
import triton
import triton.language as tl

from ds_kernels.reference.moe_align import padded_length

# Chunks: large enough that the one-program scan loops over at most ~64 of them (40K tokens x 8
# is 80 chunks of 4096), small enough that a chunk's sort stays in one program's registers.
_MIN_CHUNK = 128
_MAX_CHUNK = 4096
_TARGET_CHUNKS = 64
_SLOT_TILE = 1024


@triton.jit
def _chunk_histogram_kernel(ids_ptr, counts_ptr, N, E: tl.constexpr, BINS: tl.constexpr,
                            CHUNK: tl.constexpr):
    """counts_ptr[chunk, e] (int32 [num_chunks, E]) = assignments to e among ids_ptr's chunk.

    ids_ptr: [N] flattened topk_ids (int32 or int64). Ids outside [0, E) land in bin E, which
    is not stored. BINS: a power of two > E.
    """
    chunk = tl.program_id(0)
    pos = chunk * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + pos, mask=pos < N, other=-1)
    bins = tl.where((ids >= 0) & (ids < E), ids, E).to(tl.int32)
    hist = tl.histogram(bins, BINS)
    b = tl.arange(0, BINS)
    tl.store(counts_ptr + chunk * E + b, hist, mask=b < E)


@triton.jit
def _scan_kernel(counts_ptr, expert_counts_ptr, run_ends_ptr, num_post_ptr, num_chunks,
                 E: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Turns counts_ptr[chunk, e] into slot bases, in place: the first slot of chunk's
    assignments to e is base + their rank in the chunk's expert-sorted order.

    Writes expert_counts_ptr [E] int32, run_ends_ptr [E] int32 (inclusive cumsum of the padded
    runs) and num_post_ptr [1] int32.
    """
    e = tl.arange(0, E_POW2)
    real = e < E
    total = tl.zeros((E_POW2,), dtype=tl.int32)
    for chunk in range(num_chunks):
        total += tl.load(counts_ptr + chunk * E + e, mask=real, other=0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    run_end = tl.cumsum(padded, axis=0)
    tl.store(expert_counts_ptr + e, total, mask=real)
    tl.store(run_ends_ptr + e, run_end, mask=real)
    tl.store(num_post_ptr, tl.sum(padded, axis=0))

    before = run_end - padded  # slots of e taken by earlier chunks, starting at e's run
    for chunk in range(num_chunks):
        count = tl.load(counts_ptr + chunk * E + e, mask=real, other=0)
        rank_in_chunk = tl.cumsum(count, axis=0) - count  # chunk's earlier experts
        tl.store(counts_ptr + chunk * E + e, before - rank_in_chunk, mask=real)
        before += count


@triton.jit
def _scatter_kernel(ids_ptr, bases_ptr, sorted_ids_ptr, N, E: tl.constexpr, CHUNK: tl.constexpr):
    """sorted_ids_ptr[bases[chunk, e] + q] = assignment, for the q-th entry of the chunk's
    (expert, position)-sorted order. Excluded ids sort last and are not written."""
    chunk = tl.program_id(0)
    local = tl.arange(0, CHUNK)
    pos = chunk * CHUNK + local
    ids = tl.load(ids_ptr + pos, mask=pos < N, other=-1)
    expert = tl.where((ids >= 0) & (ids < E), ids, E).to(tl.int32)
    key = tl.sort(expert * CHUNK + local)
    sorted_expert = key // CHUNK
    real = sorted_expert < E
    base = tl.load(bases_ptr + chunk * E + sorted_expert, mask=real, other=0)
    tl.store(sorted_ids_ptr + base + local, chunk * CHUNK + key % CHUNK, mask=real)


@triton.jit
def _fill_blocks_kernel(run_ends_ptr, expert_counts_ptr, sorted_ids_ptr, expert_ids_ptr, P,
                        sentinel, E: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                        BLOCK_M: tl.constexpr, TILE: tl.constexpr):
    """For TILE slots: the expert owning each slot's block (binary search of run_ends, -1 past
    the last run), written to expert_ids_ptr at block starts; padding slots get the sentinel.
    SEARCH_STEPS: ceil(log2(E + 1)) halvings."""
    slot = tl.program_id(0) * TILE + tl.arange(0, TILE)
    block_start = slot // BLOCK_M * BLOCK_M
    lo = tl.zeros((TILE,), dtype=tl.int32)
    hi = tl.full((TILE,), E, dtype=tl.int32)
    for _ in range(SEARCH_STEPS):  # first expert whose run ends after block_start
        mid = (lo + hi) // 2
        active = lo < hi
        end = tl.load(run_ends_ptr + mid, mask=active & (mid < E), other=0)
        right = end <= block_start
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & (right == 0), mid, hi)
    owned = (lo < E) & (slot < P)
    expert = tl.where(owned, lo, -1)
    run_start = tl.load(run_ends_ptr + lo - 1, mask=owned & (lo > 0), other=0)
    count = tl.load(expert_counts_ptr + lo, mask=owned, other=0)
    padding = (slot < P) & ((lo >= E) | (slot >= run_start + count))
    tl.store(sorted_ids_ptr + slot, tl.full((TILE,), sentinel, tl.int32), mask=padding)
    tl.store(expert_ids_ptr + slot // BLOCK_M, expert, mask=(slot < P) & (slot == block_start))


def moe_align(topk_ids, num_experts, block_m, chunk=None):
    """``chunk`` (power of two) overrides the chunk size, for tests of the multi-chunk scan."""
    # contiguous: reshape can return a strided view (e.g. of an argsort(...)[:, :k] slice), and
    # the kernels index the ids as a dense array.
    flat = topk_ids.reshape(-1).contiguous()                      # [N = T*k]
    N, E, device = flat.numel(), num_experts, flat.device
    P = padded_length(N, E, block_m)
    sorted_ids = torch.empty(P, dtype=torch.int32, device=device)
    expert_ids = torch.empty(P // block_m, dtype=torch.int32, device=device)
    expert_counts = torch.zeros(E, dtype=torch.int32, device=device)
    num_post = torch.zeros(1, dtype=torch.int32, device=device)
    if N == 0:
        return sorted_ids, expert_ids, num_post[0], expert_counts

    if chunk is None:
        chunk = min(_MAX_CHUNK, max(_MIN_CHUNK, triton.next_power_of_2(triton.cdiv(N, _TARGET_CHUNKS))))
    num_chunks = triton.cdiv(N, chunk)
    bases = torch.empty(num_chunks, E, dtype=torch.int32, device=device)
    run_ends = torch.empty(E, dtype=torch.int32, device=device)

    _chunk_histogram_kernel[(num_chunks,)](flat, bases, N, E=E,
                                          BINS=triton.next_power_of_2(E + 1), CHUNK=chunk)
    _scan_kernel[(1,)](bases, expert_counts, run_ends, num_post, num_chunks, E=E,
                       E_POW2=triton.next_power_of_2(E), BLOCK_M=block_m)
    _scatter_kernel[(num_chunks,)](flat, bases, sorted_ids, N, E=E, CHUNK=chunk)
    _fill_blocks_kernel[(triton.cdiv(P, _SLOT_TILE),)](
        run_ends, expert_counts, sorted_ids, expert_ids, P, N, E=E,
        SEARCH_STEPS=(E + 1).bit_length(), BLOCK_M=block_m, TILE=_SLOT_TILE)
    return sorted_ids, expert_ids, num_post[0], expert_counts
