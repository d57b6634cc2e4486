"""Absorbed-weight MLA decode: split-KV flash-decoding over a paged latent cache.

After absorption every query head attends to the same latent rows (MQA with one 576-wide KV
head), so a program takes BLOCK_H heads of one sequence and each KV tile it loads serves all of
them: the loaded K_nope tile is also the V tile. Scores are two dot products, q_nope x K_nope^T
plus q_pe x K_pe^T, so nothing is padded to 1024 columns.

  _mla_decode_kernel    grid (B, head groups, splits): one split of one sequence's tokens for
                        BLOCK_H heads, BLOCK_N tokens a step, each token's page looked up in
                        block_table; online softmax in exp2; the [BLOCK_H, Dc] fp32 accumulator
                        stays in registers for the whole Dc (no V tiling: every V tile would
                        need the full-width scores, so tiling V means loading K again).
                        Writes the normalised partial output and its lse.
  _merge_splits_kernel  grid (B, Hq): combines the splits by log-sum-exp. Skipped when one
                        split per sequence already fills the GPU; then the first kernel
                        writes out and lse directly.

The split count depends only on B, Hq and the block table's width (not on cache_seqlens, so
no device sync and CUDA-graph safe); each split takes 1/splits of its own sequence's tokens.
An FP8 cache (FP8 on: ds_kernels/mla_cache_format.py) is the same kernel reading bytes: each
K/V tile's codes and scales are dequantised in registers (kernels/fp8_mla_cache.py) and rounded
to q's dtype, so the dots see what they would on the dequantised cache, for 656 bytes a token
read instead of 1,152.
Cache addresses are 64-bit: num_blocks * block_size * 576 passes 2**31 at ~58K pages of 64.
Lengths are clamped to the table's capacity and pages outside [0, num_blocks) are skipped, so
even unchecked bad input (CUDA graph capture skips the checks) never reads out of bounds.
"""

import torch
import triton
import triton.language as tl

from ds_kernels import tuning
from ds_kernels.kernels.fp8_mla_cache import load_rows
from ds_kernels.mla_cache_format import is_fp8

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

# Tile sizes on a GPU, from offline builds for sm_90 and sm_80 (triton 3.9) at Dc=512, Dr=64;
# no timings yet. The default, 16 heads x 32 bf16 tokens over 8 warps, took 120 / 96
# registers a thread and 57 KB of shared memory, no spills; fp32 caches take 16 tokens a step
# (112 registers, 75 KB). 16 heads is tl.dot's smallest M; Hq=128 runs as 8 head groups,
# which read each KV tile through L2.
_BLOCK_H = 16
# The largest register estimate (fits) whose builds spilled nothing on sm_90 and sm_80, but
# for one fp32 tile spilling 24 bytes on sm_80; every build above it (176, 208) spilled.
_REGISTER_WORDS = 136
# Shared memory, from above: the builds used at most two K/V tiles plus 16 KiB (the query
# tiles), whatever num_stages - the loop over data-dependent pages is not software-pipelined.
_SHARED_EXTRA = 16 << 10
# Splits only until the programs fill the multiprocessors, and none shorter than 256 tokens,
# where writing and merging the [16, 512] fp32 partials would cost ~20% of reading the split's
# cache. `python -m autotune sweep --op mla_decode` tunes all four keys per batch-size bucket.
_GPU = dict(min_split_tokens=256, num_warps=8, num_stages=3)
# FP8 caches: 16 tokens a step whatever q's dtype - a guess, not measured: the decoded tile
# holds int32 codes and gathered fp32 scales beside the values, ~3x a bf16 tile's registers.
_FP8_BLOCK_N = 16
# Interpreter: a fixed small "GPU" and 16-token steps, so that the tests' tiny contexts still
# cross several tiles and splits (and the merge kernel runs).
_INTERPRETER = dict(BLOCK_N=16, min_split_tokens=16, num_warps=4, num_stages=1)
_INTERPRETER_SMS = 4


