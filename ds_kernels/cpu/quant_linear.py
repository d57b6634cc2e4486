"""quant_linear on the torch path. The weight stays quantised in memory (a byte or half a byte a
weight) and is dequantised one chunk of rows at a time (ds_kernels/cpu/quantize.py:
dequantize_rows), each chunk multiplied while it is still in cache: the whole fp32/bf16 weight
never exists.

Compute dtype: fp32 chunks for fp16/fp32 activations, and for bf16 ones at few tokens (a GEMV
is bound by reading the chunk, and converting it to bf16 would be one more pass); bf16 chunks
for bf16 activations from BF16_GEMM_MIN_ROWS rows, where bf16's GEMM (~3x fp32's on AVX-512 BF16)
pays for the conversion (each weight then rounded to bf16 once, as a bf16 checkpoint holds it;
the GEMM accumulates in fp32). fp64 stays fp64. The output is rounded to x's dtype.

Dequantising costs ~0.6-0.7 ns a weight on one core in microbenchmarks (ds_kernels/cpu/
quantize.py), whatever T is: several times what a memory-bound bf16 GEMV spends a weight. So at
small T this path is slower than a linear on the dequantised weight (~3-6x at T = 1 in
bench/bench_quant_linear.py on the contended dev machine) while holding 2-4x less memory; at T
in the thousands the GEMM dominates (~0.8-0.9x there).
"""

import torch

from ds_kernels import tuning
from ds_kernels.cpu.quantize import chunk_rows, dequantize_rows
from ds_kernels.quant_formats import format_of, in_features

# Weights dequantised per chunk, at least: 2^18 (1 MB as fp32: 128 rows of K = 2048) stays in
# a Zen 4 core's L2 with its codes. Measured on the 2-core EPYC dev machine (one thread,
# N = K = 2048, contended): 2^18-2^19 fastest at T = 1 and 16; 2^15 pays each chunk's ~6
# torch calls, 2^21 spills out of L2.
CHUNK_ELEMENTS = 1 << 18
# With many tokens a chunk grows to as many weights as the activations hold, up to 2^20 (4 MB
# as fp32, in L3): the GEMM then streams the activations fewer times. At T = 4096: 2^18
# chunks ~1.2x slower than 2^20; 2^22 (the whole 2048^2 weight) no faster than 2^20.
MAX_CHUNK_ELEMENTS = 1 << 20
# From this many rows of bf16 activations the chunks are bf16. Measured (one thread, N = K =
# 2048): fp32 chunks ~1.4x faster at T = 1 and 4, bf16 ones ~1.15x at 16 and ~1.3x at 64.
BF16_GEMM_MIN_ROWS = 16


def _compute_dtype(dtype, rows):
    if dtype == torch.bfloat16:
        return torch.bfloat16 if rows >= BF16_GEMM_MIN_ROWS else torch.float32
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(w_q, rows):
    """Rows of W per chunk for activations ``rows`` [M, K]."""
    fmt = format_of(w_q)
    N, K = w_q.shape[0], in_features(w_q, fmt)
    key = tuning.shape_key("quant_linear", fmt=fmt, N=N, K=K)
    default = min(max(CHUNK_ELEMENTS, rows.numel()), MAX_CHUNK_ELEMENTS)
    elements = tuning.config("quant_linear", "torch", key, rows.shape[0], rows.dtype,
                             rows.device, dict(chunk_elements=default))["chunk_elements"]
    return chunk_rows(fmt, K, elements)


def quant_linear(x, w_q, scale, bias=None):
    N, K = w_q.shape[0], x.shape[-1]
    rows = x.reshape(-1, K)                                        # [M, K]
    compute = _compute_dtype(x.dtype, rows.shape[0])
    a = rows.to(compute)
    out = a.new_empty(rows.shape[0], N)                            # [M, N]
    step = _chunk_rows(w_q, rows)
    for start in range(0, N, step):
        end = min(N, start + step)
        w = dequantize_rows(w_q, scale, start, end).to(compute)    # [end - start, K]
        # out[:, start:end] is a strided block of out: BLAS writes it in place (ldc = N).
        if bias is None:
            torch.mm(a, w.T, out=out[:, start:end])
        else:
            torch.addmm(bias[start:end].to(compute), a, w.T, out=out[:, start:end])
    return out.to(x.dtype).view(*x.shape[:-1], N)


def quant_linear_backward(grad_out, w_q, scale):
    N, K = w_q.shape[0], in_features(w_q, format_of(w_q))
    grads = grad_out.reshape(-1, N)                                # [M, N]
    compute = _compute_dtype(grad_out.dtype, grads.shape[0])
    grads = grads.to(compute)
    # Summed over the chunks of N in fp32 at least, whatever the compute dtype.
    d_x = grads.new_zeros(grads.shape[0], K, dtype=torch.promote_types(compute, torch.float32))
    step = _chunk_rows(w_q, grads)
    for start in range(0, N, step):
        end = min(N, start + step)
        w = dequantize_rows(w_q, scale, start, end).to(compute)    # [end - start, K]
        d_x += grads[:, start:end] @ w
    return d_x.to(grad_out.dtype).view(*grad_out.shape[:-1], K)
