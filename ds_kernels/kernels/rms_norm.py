"""RMSNorm forward and backward (transformers' DeepseekV3RMSNorm semantics and order of casts:
see ds_kernels/reference/rms_norm.py).

Rows are x viewed as [N, D]. A program owns BLOCK_ROWS rows and one BLOCK_D-wide column tile of
them: grid (row blocks, column tiles). When D fits one tile - every DeepSeek-V3 norm does
(hidden 7168, q_lora 1536, latent 512) - the tile is read once and stays in registers. Wider
rows are tiled (TILED): each program still needs its rows' whole sum of squares, so it also
reads the rows' other tiles for that sum (D / BLOCK_D times the reads of x; rows that wide are
rare).

Backward: d x needs two whole-row sums (of x^2 and of dy w x); d weight a sum over rows. A
program owns one column tile and every num_programs-th row block, keeps its share of d weight
in registers and stores it as one row of a [programs, D] buffer that is summed afterwards, in
a fixed order: deterministic, no atomics.

inv_rms and apply_norm are shared with the fused MLA cache write (kernels/mla_cache_write.py).
"""

import torch
import triton
import triton.language as tl

# Widest column tile: a whole DeepSeek-V3 hidden row (7168 -> 8192 lanes) is one tile. Wider
# rows are cut into tiles of half this: there the other tiles' loads are live beside d weight's
# accumulator, and an 8192-wide backward tile would spill (ptxas for sm_90; 4096 does not).
_MAX_BLOCK_D = 8192
# Elements of x a program holds: rows per program = this // BLOCK_D (16 rows of the 512-wide
# latent; one hidden row). 8192 fp32 over 16 warps (_num_warps) is 16 registers a thread per
# live tile.
_TILE_ELEMENTS = 8192
_MAX_BLOCK_ROWS = 16
# Backward programs per SM: each stores a D-wide fp32 partial of d weight, so enough programs
# to fill the GPU and no more (not tuned yet). Off CUDA (the interpreter) a fixed count.
_PROGRAMS_PER_SM = 2
_PROGRAMS_OFF_CUDA = 16


@triton.jit
def load_tile(ptr, rows, row_ok, cols, D, stride_r, stride_d, ACC: tl.constexpr):
    """[rows, cols] of a 2-D tensor, in ACC; 0 outside the rows in use and past column D."""
    ok = row_ok[:, None] & (cols < D)[None, :]
    offsets = rows.to(tl.int64)[:, None] * stride_r + cols[None, :] * stride_d
    return tl.load(ptr + offsets, mask=ok, other=0.0).to(ACC)


@triton.jit
def inv_rms(sum_squares, D, eps):
    """1 / sqrt(mean(x^2) + eps) of each row, from its sum of squares."""
    return tl.rsqrt(sum_squares / D + eps)


@triton.jit
def apply_norm(x, inv, w, X_DTYPE: tl.constexpr):
    """w * (x * inv rounded to X_DTYPE): transformers' order, where the normalised row is cast
    back to the input dtype before the weight multiplies it. x [R, C], inv [R], w [C]."""
    n = (x * inv[:, None]).to(X_DTYPE).to(x.dtype)
    return w[None, :] * n


