"""Lightning indexer: each query's top_k keys by score, streamed from the paged index-key cache
with a running top-k per program, never writing scores to global memory.

  _top_keys_kernel   grid (T, splits): one split of query program_id(0)'s visible keys,
                     BLOCK_N keys a step, each key's page looked up in block_table. A step's
                     scores [BLOCK_H, BLOCK_N] are one tl.dot of the query's heads against the
                     key tile, relu'd and summed over heads with the weights. Each score is
                     packed with its position into one int64 (score's order-preserving bits
                     high, the position's complement low: unique keys that sort as score
                     descending, position ascending). Steps fill a pending [TOPK] buffer;
                     when it is full it is merged into the running [TOPK] top keys by one
                     bitonic sort of both (tl.sort of 2 TOPK). With one split the kernel
                     writes the slots; with several, its top keys.
  _merge_kernel      grid (T,): merges the splits' top keys the same way and writes the slots.

The split count depends only on T and the table's width (not on query_pos: no device sync,
CUDA-graph safe); a split takes 1/splits of its own query's visible keys. Splits are for decode:
with T queries filling the GPU, one split writes slots directly and no partial buffer exists
(T x splits x TOPK int64 otherwise). Pages outside [0, num_blocks) and sequences outside
[0, B) are skipped and positions clamped to the table, so unchecked bad input (CUDA graph
capture skips the checks) never reads out of bounds.
"""

import torch
import triton
import triton.language as tl

from ds_kernels import tuning
from ds_kernels.kernels.fp8_mla_cache import load_latent
from ds_kernels.kernels.mla_decode import dot_operand
from ds_kernels.mla_cache_format import is_fp8

_LOW = tl.constexpr(4294967295)                              # 2^32 - 1: a position's bits
_NONE = tl.constexpr(-9223372036854775807)                   # no key: below every packed key
# Tiles on a GPU, not timed: a guess for V3.2's 64 heads x 128 dims, each step a [64, 128] x
# [128, BLOCK_N] dot, the top keys and the pending buffer 2 x 2048 int64. An offline build for
# sm_90 (triton 3.9, bf16, 8 warps) took 222 registers a thread, no spills, 32 KB of shared
# memory (the merges' sorts); the merge kernel 128 registers.
_GPU = dict(BLOCK_N=64, min_split_keys=2048, num_warps=8, num_stages=1)
# Interpreter: a fixed small "GPU" and 16-key steps, so that the tests' tiny contexts still
# cross several steps, merges and splits.
_INTERPRETER = dict(BLOCK_N=16, min_split_keys=16, num_warps=4, num_stages=1)
_INTERPRETER_SMS = 4
MAX_TOP_K = 4096  # the running top keys live in registers: 2 x 4096 int64 a program at most


