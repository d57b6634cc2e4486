"""Grouped GEMM kernels shared by grouped_mm and fused_moe, forward and backward.

Rows reach the kernels through moe_align's layout: ``slot_ids`` lists row ids grouped by
expert, each expert's run padded to a multiple of BLOCK_M with a sentinel, and
``block_expert`` names the expert of each BLOCK_M-slot block. So one program multiplies one
expert's block, whatever the routing, and no launch waits on the device for sizes.

  _grouped_gemm_kernel   C[rows] = A[rows] @ B[e]       (forward, and d(input) in backward)
      A rows: row id // A_ROW_DIV (gathers token rows for top-k assignments), or the slot;
      C rows: row id (scatter) or the slot; optional SwiGLU and per-row scale epilogues.
  _grouped_wgrad_kernel  D[e] = sum over e's rows of A[row]^T @ G[row]   (d(weight))

B may be a quantised weight (FP8 blocks or MXFP4; ds_kernels/quant_formats.py), the same
kernel with QUANT_B: each B tile is decoded from its code bytes and scales in the K-loop
(ds_kernels/kernels/quant.py), rounded to A's dtype and fed to tl.dot, accumulating in fp32.
Weight-only: A stays unquantised, so this runs on any GPU and in the interpreter. With W8A8
(FP8 weights, forward GEMMs) the A tile is quantised instead, per row and 128 columns as it is
gathered (DeepSeek's act_quant, DeepGEMM's recipe; BLOCK_K = 128 is one scale group), and the
e4m3 codes of A and B meet in an FP8 tensor-core tl.dot (sm_89+), each partial product scaled
by its row's and column's scales. Quantised weights are frozen: there is no d(weight) for them
(_grouped_wgrad_kernel is plain only).

Address arithmetic on rows and experts is 64-bit: rows x columns passes 2**31 in DeepSeek-V3
prefill at ~37K tokens, where 32-bit offsets read out of bounds.
"""

import torch
import triton
import triton.language as tl

from ds_kernels import tuning
from ds_kernels.kernels.moe_align import moe_align
from ds_kernels.kernels.quant import e8m0_to_fp32, fp8_quantize_rows, weight_tile
from ds_kernels.quant_formats import FP8, FP8_BLOCK, MXFP4, SCALE_BLOCK, format_of
from ds_kernels.tuning import gemm_config