@triton.jit
def _row_sums(x_ptr, g_ptr, w_ptr, rows, row_ok, lo, hi, D, stride_xn, stride_xd, stride_gn,
              stride_gd, WITH_GRAD: tl.constexpr, BLOCK_ROWS: tl.constexpr,
              BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """Per-row sums over columns [lo, hi) of x^2 and (WITH_GRAD) of dy * w * x."""
    sum_xx = tl.zeros((BLOCK_ROWS,), dtype=ACC)
    sum_gwx = tl.zeros((BLOCK_ROWS,), dtype=ACC)
    for d0 in range(lo, hi, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x = load_tile(x_ptr, rows, row_ok, cols, D, stride_xn, stride_xd, ACC)
        sum_xx += tl.sum(x * x, axis=1)
        if WITH_GRAD:
            g = load_tile(g_ptr, rows, row_ok, cols, D, stride_gn, stride_gd, ACC)
            w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(ACC)
            sum_gwx += tl.sum(g * w[None, :] * x, axis=1)
    return sum_xx, sum_gwx


@triton.jit
def _rms_norm_kernel(
    x_ptr, w_ptr, y_ptr, N, D, eps, stride_xn, stride_xd,
    TILED: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """y = rms_norm(x) for BLOCK_ROWS rows, one column tile.

    x_ptr: [N, D], strides (stride_xn, stride_xd). w_ptr: [D] contiguous, any float dtype.
    y_ptr: [N, D] contiguous, x's dtype. TILED: D > BLOCK_D, the rows' other tiles are read
    for their sums of squares (compiled out otherwise). ACC: fp32 (fp64 for fp64 x).
    """
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)   # [BR]
    row_ok = rows < N
    start = tl.program_id(1) * BLOCK_D
    cols = start + tl.arange(0, BLOCK_D)                                # [BD]
    others = tl.zeros((BLOCK_ROWS,), dtype=ACC)
    if TILED:  # before this tile's loads, so that the two are never live together
        before, _ = _row_sums(x_ptr, x_ptr, w_ptr, rows, row_ok, 0, start, D, stride_xn,
                              stride_xd, 0, 0, False, BLOCK_ROWS, BLOCK_D, ACC)
        after, _ = _row_sums(x_ptr, x_ptr, w_ptr, rows, row_ok, start + BLOCK_D, D, D,
                             stride_xn, stride_xd, 0, 0, False, BLOCK_ROWS, BLOCK_D, ACC)
        others = before + after
    x = load_tile(x_ptr, rows, row_ok, cols, D, stride_xn, stride_xd, ACC)  # [BR, BD]
    inv = inv_rms(tl.sum(x * x, axis=1) + others, D, eps)              # [BR]
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(ACC)
    y = apply_norm(x, inv, w, x_ptr.dtype.element_ty)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :],
             y.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < D)[None, :])


@triton.jit
def _rms_norm_backward_kernel(
    x_ptr, g_ptr, w_ptr, dx_ptr, dw_ptr, N, D, eps, num_row_blocks,
    stride_xn, stride_xd, stride_gn, stride_gd,
    TILED: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """d x for one column tile of the row blocks pid0, pid0 + programs, ...; and their share
    of d weight.

    x_ptr: [N, D], strides (stride_xn, stride_xd). g_ptr: d y [N, D], strides (stride_gn,
    stride_gd). w_ptr: [D] contiguous. dx_ptr: [N, D] contiguous, x's dtype.
    dw_ptr: [programs, D] contiguous in ACC: row pid0 gets this program's sum over its rows of
    dy * n (n rounded to x's dtype, as the forward used it). TILED, ACC: as the forward's.
    """
    start = tl.program_id(1) * BLOCK_D
    cols = start + tl.arange(0, BLOCK_D)                                # [BD]
    col_ok = cols < D
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    d_w = tl.zeros((BLOCK_D,), dtype=ACC)
    for block in range(tl.program_id(0), num_row_blocks, tl.num_programs(0)):
        rows = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)           # [BR]
        row_ok = rows < N
        xx_others = tl.zeros((BLOCK_ROWS,), dtype=ACC)
        gwx_others = tl.zeros((BLOCK_ROWS,), dtype=ACC)
        if TILED:  # before this tile's loads, so that the two are never live together
            xx_before, gwx_before = _row_sums(x_ptr, g_ptr, w_ptr, rows, row_ok, 0, start, D,
                                              stride_xn, stride_xd, stride_gn, stride_gd, True,
                                              BLOCK_ROWS, BLOCK_D, ACC)
            xx_after, gwx_after = _row_sums(x_ptr, g_ptr, w_ptr, rows, row_ok, start + BLOCK_D,
                                            D, D, stride_xn, stride_xd, stride_gn, stride_gd,
                                            True, BLOCK_ROWS, BLOCK_D, ACC)
            xx_others = xx_before + xx_after
            gwx_others = gwx_before + gwx_after
        x = load_tile(x_ptr, rows, row_ok, cols, D, stride_xn, stride_xd, ACC)  # [BR, BD]
        g = load_tile(g_ptr, rows, row_ok, cols, D, stride_gn, stride_gd, ACC)
        gw = g * w[None, :]                                             # d n
        inv = inv_rms(tl.sum(x * x, axis=1) + xx_others, D, eps)       # [BR]
        n = x * inv[:, None]
        mean_gwn = (tl.sum(gw * x, axis=1) + gwx_others) * inv / D     # [BR]
        d_x = inv[:, None] * (gw - n * mean_gwn[:, None])
        tl.store(dx_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :],
                 d_x.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
        d_w += tl.sum(g * n.to(x_ptr.dtype.element_ty).to(ACC), axis=0)
    tl.store(dw_ptr + tl.program_id(0) * D + cols, d_w, mask=col_ok)


