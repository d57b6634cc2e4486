"""quant_linear: a GEMM whose weight tiles are dequantised in the K-loop, weight-only.

    forward   out [M, N] = x [M, K] @ W^T + bias      (reduce over K)
    backward  d x [M, K] = d out [M, N] @ W            (reduce over N; no d W: frozen weights)

One kernel does both: it computes out [M, J] = A [M, R] @ W' [R, J], with W' = W^T (forward)
or W (backward), reading W[n, k] wherever the tile needs it. Activations stay unquantised; each
weight tile is decoded to fp32 (code times its scale), rounded to the activations' dtype and fed
to tl.dot, accumulating in fp32. fp16 activations therefore see an fp16 weight tile: weights
below ~6e-8 flush to 0, as in any fp16 checkpoint.

Codes are decoded from bytes in the K-loop by ds_kernels/kernels/quant.py (weight_tile), which
the grouped GEMM of grouped_mm / fused_moe shares: any tile shape works in both directions.
Row addressing is 64-bit, like the weight's.
"""

import torch
import triton
import triton.language as tl

from ds_kernels import tuning
from ds_kernels.kernels.quant import weight_tile
from ds_kernels.quant_formats import MXFP4, SCALE_BLOCK, format_of, in_features


@triton.jit
def _quant_linear_kernel(
    a_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, M, J, R,
    stride_am, stride_ar, stride_wn, stride_wk, stride_sn, stride_sk, stride_om, stride_oj,
    FP4: tl.constexpr, E8M0_SCALES: tl.constexpr, SCALE_ROWS: tl.constexpr,
    SCALE_COLS: tl.constexpr, BACKWARD: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[m, j] = sum over r of A[m, r] W'[r, j] (+ bias[j]) for one BLOCK_M x BLOCK_N tile.

    a_ptr: A [M, R] (x, or d out in backward), strides (stride_am, stride_ar), fp16/bf16/fp32/
    fp64. w_ptr: the weight's code bytes, W [N, K] as uint8 [N, K] (FP8) or [N, K/2] (MXFP4, the
    even k in the low nibble), strides (stride_wn, stride_wk) in bytes. s_ptr: scales
    [ceil(N / SCALE_ROWS), ceil(K / SCALE_COLS)], strides (stride_sn, stride_sk): fp32, or e8m0
    bytes (E8M0_SCALES). bias_ptr: [J] contiguous, any float dtype (HAS_BIAS; else unused).
    out_ptr: [M, J], strides (stride_om, stride_oj), A's dtype. J, R: N, K (forward) or K, N
    (BACKWARD: W' = W, the reduction runs over N). FP4: MXFP4 codes, else FP8. SCALE_ROWS,
    SCALE_COLS: the rows and columns of W one scale covers (128, 128 or 1, 32). PRECISION:
    tl.dot input precision for fp32 ("ieee" or "tf32"). ACC: accumulator dtype (fp32; fp64 for
    fp64 A). BLOCK_N: the tile's J width; BLOCK_K: its reduction depth. GROUP_M: rows of tiles
    that share W's column tiles while they are in L2.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_j = tl.cdiv(J, BLOCK_N)
    per_group = GROUP_M * num_pid_j
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_j = (pid % per_group) // group_rows

    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                   # [BM]
    m_ok = m < M
    j = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)                   # [BN]
    j_ok = j < J
    a_rows = a_ptr + m.to(tl.int64)[:, None] * stride_am
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for r0 in range(0, R, BLOCK_K):
        r = r0 + tl.arange(0, BLOCK_K)                            # [BK]
        r_ok = r < R
        a = tl.load(a_rows + r[None, :].to(tl.int64) * stride_ar,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)  # [BM, BK]
        ok = r_ok[:, None] & j_ok[None, :]
        if BACKWARD:  # W'[r, j] = W[r, j]
            w = weight_tile(w_ptr, s_ptr, r[:, None], j[None, :], ok, stride_wn, stride_wk,
                            stride_sn, stride_sk, FP4, E8M0_SCALES, SCALE_ROWS, SCALE_COLS)
        else:         # W'[r, j] = W[j, r]
            w = weight_tile(w_ptr, s_ptr, j[None, :], r[:, None], ok, stride_wn, stride_wk,
                            stride_sn, stride_sk, FP4, E8M0_SCALES, SCALE_ROWS, SCALE_COLS)
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + j, mask=j_ok, other=0.0).to(ACC)[None, :]
    tl.store(out_ptr + m.to(tl.int64)[:, None] * stride_om + j[None, :] * stride_oj,
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & j_ok[None, :])


def _config(kernel, fmt, M, N, K, J, R, dtype, device):
    """BLOCK_M/N/K, GROUP_M, num_warps, num_stages: tuning's GEMM heuristic for an [M, R] x
    [R, J] product, a stored or overridden config where there is one."""
    default = tuning.gemm_heuristic(tuning.bucket(M), J, R, dtype,
                                    tuning.shared_memory_bytes(device))
    key = tuning.shape_key("quant_linear", kernel, fmt=fmt, N=N, K=K)
    return tuning.config("quant_linear", "triton", key, M, dtype, device, default,
                         kernel=kernel)


def _launch(a, w_q, scale, bias, out, J, R, backward, config):
    fmt = format_of(w_q)
    codes = w_q.view(torch.uint8)
    e8m0 = scale.dtype != torch.float32
    scales = scale.view(torch.uint8) if e8m0 else scale
    M = a.shape[0]
    grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(J, config["BLOCK_N"]),)
    scale_rows, scale_cols = SCALE_BLOCK[fmt]
    precision = ("tf32" if a.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
                 else "ieee")
    _quant_linear_kernel[grid](
        a, codes, scales, bias.contiguous() if bias is not None else out, out, M, J, R,
        a.stride(0), a.stride(1), codes.stride(0), codes.stride(1), scales.stride(0),
        scales.stride(1), out.stride(0), out.stride(1),
        FP4=fmt == MXFP4, E8M0_SCALES=e8m0, SCALE_ROWS=scale_rows, SCALE_COLS=scale_cols,
        BACKWARD=backward, HAS_BIAS=bias is not None, PRECISION=precision,
        ACC=tl.float64 if a.dtype == torch.float64 else tl.float32,
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        GROUP_M=config["GROUP_M"], num_warps=config["num_warps"],
        num_stages=config["num_stages"])
    return out


def quant_linear(x, w_q, scale, bias=None):
    fmt = format_of(w_q)
    N, K = w_q.shape[0], x.shape[-1]
    rows = x.reshape(-1, K)                                        # [M, K], a view if it can be
    out = torch.empty(rows.shape[0], N, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        config = _config(None, fmt, rows.shape[0], N, K, N, K, x.dtype, x.device)
        _launch(rows, w_q, scale, bias, out, N, K, False, config)
    return out.view(*x.shape[:-1], N)


def quant_linear_backward(grad_out, w_q, scale):
    fmt = format_of(w_q)
    N, K = w_q.shape[0], in_features(w_q, fmt)
    grads = grad_out.reshape(-1, N)                                # [M, N]
    d_x = torch.empty(grads.shape[0], K, dtype=grad_out.dtype, device=grad_out.device)
    if grads.shape[0]:
        config = _config("backward", fmt, grads.shape[0], N, K, K, N, grad_out.dtype,
                         grad_out.device)
        _launch(grads, w_q, scale, None, d_x, K, N, True, config)
    return d_x.view(*grad_out.shape[:-1], K)