@triton.jit
def dot_operand(x, UPCAST: tl.constexpr):
    """A loaded tile as a dot operand: as it is, or in fp32 (bf16 under the interpreter, whose
    bf16 arithmetic is wrong)."""
    if UPCAST:
        return x.to(tl.float32)
    return x


@triton.jit
def _fold_sink(m, l, sink):
    """The running max m and sum l (log2 units) with one more score ``sink`` whose value row
    is 0 (attention sinks); alpha rescales the accumulator."""
    m_new = tl.maximum(m, sink)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_ref)
    return m_new, l * alpha + tl.exp2(sink - m_ref), alpha


@triton.jit
def _mla_decode_kernel(
    q_nope_ptr, q_pe_ptr, cache_ptr, block_table_ptr, seqlens_ptr, sinks_ptr, out_ptr, lse_ptr,
    Hq, num_blocks, max_blocks, num_splits, scale_log2,
    stride_qnb, stride_qnh, stride_qnd, stride_qpb, stride_qph, stride_qpd,
    stride_cb, stride_ct, stride_cd, stride_btb, stride_btp, stride_sl,
    stride_ob, stride_oh, stride_os, stride_od, stride_lb, stride_lh, stride_ls, stride_sink,
    DC: tl.constexpr, DR: tl.constexpr, DC_POW2: tl.constexpr, DR_POW2: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, FP8: tl.constexpr, SPARSE: tl.constexpr, SINKS: tl.constexpr,
):
    """Split program_id(2) of sequence program_id(0)'s tokens, for heads program_id(1)*BLOCK_H...

    q_nope_ptr: [B, Hq, DC], strides (stride_qnb, stride_qnh, stride_qnd); q_pe_ptr: [B, Hq, DR]
    likewise. cache_ptr: [num_blocks, PAGE, DC + DR] latent cache, strides (stride_cb,
    stride_ct, stride_cd), same dtype as q; with FP8, the bytes (uint8) of FP8 rows, the
    strides in bytes (stride_cd 1). block_table_ptr: int32 [B, max_blocks], strides
    (stride_btb, stride_btp). seqlens_ptr: int32 [B], stride stride_sl (0 when expanded).
    out_ptr: [B, Hq, num_splits, DC] partial (or, with one split, final) output, strides (stride_ob, stride_oh, stride_os, stride_od);
    lse_ptr: fp32 [B, Hq, num_splits] natural-log lse of the split's scores, strides
    (stride_lb, stride_lh, stride_ls). An empty split writes out 0 and lse -inf.
    scale_log2: softmax_scale * log2(e). DC_POW2, DR_POW2: tile widths (powers of two >= 16).
    PAGE: block_size. PRECISION: tl.dot input precision for fp32 operands. UPCAST: dot in fp32
    whatever the input dtype. FP8: the cache holds FP8 rows.
    SPARSE (sparse_mla): program_id(0) is a query, block_table_ptr its slots int32 [T,
    max_blocks = top_k] (slot = page * PAGE + offset, -1: none), every one of them read;
    seqlens_ptr is not read. SINKS: sinks_ptr fp32 [Hq] join each head's softmax denominator
    (here with one split; else in _merge_splits_kernel).
    """
    b = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)   # [BH]
    split = tl.program_id(2)
    dc = tl.arange(0, DC_POW2)                                   # [DCP]
    dr = tl.arange(0, DR_POW2)                                   # [DRP]
    h_ok, dc_ok, dr_ok = heads < Hq, dc < DC, dr < DR
    q_nope = dot_operand(tl.load(q_nope_ptr + b * stride_qnb + heads[:, None] * stride_qnh
                              + dc[None, :] * stride_qnd,
                              mask=h_ok[:, None] & dc_ok[None, :], other=0.0), UPCAST)
    q_pe = dot_operand(tl.load(q_pe_ptr + b * stride_qpb + heads[:, None] * stride_qph
                            + dr[None, :] * stride_qpd,
                            mask=h_ok[:, None] & dr_ok[None, :], other=0.0), UPCAST)

    if SPARSE:
        seqlen = max_blocks
    else:
        seqlen = tl.minimum(tl.maximum(tl.load(seqlens_ptr + b * stride_sl), 0),
                            max_blocks * PAGE)
    per_split = tl.cdiv(tl.cdiv(seqlen, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seqlen)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)             # running max (log2 units)
    l = tl.zeros([BLOCK_H], tl.float32)                           # running sum of exp2
    acc = tl.zeros([BLOCK_H, DC_POW2], tl.float32)                # running weighted V
    bad = tl.zeros([BLOCK_H], tl.int32)                           # a non-finite score seen
    for n0 in range(start, end, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)                          # [BN]
        if SPARSE:
            slot = tl.load(block_table_ptr + b * stride_btb + tok * stride_btp, mask=tok < end,
                           other=-1)
            page = tl.where(slot >= 0, slot // PAGE, -1)
            offset = slot % PAGE
        else:
            page = tl.load(block_table_ptr + b * stride_btb + (tok // PAGE) * stride_btp,
                           mask=tok < end, other=0)
            offset = tok % PAGE
        t_ok = (tok < end) & (page >= 0) & (page < num_blocks)
        row = cache_ptr + page.to(tl.int64) * stride_cb + offset.to(tl.int64) * stride_ct
        if FP8:
            kv, k_pe = load_rows(row, t_ok, dc, dc_ok, dr, dr_ok, DC)
            kv = kv.to(q_nope_ptr.dtype.element_ty)                # [BN, DCP] K_nope = V
            k_pe = k_pe.to(q_nope_ptr.dtype.element_ty)            # [BN, DRP]
        else:
            kv = tl.load(row[:, None] + dc[None, :] * stride_cd,   # [BN, DCP] K_nope = V
                         mask=t_ok[:, None] & dc_ok[None, :], other=0.0)
            k_pe = tl.load(row[:, None] + (DC + dr)[None, :] * stride_cd,   # [BN, DRP]
                           mask=t_ok[:, None] & dr_ok[None, :], other=0.0)
        kv = dot_operand(kv, UPCAST)
        k_pe = dot_operand(k_pe, UPCAST)
        s = tl.dot(q_nope, tl.trans(kv), input_precision=PRECISION)      # [BH, BN]
        s = tl.dot(q_pe, tl.trans(k_pe), s, input_precision=PRECISION)
        s = s * scale_log2
        # A NaN or inf score makes the head NaN (reference/mla_decode.py), set at the end
        # rather than left to max(), which may drop NaNs on a GPU; the softmax skips it.
        finite = (s == s) & (tl.abs(s) < float("inf"))
        bad = tl.maximum(bad, tl.max((t_ok[None, :] & ~finite).to(tl.int32), axis=1))
        s = tl.where(t_ok[None, :] & finite, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # Only skipped (bad) pages leave a row at -inf; exp2 against 0 then gives 0, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_ref[:, None])                           # [BH, BN]
        alpha = tl.exp2(m - m_ref)                                # [BH]
        l = l * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(kv.dtype), kv, acc * alpha[:, None], input_precision=PRECISION)
        m = m_new

    if SINKS:  # with one split; the merge folds them in otherwise (-inf folds in nothing)
        sink = tl.load(sinks_ptr + heads * stride_sink, mask=h_ok, other=0.0) * _LOG2E
        m, l, alpha = _fold_sink(m, l, tl.where(num_splits == 1, sink, float("-inf")))
        acc = acc * alpha[:, None]
    found = l > 0
    l = tl.where(found, l, 1.0)
    out = tl.where(bad[:, None] > 0, float("nan"), acc / l[:, None])
    lse = tl.where(found, (m + tl.log2(l)) * _LN2, float("-inf"))
    lse = tl.where(bad > 0, float("nan"), lse)
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os
             + dc[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=h_ok[:, None] & dc_ok[None, :])
    tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split * stride_ls, lse, mask=h_ok)


@triton.jit
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, sinks_ptr, out_ptr, lse_ptr, Hq, num_splits,
    stride_ob, stride_oh, stride_od, stride_sink,
    DC: tl.constexpr, DC_POW2: tl.constexpr, BLOCK_S: tl.constexpr, SINKS: tl.constexpr,
):
    """out[b, h] = sum_s w_s part_out[b, h, s] / sum_s w_s, w_s = exp(part_lse[b, h, s]);
    lse[b, h] = log(sum_s w_s) (all splits empty: out 0, lse -inf; a split with lse NaN - a
    non-finite score - makes both NaN).

    part_out_ptr: fp32 [B, Hq, num_splits, DC] contiguous; part_lse_ptr: fp32 [B, Hq,
    num_splits] contiguous, natural log. out_ptr: [B, Hq, DC] in q's dtype, strides (stride_ob,
    stride_oh, stride_od); lse_ptr: fp32 [B, Hq] contiguous. BLOCK_S splits are read a step.
    SINKS: sinks_ptr fp32 [Hq] join the denominator, as one more split with out 0.
    """
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    first = (b * Hq + h) * num_splits                             # row of split 0
    dc = tl.arange(0, DC_POW2)
    dc_ok = dc < DC
    m = tl.full((), float("-inf"), tl.float32)
    l = tl.zeros((), tl.float32)
    acc = tl.zeros([DC_POW2], tl.float32)
    bad = tl.zeros((), tl.int32)
    for s0 in range(0, num_splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)                            # [BS]
        lse_s = tl.load(part_lse_ptr + first + s, mask=s < num_splits,
                        other=float("-inf")) * _LOG2E
        bad = tl.maximum(bad, tl.max((lse_s != lse_s).to(tl.int32), axis=0))
        lse_s = tl.where(lse_s == lse_s, lse_s, float("-inf"))
        part = tl.load(part_out_ptr + (first + s)[:, None] * DC + dc[None, :],
                       mask=(s < num_splits)[:, None] & dc_ok[None, :], other=0.0)  # [BS, DCP]
        m_new = tl.maximum(m, tl.max(lse_s, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp2(lse_s - m_ref)                                # [BS]
        alpha = tl.exp2(m - m_ref)
        acc = acc * alpha + tl.sum(w[:, None] * part, axis=0)
        l = l * alpha + tl.sum(w, axis=0)
        m = m_new
    if SINKS:
        m, l, alpha = _fold_sink(m, l, tl.load(sinks_ptr + h * stride_sink) * _LOG2E)
        acc = acc * alpha
    found = l > 0
    l = tl.where(found, l, 1.0)
    out = tl.where(bad > 0, float("nan"), acc / l)
    lse = tl.where(found, (m + tl.log2(l)) * _LN2, float("-inf"))
    tl.store(out_ptr + b * stride_ob + h * stride_oh + dc * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=dc_ok)
    tl.store(lse_ptr + b * Hq + h, tl.where(bad > 0, float("nan"), lse))


def num_splits(programs: int, capacity: int, sms: int, min_split_tokens: int) -> int:
    """Splits per (sequence, head group): enough for ``programs`` * splits to fill ``sms``
    multiprocessors, none shorter than ``min_split_tokens`` of the table's ``capacity``."""
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(sms, programs), capacity // min_split_tokens))


def _widths(Dc, Dr):
    """Tile widths of the latent and rope parts: powers of two, at least tl.dot's 16."""
    return max(16, triton.next_power_of_2(Dc)), max(16, triton.next_power_of_2(Dr))


def fits(config, Dc, Dr, dtype, device) -> bool:
    """Whether a launch with ``config`` stays within the device's shared memory and, by a
    register estimate, its registers (both calibrated on offline builds, see above)."""
    dc_p, dr_p = _widths(Dc, Dr)
    shared = 2 * config["BLOCK_N"] * (dc_p + dr_p) * dtype.itemsize + _SHARED_EXTRA
    registers = (_BLOCK_H * dc_p + config["BLOCK_N"] * (dc_p + dr_p) * dtype.itemsize / 4) / (
        32 * config["num_warps"])  # the fp32 accumulator and the K/V dot operand, per thread
    return (config["BLOCK_N"] >= 16 and shared <= tuning.shared_memory_bytes(device)
            and registers <= _REGISTER_WORDS)


def _config(op, B, Hq, Dc, Dr, page, dtype, fp8, device) -> dict:
    """BLOCK_N, min_split_tokens, num_warps, num_stages: tuned for this batch-size bucket, else
    the heuristic. FP8 caches are tuned apart (as kernel "fp8_cache")."""
    if device.type == "cpu":
        default = _INTERPRETER
    else:
        block_n = _FP8_BLOCK_N if fp8 else 32 if dtype.itemsize <= 2 else 16
        default = dict(_GPU, BLOCK_N=block_n)
    kernel = "fp8_cache" if fp8 else None
    key = tuning.shape_key(op, kernel, Hq=Hq, Dc=Dc, Dr=Dr, page=page)
    return tuning.config(op, "triton", key, B, dtype, device, default, kernel=kernel)


def _sms(device) -> int:
    if device.type == "cpu":
        return _INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def mla_decode(q_nope, q_pe, kv_cache, block_table, cache_seqlens, softmax_scale):
    return attend(q_nope, q_pe, kv_cache, block_table, cache_seqlens, softmax_scale)


def attend(q_nope, q_pe, kv_cache, table, cache_seqlens, softmax_scale, *, sinks=None):
    """mla_decode (table: block_table, cache_seqlens given) or sparse_mla (table: the slots,
    cache_seqlens None): one launch of the attention kernel, and the merge where it splits."""
    sparse = cache_seqlens is None
    B, Hq, Dc = q_nope.shape
    Dr = q_pe.shape[2]
    num_blocks, page = kv_cache.shape[:2]
    fp8 = is_fp8(kv_cache)
    out = q_nope.new_empty(B, Hq, Dc)
    lse = torch.empty(B, Hq, dtype=torch.float32, device=q_nope.device)
    if B == 0:
        return out, lse
    config = _config("sparse_mla" if sparse else "mla_decode", B, Hq, Dc, Dr, page,
                     q_nope.dtype, fp8, q_nope.device)
    head_groups = triton.cdiv(Hq, _BLOCK_H)
    capacity = table.shape[1] * (1 if sparse else page)           # rows a program may read
    splits = num_splits(B * head_groups, capacity, _sms(q_nope.device),
                        config["min_split_tokens"])
    if splits == 1:  # the partials are the answer
        part_out, part_lse = out.unsqueeze(2), lse.unsqueeze(2)
    else:
        part_out = torch.empty(B, Hq, splits, Dc, dtype=torch.float32, device=out.device)
        part_lse = torch.empty(B, Hq, splits, dtype=torch.float32, device=out.device)
    seqlens = table if sparse else cache_seqlens  # (not read when sparse)
    sinks_arg = lse if sinks is None else sinks   # (not read without sinks)
    dc_p, dr_p = _widths(Dc, Dr)
    fp32_precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    _mla_decode_kernel[(B, head_groups, splits)](
        q_nope, q_pe, kv_cache, table, seqlens, sinks_arg, part_out, part_lse,
        Hq, num_blocks, table.shape[1], splits, softmax_scale * _LOG2E.value,
        *q_nope.stride(), *q_pe.stride(), *kv_cache.stride(), *table.stride(),
        seqlens.stride(0), *part_out.stride(), *part_lse.stride(), sinks_arg.stride(-1),
        DC=Dc, DR=Dr, DC_POW2=dc_p, DR_POW2=dr_p, PAGE=page, BLOCK_H=_BLOCK_H,
        BLOCK_N=config["BLOCK_N"],
        PRECISION=fp32_precision if q_nope.dtype == torch.float32 else "ieee",
        UPCAST=q_nope.dtype == torch.bfloat16 and q_nope.device.type == "cpu", FP8=fp8,
        SPARSE=sparse, SINKS=sinks is not None,
        num_warps=config["num_warps"], num_stages=config["num_stages"])
    if splits > 1:
        _merge_splits_kernel[(B, Hq)](
            part_out, part_lse, sinks_arg, out, lse, Hq, splits, *out.stride(),
            sinks_arg.stride(-1),
            DC=Dc, DC_POW2=triton.next_power_of_2(Dc),
            BLOCK_S=min(16, triton.next_power_of_2(splits)), SINKS=sinks is not None)
    return out, lse