def _num_warps(tile_elements):
    # Liger-Kernel's calculate_settings steps. At an 8192-element tile the backward needs ~127
    # registers a thread with 16 warps (ptxas for sm_90), 221 with 8: one program per SM either
    # way, and no spills.
    return 16 if tile_elements >= 8192 else 8 if tile_elements >= 2048 else 4


def _blocks(N, D):
    block_d = triton.next_power_of_2(D)
    if block_d > _MAX_BLOCK_D:
        block_d = _MAX_BLOCK_D // 2
    block_rows = max(1, min(_MAX_BLOCK_ROWS, _TILE_ELEMENTS // block_d,
                            triton.next_power_of_2(N)))
    return block_rows, block_d, _num_warps(block_rows * block_d)


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def rms_norm(x, weight, eps):
    D = x.shape[-1]
    rows = x.reshape(-1, D)                                       # [N, D], a view when it can be
    N = rows.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if N == 0:
        return y
    block_rows, block_d, num_warps = _blocks(N, D)
    grid = (triton.cdiv(N, block_rows), triton.cdiv(D, block_d))
    _rms_norm_kernel[grid](
        rows, weight.contiguous(), y, N, D, float(eps), rows.stride(0), rows.stride(1),
        TILED=D > block_d, BLOCK_ROWS=block_rows, BLOCK_D=block_d, ACC=_acc(x.dtype),
        num_warps=num_warps)
    return y


def _programs(device, num_row_blocks):
    if device.type == "cuda":
        limit = torch.cuda.get_device_properties(device).multi_processor_count * _PROGRAMS_PER_SM
    else:
        limit = _PROGRAMS_OFF_CUDA
    return min(num_row_blocks, limit)


def rms_norm_backward(grad_out, x, weight, eps):
    D = x.shape[-1]
    rows, grad_rows = x.reshape(-1, D), grad_out.reshape(-1, D)  # [N, D] each
    N = rows.shape[0]
    d_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if N == 0:
        return d_x, torch.zeros_like(weight)
    block_rows, block_d, num_warps = _blocks(N, D)
    num_row_blocks = triton.cdiv(N, block_rows)
    programs = _programs(x.device, num_row_blocks)
    acc = torch.promote_types(x.dtype, torch.float32)
    partial = torch.empty(programs, D, dtype=acc, device=x.device)  # d weight per program
    _rms_norm_backward_kernel[(programs, triton.cdiv(D, block_d))](
        rows, grad_rows, weight.contiguous(), d_x, partial, N, D, float(eps), num_row_blocks,
        rows.stride(0), rows.stride(1), grad_rows.stride(0), grad_rows.stride(1),
        TILED=D > block_d, BLOCK_ROWS=block_rows, BLOCK_D=block_d, ACC=_acc(x.dtype),
        num_warps=num_warps)
    return d_x, partial.sum(dim=0).to(weight.dtype)