@triton.jit
def _pack(score, pos):
    """int64 keys ordering as (score descending, position ascending); NaN ranks as -inf, -0 as
    +0 (cpu/lightning_indexer.py's pack)."""
    s = tl.where(score != score, float("-inf"), score)
    s = tl.where(s == 0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    return (ordered << 32) + (_LOW - pos.to(tl.int64))


@triton.jit
def _merge(a, b, TOPK: tl.constexpr):
    """The TOPK largest of two [TOPK] int64 key vectors, descending."""
    both = tl.sort(tl.reshape(tl.join(a, b), [2 * TOPK]), descending=True)
    top, _ = tl.split(tl.permute(tl.reshape(both, [2, TOPK]), [1, 0]))
    return top


@triton.jit
def _store_slots(keys, t, b, b_ok, top_k, block_table_ptr, stride_btb, stride_btp, slots_ptr,
                 stride_st, stride_sk, PAGE: tl.constexpr, TOPK: tl.constexpr):
    """The first top_k of ``keys`` [TOPK] as cache slots of sequence b (-1: no key)."""
    i = tl.arange(0, TOPK)
    found = tl.where(b_ok, keys, _NONE) != _NONE  # (a scalar & a vector: no mask dtype the
    # interpreter takes)
    pos = tl.where(found, _LOW - (keys & _LOW), 0)
    page = tl.load(block_table_ptr + b * stride_btb + (pos // PAGE) * stride_btp, mask=found,
                   other=0)
    slot = tl.where(found, page.to(tl.int64) * PAGE + pos % PAGE, -1)
    tl.store(slots_ptr + t * stride_st + i * stride_sk, slot.to(tl.int32), mask=i < top_k)


@triton.jit
def _top_keys_kernel(
    q_ptr, w_ptr, cache_ptr, block_table_ptr, seq_ptr, pos_ptr, part_ptr, slots_ptr,
    H, D, B, num_blocks, max_blocks, num_splits, top_k,
    stride_qt, stride_qh, stride_qd, stride_wt, stride_wh, stride_cb, stride_cp, stride_cd,
    stride_btb, stride_btp, stride_seq, stride_pos, stride_pt, stride_ps, stride_pk,
    stride_st, stride_sk,
    PAGE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    TOPK: tl.constexpr, FINAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    FP8: tl.constexpr,
):
    """Split program_id(1) of query program_id(0)'s keys.

    q_ptr [T, H, D], w_ptr [T, H] (any float dtype), cache_ptr [num_blocks, PAGE, D] (q's
    dtype), block_table_ptr int32 [B, max_blocks], seq_ptr / pos_ptr int32 [T]: all strided.
    FINAL (one split): the slots go to slots_ptr int32 [T, top_k]; else the split's top keys to
    part_ptr int64 [T, num_splits, TOPK]. BLOCK_H, BLOCK_D: H and D as powers of two >= 16;
    TOPK: top_k as a power of two, a multiple of BLOCK_N. FP8: cache_ptr holds the bytes
    (uint8) of FP8 rows [num_blocks, PAGE, D + 4 * D/128], strides in bytes (stride_cd 1).
    """
    t = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = tl.load(seq_ptr + t * stride_seq).to(tl.int64)
    b_ok = (b >= 0) & (b < B)
    b = tl.where(b_ok, b, 0)
    visible = tl.minimum(tl.load(pos_ptr + t * stride_pos) + 1, max_blocks * PAGE)
    visible = tl.where(b_ok, tl.maximum(visible, 0), 0)
    per_split = tl.cdiv(tl.cdiv(visible, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, visible)

    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_ok, d_ok = h < H, d < D
    q = tl.load(q_ptr + t * stride_qt + h[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    q = dot_operand(q, UPCAST)                                    # [BH, BD]
    w = tl.load(w_ptr + t * stride_wt + h * stride_wh, mask=h_ok, other=0.0).to(tl.float32)

    TILES: tl.constexpr = TOPK // BLOCK_N
    best = tl.full([TOPK], _NONE, tl.int64)
    pending = tl.full([TILES, BLOCK_N], _NONE, tl.int64)
    filled = 0
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)                          # [BN]
        page = tl.load(block_table_ptr + b * stride_btb + (pos // PAGE) * stride_btp,
                       mask=pos < end, other=-1)
        ok = (pos < end) & (page >= 0) & (page < num_blocks)
        rows = cache_ptr + page.to(tl.int64) * stride_cb + (pos % PAGE).to(tl.int64) * stride_cp
        if FP8:  # codes times scales: exact in q's dtype for index_cache_write's scales
            k = load_latent(rows, ok, d, d_ok, D).to(q_ptr.dtype.element_ty)   # [BN, BD]
        else:
            k = tl.load(rows[:, None] + d[None, :] * stride_cd,
                        mask=ok[:, None] & d_ok[None, :], other=0.0)          # [BN, BD]
        s = tl.dot(q, tl.trans(dot_operand(k, UPCAST)), input_precision=PRECISION)  # [BH, BN]
        s = tl.where(s < 0, 0.0, s)                               # relu, NaN kept
        score = tl.sum(tl.where(h_ok[:, None], s * w[:, None], 0.0), axis=0)      # [BN]
        packed = tl.where(ok, _pack(score, pos), _NONE)
        pending = tl.where(tl.arange(0, TILES)[:, None] == filled, packed[None, :], pending)
        filled += 1
        if filled == TILES:
            best = _merge(best, tl.reshape(pending, [TOPK]), TOPK)
            pending = tl.full([TILES, BLOCK_N], _NONE, tl.int64)
            filled = 0
    best = _merge(best, tl.reshape(pending, [TOPK]), TOPK)
    if FINAL:
        _store_slots(best, t, b, b_ok, top_k, block_table_ptr, stride_btb, stride_btp,
                     slots_ptr, stride_st, stride_sk, PAGE, TOPK)
    else:
        tl.store(part_ptr + t * stride_pt + split * stride_ps + tl.arange(0, TOPK) * stride_pk,
                 best)


@triton.jit
def _merge_kernel(part_ptr, block_table_ptr, seq_ptr, slots_ptr, B, num_splits, top_k,
                  stride_pt, stride_ps, stride_pk, stride_btb, stride_btp, stride_seq,
                  stride_st, stride_sk, PAGE: tl.constexpr, TOPK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    b = tl.load(seq_ptr + t * stride_seq).to(tl.int64)
    b_ok = (b >= 0) & (b < B)
    b = tl.where(b_ok, b, 0)
    best = tl.full([TOPK], _NONE, tl.int64)
    for split in range(num_splits):
        best = _merge(best, tl.load(part_ptr + t * stride_pt + split * stride_ps
                                    + tl.arange(0, TOPK) * stride_pk), TOPK)
    _store_slots(best, t, b, b_ok, top_k, block_table_ptr, stride_btb, stride_btp, slots_ptr,
                 stride_st, stride_sk, PAGE, TOPK)


def num_splits(T: int, capacity: int, sms: int, min_split_keys: int) -> int:
    """Splits per query: enough for T * splits programs to fill ``sms`` multiprocessors, none
    shorter than ``min_split_keys`` of the table's ``capacity``."""
    if T >= sms:
        return 1
    return max(1, min(triton.cdiv(sms, T), capacity // min_split_keys))


def _config(T, H, D, page, dtype, device) -> dict:
    default = _INTERPRETER if device.type == "cpu" else _GPU
    key = tuning.shape_key("lightning_indexer", H=H, D=D, page=page)
    return tuning.config("lightning_indexer", "triton", key, T, dtype, device, default)


def _sms(device) -> int:
    if device.type == "cpu":
        return _INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def lightning_indexer(q, weights, k_cache, block_table, query_seq, query_pos, top_k):
    T, H, D = q.shape
    num_blocks, page = k_cache.shape[:2]
    if top_k > MAX_TOP_K:
        raise ValueError(f"top_k={top_k}: the triton lightning_indexer keeps at most "
                         f"{MAX_TOP_K} keys a query in registers; use the torch backend")
    slots = torch.empty(T, top_k, dtype=torch.int32, device=q.device)
    if T == 0:
        return slots
    config = _config(T, H, D, page, q.dtype, q.device)
    block_n = config["BLOCK_N"]
    topk = max(triton.next_power_of_2(top_k), block_n)
    splits = num_splits(T, block_table.shape[1] * page, _sms(q.device), config["min_split_keys"])
    part = (torch.empty(T, splits, topk, dtype=torch.int64, device=q.device) if splits > 1
            else slots.new_empty(0, 1, 1, dtype=torch.int64))
    fp32_precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    _top_keys_kernel[(T, splits)](
        q, weights, k_cache, block_table, query_seq, query_pos, part, slots,
        H, D, block_table.shape[0], num_blocks, block_table.shape[1], splits, top_k,
        *q.stride(), *weights.stride(), *k_cache.stride(), *block_table.stride(),
        query_seq.stride(0), query_pos.stride(0), *part.stride(), *slots.stride(),
        PAGE=page, BLOCK_H=max(16, triton.next_power_of_2(H)),
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_N=block_n, TOPK=topk,
        FINAL=splits == 1, PRECISION=fp32_precision if q.dtype == torch.float32 else "ieee",
        UPCAST=q.dtype == torch.bfloat16 and q.device.type == "cpu", FP8=is_fp8(k_cache),
        num_warps=config["num_warps"], num_stages=config["num_stages"])
    if splits > 1:
        _merge_kernel[(T,)](part, block_table, query_seq, slots, block_table.shape[0], splits,
                            top_k, *part.stride(), *block_table.stride(), query_seq.stride(0),
                            *slots.stride(), PAGE=page, TOPK=topk)
    return slots