@triton.jit
def _row_offsets(ids, slots, sentinel, ROW_DIV: tl.constexpr, BY_SLOT: tl.constexpr):
    """Row index (int64) of each slot's row in a matrix addressed by id // ROW_DIV or slot."""
    if BY_SLOT:
        return slots.to(tl.int64)
    return (tl.where(ids < sentinel, ids, 0) // ROW_DIV).to(tl.int64)


@triton.jit
def _b_tile(b_ptr, s_ptr, k, n, ok, stride_bk, stride_bn, stride_sk, stride_sn,
            QUANT_B: tl.constexpr, B_TRANSPOSED: tl.constexpr, FP4: tl.constexpr,
            E8M0_SCALES: tl.constexpr, SCALE_ROWS: tl.constexpr, SCALE_COLS: tl.constexpr):
    """B[k, n] for index tensors k, n that broadcast to the tile (0 where not ok): loaded, or
    decoded from the quantised weight W (B = W^T or W; see _grouped_gemm_kernel)."""
    if not QUANT_B:
        return tl.load(b_ptr + k * stride_bk + n * stride_bn, mask=ok, other=0.0)
    if B_TRANSPOSED:  # B[k, n] = W[n, k]
        return weight_tile(b_ptr, s_ptr, n, k, ok, stride_bn, stride_bk, stride_sn, stride_sk,
                           FP4, E8M0_SCALES, SCALE_ROWS, SCALE_COLS)
    return weight_tile(b_ptr, s_ptr, k, n, ok, stride_bk, stride_bn, stride_sk, stride_sn,
                       FP4, E8M0_SCALES, SCALE_ROWS, SCALE_COLS)


@triton.jit
def _w8a8_partial(a_q, a_scale, b_ptr, s_ptr, k, k0, n, k_ok, n_ok, stride_bk, stride_bn,
                  stride_sk, stride_sn, E8M0_SCALES: tl.constexpr):
    """fp32 A_q @ B_q * a_scale[m] * b_scale[n] for B = W^T of an FP8 weight W: k [BK] in the
    scale group of K from k0, n [BN] columns (codes 0 where not k_ok, n_ok)."""
    rows, cols = k.to(tl.int64), n.to(tl.int64)  # one expert's codes may pass 2**31 bytes
    b_q = tl.load(b_ptr + rows[:, None] * stride_bk + cols[None, :] * stride_bn,
                  mask=k_ok[:, None] & n_ok[None, :], other=0).to(tl.float8e4nv, bitcast=True)
    s_ptrs = s_ptr + (k0 // 128) * stride_sk + (n // 128) * stride_sn          # [BN]
    if E8M0_SCALES:
        b_scale = e8m0_to_fp32(tl.load(s_ptrs, mask=n_ok, other=127).to(tl.int32))
    else:
        b_scale = tl.load(s_ptrs, mask=n_ok, other=0.0)
    return tl.dot(a_q, b_q, out_dtype=tl.float32) * (a_scale[:, None] * b_scale[None, :])


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, slot_ids_ptr, block_expert_ptr, num_slots_ptr, row_scale_ptr,
    s_ptr, N, K, sentinel, num_blocks, limit,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_se, stride_sk, stride_sn,
    A_ROW_DIV: tl.constexpr, A_BY_SLOT: tl.constexpr, C_BY_SLOT: tl.constexpr,
    SWIGLU: tl.constexpr, CLAMP: tl.constexpr, ROW_SCALE: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    QUANT_B: tl.constexpr, B_TRANSPOSED: tl.constexpr, FP4: tl.constexpr,
    E8M0_SCALES: tl.constexpr, SCALE_ROWS: tl.constexpr, SCALE_COLS: tl.constexpr,
    W8A8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[r, :N] = epilogue(A[r, :K] @ B[e][:K, :N]) for the rows r of each expert e.

    a_ptr: A, strides (stride_am, stride_ak). b_ptr: B [E, K, N'] with strides (stride_be,
    stride_bk, stride_bn) - any view, e.g. a transposed [E, N', K] weight. With SWIGLU,
    N' = 2N: gate columns [0, N), up columns [N, 2N), and C = silu(gate) * up; with CLAMP
    (DeepSeek-V4), of gate clamped to <= limit and up to [-limit, limit] (NaN kept).
    c_ptr: C, strides (stride_cm, stride_cn). slot_ids_ptr: int32 [num_blocks * BLOCK_M] row
    ids, `sentinel` for padding. block_expert_ptr: int32 [num_blocks]. num_slots_ptr: int32
    [1], slots in use. row_scale_ptr: [sentinel] in ACC, C row r is multiplied by it (ROW_SCALE).
    PRECISION: tl.dot input precision for fp32 operands ("ieee" or "tf32"). ACC: accumulator
    dtype, fp32 (fp64 for fp64 operands, which gradcheck uses; triton 3.6 needs it spelled out
    as tl.dot's out_dtype).
    QUANT_B: b_ptr holds a quantised weight W's code bytes (uint8, strides in bytes) and s_ptr
    its scales, strides (stride_se, stride_sk, stride_sn) along B's dims; else s_ptr is unused.
    B_TRANSPOSED: B = W^T (B[k, n] = W[n, k], W [E, N', K] quantised along K: the forward
    GEMMs), else B = W (W [E, K, N'] quantised along N': the d(input) GEMMs of a backward).
    FP4: MXFP4 codes, two a byte along W's in-features (so B's packed dim is K, or N' when not
    B_TRANSPOSED), else FP8. E8M0_SCALES: scales are e8m0 bytes, else fp32. SCALE_ROWS,
    SCALE_COLS: W's rows and in-feature columns one scale covers (128, 128 or 1, 32).
    W8A8: FP8 B = W^T, BLOCK_K = 128: A quantised to e4m3 per row and 128 columns (the scale
    group of its tile), multiplied on FP8 tensor cores.
    """
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # GROUP_M blocks of rows share each column tile of B while it is in L2.
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    if pid_m * BLOCK_M >= tl.load(num_slots_ptr):
        return

    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)              # [BM]
    ids = tl.load(slot_ids_ptr + slots)
    row_ok = ids < sentinel
    a_rows = _row_offsets(ids, slots, sentinel, A_ROW_DIV, A_BY_SLOT)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                   # [BN]
    n_ok = n < N
    kk = tl.arange(0, BLOCK_K)                                    # [BK]
    b_base = b_ptr + expert * stride_be
    s_base = s_ptr + expert * stride_se

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        k_ok = k < K
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if W8A8:
            a_q, a_scale = fp8_quantize_rows(a.to(tl.float32))
            acc += _w8a8_partial(a_q, a_scale, b_base, s_base, k, k0, n, k_ok, n_ok, stride_bk,
                                 stride_bn, stride_sk, stride_sn, E8M0_SCALES).to(ACC)
            if SWIGLU:
                up += _w8a8_partial(a_q, a_scale, b_base, s_base, k, k0, n + N, k_ok, n_ok,
                                    stride_bk, stride_bn, stride_sk, stride_sn,
                                    E8M0_SCALES).to(ACC)
        else:
            b_ok = k_ok[:, None] & n_ok[None, :]
            b = _b_tile(b_base, s_base, k[:, None], n[None, :], b_ok, stride_bk, stride_bn,
                        stride_sk, stride_sn, QUANT_B, B_TRANSPOSED, FP4, E8M0_SCALES,
                        SCALE_ROWS, SCALE_COLS)
            acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION, out_dtype=ACC)
            if SWIGLU:
                b_up = _b_tile(b_base, s_base, k[:, None], (n + N)[None, :], b_ok, stride_bk,
                               stride_bn, stride_sk, stride_sn, QUANT_B, B_TRANSPOSED, FP4,
                               E8M0_SCALES, SCALE_ROWS, SCALE_COLS)
                up = tl.dot(a, b_up.to(a.dtype), up, input_precision=PRECISION, out_dtype=ACC)

    if SWIGLU:
        if CLAMP:  # comparisons, not min/max, so that a NaN stays NaN as in torch.clamp
            acc = tl.where(acc > limit, limit, acc)
            up = tl.where(up > limit, limit, tl.where(up < -limit, -limit, up))
        acc = acc * tl.sigmoid(acc) * up
    if ROW_SCALE:
        acc = acc * tl.load(row_scale_ptr + ids, mask=row_ok, other=0.0)[:, None]
    c_rows = slots.to(tl.int64) if C_BY_SLOT else ids.to(tl.int64)
    tl.store(c_ptr + c_rows[:, None] * stride_cm + n[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _grouped_wgrad_kernel(
    a_ptr, g_ptr, d_ptr, slot_ids_ptr, run_start_ptr, counts_ptr, row_scale_ptr,
    K, N, sentinel,
    stride_am, stride_ak, stride_gm, stride_gn, stride_de, stride_dk, stride_dn,
    A_ROW_DIV: tl.constexpr, A_BY_SLOT: tl.constexpr, G_ROW_DIV: tl.constexpr,
    G_BY_SLOT: tl.constexpr, ROW_SCALE: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """D[e, :K, :N] = sum over expert e's rows r of (scale[r] *) A[r, :K]^T G[r, :N].

    Program (e, tile) loops over e's run of slots: run_start_ptr/counts_ptr int32 [E] give the
    run's first slot and its real rows. A and G rows are addressed like the forward kernel's A.
    row_scale_ptr: [sentinel] in ACC, multiplies A's rows (ROW_SCALE). d_ptr: D [E, K, N] with
    strides (stride_de, stride_dk, stride_dn); an expert with no rows gets zeros.
    """
    e = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_k = tl.program_id(1) // num_pid_n
    pid_n = tl.program_id(1) % num_pid_n
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)                   # [BK]
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                   # [BN]
    start = tl.load(run_start_ptr + e)
    end = start + tl.load(counts_ptr + e)

    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=ACC)
    for s0 in range(start, end, BLOCK_M):
        slots = s0 + tl.arange(0, BLOCK_M)                       # [BM]
        ids = tl.load(slot_ids_ptr + slots, mask=slots < end, other=sentinel)
        row_ok = ids < sentinel
        a_rows = _row_offsets(ids, slots, sentinel, A_ROW_DIV, A_BY_SLOT)
        g_rows = _row_offsets(ids, slots, sentinel, G_ROW_DIV, G_BY_SLOT)
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=row_ok[:, None] & (k < K)[None, :], other=0.0)
        g = tl.load(g_ptr + g_rows[:, None] * stride_gm + n[None, :] * stride_gn,
                    mask=row_ok[:, None] & (n < N)[None, :], other=0.0)
        if ROW_SCALE:
            scale = tl.load(row_scale_ptr + ids, mask=row_ok, other=0.0)
            a = (a.to(ACC) * scale[:, None]).to(g.dtype)
        acc = tl.dot(tl.trans(a), g, acc, input_precision=PRECISION, out_dtype=ACC)
    tl.store(d_ptr + e.to(tl.int64) * stride_de + k[:, None] * stride_dk + n[None, :] * stride_dn,
             acc.to(d_ptr.dtype.element_ty), mask=(k < K)[:, None] & (n < N)[None, :])


FP8_TENSOR_CORES = (8, 9)  # sm_89 (Ada) and newer multiply e4m3 on tensor cores


def check_fp8_tensor_cores(device):
    """Raise if ``device`` is a GPU without FP8 tensor cores (the interpreter has them all)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < FP8_TENSOR_CORES:
        major, minor = torch.cuda.get_device_capability(device)
        raise RuntimeError(f"act_quant='fp8' multiplies on FP8 tensor cores (sm_89 or newer); "
                           f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}: use "
                           "act_quant=None (weight-only FP8, any GPU)")


# The quantisation constexprs of a plain B: unused, fixed so that they compile one kernel.
_PLAIN_B = dict(B_TRANSPOSED=True, FP4=False, E8M0_SCALES=False, SCALE_ROWS=1, SCALE_COLS=1,
                W8A8=False)


def _precision(dtype) -> str:
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _launch_options(config, dtype):
    return dict(num_warps=config["num_warps"], num_stages=config["num_stages"],
                PRECISION=_precision(dtype), ACC=tl.float64 if dtype == torch.float64 else tl.float32)


def grouped_gemm(a, b, c, layout, num_rows, config, *, a_row_div=1, a_by_slot=False,
                 c_by_slot=False, swiglu=False, swiglu_limit=None, row_scale=None,
                 b_scale=None, b_transposed=True, w8a8=False):
    """C rows of each expert's rows = epilogue(A rows @ B[e]); see _grouped_gemm_kernel.

    layout: moe_align's output for num_rows row ids (its sentinel), made with block_m ==
    config["BLOCK_M"]. b: [E, K, N'] (any strides); or, with b_scale, a quantised weight in B's
    orientation: b_transposed - B = W^T, b = w_q.transpose(1, 2) of w_q [E, N', K] (MXFP4:
    [E, K/2, N']) and b_scale = scale.transpose(1, 2); else B = W, b = w_q [E, K, N'] (MXFP4:
    [E, K, N'/2]) and b_scale = scale. w8a8: A quantised to e4m3 too (FP8 b, b_transposed,
    config["BLOCK_K"] == 128; FP8 tensor cores). swiglu_limit: with swiglu, V4's clamp.
    Returns c.
    """
    sorted_ids, block_expert, num_slots, _ = layout
    fmt = None if b_scale is None else format_of(b)
    packed = 2 if fmt == MXFP4 else 1
    K = b.shape[1] * (packed if b_transposed else 1)
    N = b.shape[2] * (1 if b_transposed else packed) // (2 if swiglu else 1)
    num_blocks = block_expert.shape[0]
    if num_blocks == 0 or N == 0:
        return c
    if fmt is None:
        scales, scale_strides, quant = c, (0, 0, 0), _PLAIN_B
    else:
        e8m0 = b_scale.dtype != torch.float32
        b, scales = b.view(torch.uint8), b_scale.view(torch.uint8) if e8m0 else b_scale
        scale_strides = scales.stride()
        scale_rows, scale_cols = SCALE_BLOCK[fmt]
        quant = dict(B_TRANSPOSED=b_transposed, FP4=fmt == MXFP4, E8M0_SCALES=e8m0,
                     SCALE_ROWS=scale_rows, SCALE_COLS=scale_cols, W8A8=w8a8)
    if w8a8 and not (fmt == FP8 and b_transposed and config["BLOCK_K"] == FP8_BLOCK):
        raise ValueError(f"w8a8 needs FP8 weights (got {fmt}), B = W^T and BLOCK_K = {FP8_BLOCK} "
                         f"(got {config['BLOCK_K']})")
    grid = (num_blocks * triton.cdiv(N, config["BLOCK_N"]),)
    _grouped_gemm_kernel[grid](
        a, b, c, sorted_ids, block_expert, num_slots, row_scale if row_scale is not None else c,
        scales, N, K, num_rows, num_blocks, 0.0 if swiglu_limit is None else float(swiglu_limit),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        *scale_strides,
        A_ROW_DIV=a_row_div, A_BY_SLOT=a_by_slot, C_BY_SLOT=c_by_slot, SWIGLU=swiglu,
        CLAMP=swiglu_limit is not None, ROW_SCALE=row_scale is not None, QUANT_B=fmt is not None, **quant,
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
        BLOCK_K=config["BLOCK_K"], GROUP_M=config["GROUP_M"], **_launch_options(config, a.dtype))
    return c


def grouped_wgrad(a, g, d, layout, num_rows, config, *, a_row_div=1, a_by_slot=False, g_row_div=1,
                  g_by_slot=False, row_scale=None):
    """d[e] = sum over expert e's rows of A^T G; see _grouped_wgrad_kernel. Returns d."""
    sorted_ids, _, _, counts = layout
    E, K, N = d.shape
    if E == 0 or K == 0 or N == 0:
        return d
    block_m = config["BLOCK_M"]
    padded = (counts + block_m - 1) // block_m * block_m
    run_start = (padded.cumsum(0) - padded).to(torch.int32)      # [E]
    block_k, block_n = config["BLOCK_K"], config["BLOCK_N"]
    grid = (E, triton.cdiv(K, block_k) * triton.cdiv(N, block_n))
    _grouped_wgrad_kernel[grid](
        a, g, d, sorted_ids, run_start, counts, row_scale if row_scale is not None else d,
        K, N, num_rows,
        a.stride(0), a.stride(1), g.stride(0), g.stride(1), d.stride(0), d.stride(1), d.stride(2),
        A_ROW_DIV=a_row_div, A_BY_SLOT=a_by_slot, G_ROW_DIV=g_row_div, G_BY_SLOT=g_by_slot,
        ROW_SCALE=row_scale is not None, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n,
        **_launch_options(config, a.dtype))
    return d


def _offs_layout(offs, M, config):
    """moe_align's layout of the rows of a grouped_mm: row r belongs to the e with
    offs[e-1] <= r < offs[e]; rows past offs[-1] get id E and are excluded."""
    rows = torch.arange(M, device=offs.device, dtype=offs.dtype)
    row_group = torch.searchsorted(offs.contiguous(), rows, right=True).to(torch.int32)  # [M]
    return moe_align(row_group.view(M, 1), offs.shape[0], config["BLOCK_M"])


def grouped_mm(a, b, offs, b_scale=None, w8a8=False):
    M, K = a.shape
    E, N = b.shape[0], b.shape[2]
    out = torch.zeros(M, N, dtype=a.dtype, device=a.device)  # rows past offs[-1] stay 0
    if w8a8:
        check_fp8_tensor_cores(a.device)
    kernel = tuning.gemm_kernel(None if b_scale is None else format_of(b), False, w8a8)
    config = gemm_config("grouped_mm", kernel, dict(E=E, N=N, K=K), M, M / E, N, K, a.dtype,
                         a.device)
    if w8a8:  # a K tile is one activation scale group
        config = tuning.with_block_k(config, FP8_BLOCK, a.dtype, 1, a.device)
    return grouped_gemm(a, b, out, _offs_layout(offs, M, config), M, config, b_scale=b_scale,
                        w8a8=w8a8)


def grouped_mm_backward(grad_out, a, b, offs, b_scale=None):
    """(d a, d b); with b_scale (b quantised, frozen) (d a, None), and a may be None."""
    M, N = grad_out.shape
    E = b.shape[0]
    K = b.shape[1] * (2 if b_scale is not None and format_of(b) == MXFP4 else 1)
    kernel = tuning.gemm_kernel(None if b_scale is None else format_of(b), True)
    config = gemm_config("grouped_mm", kernel, dict(E=E, N=N, K=K), M, M / E, K, N,
                         grad_out.dtype, grad_out.device)
    layout = _offs_layout(offs, M, config)
    grad_a = grad_out.new_zeros(M, K)
    # d a = d out @ b^T; a quantised b is W^T, so its transpose is the weight W itself.
    grouped_gemm(grad_out, b.transpose(1, 2), grad_a, layout, M, config,
                 b_scale=None if b_scale is None else b_scale.transpose(1, 2),
                 b_transposed=False)
    if b_scale is not None:
        return grad_a, None
    grad_b = torch.empty(E, K, N, dtype=b.dtype, device=b.device)
    grouped_wgrad(a, grad_out, grad_b, layout, M, config)
    return grad_a, grad_b
