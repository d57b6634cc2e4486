"""Rotary embedding kernel (semantics: ds_kernels/reference/apply_rope.py).

x [T, H, D] is taken as T*H rows (H = 1 for [T, D]); a program rotates BLOCK_ROWS rows. Each row
is read as its two pair members, x1 [D/2] and x2 [D/2] - even and odd columns (interleaved) or
the two halves - so the rotation is elementwise on [BLOCK_ROWS, D/2] tiles. cos and sin are
gathered per row from the token's table row (H rows share it, so it stays in cache).

pair_columns and rotate are shared with the fused MLA cache write (kernels/mla_cache_write.py).
"""

import torch
import triton
import triton.language as tl

# Pairs a program rotates: BLOCK_ROWS = this // (D/2 rounded up to a power of two), e.g. 32
# heads of DeepSeek-V3's 64-wide rope part. ptxas (sm_90, 4 warps) gives such a program 58
# registers - room for many resident programs to hide memory latency; 4096 pairs took 218.
# Register counts only: not yet timed on a GPU.
_TILE_PAIRS = 1024


@triton.jit
def pair_columns(i, HALF, INTERLEAVED: tl.constexpr):
    """Columns of the two members of pair i of a row of 2 * HALF: (2i, 2i + 1) interleaved,
    else (i, i + HALF)."""
    if INTERLEAVED:
        return 2 * i, 2 * i + 1
    return i, i + HALF


@triton.jit
def rotate(x1, x2, cos, sin):
    """(x1, x2) rotated by the angle whose cosine and sine are given."""
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _apply_rope_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, R, H, HALF,
    stride_xt, stride_xh, stride_xd, stride_ct, stride_cd, stride_st, stride_sd,
    INTERLEAVED: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ACC: tl.constexpr,
):
    """out = rope(x) for rows r = t * H + h of x.

    x_ptr: [T, H, 2 * HALF], strides (stride_xt, stride_xh, stride_xd); R = T * H rows.
    cos_ptr, sin_ptr: [T, HALF] any float dtype, strides (stride_ct, stride_cd), (stride_st,
    stride_sd). out_ptr: [T, H, 2 * HALF] contiguous, x's dtype. ACC: fp32 (fp64 for fp64 x).
    """
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)   # [BR]
    token = (rows // H).to(tl.int64)
    head = (rows % H).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)                                        # [BH]
    ok = (rows < R)[:, None] & (i < HALF)[None, :]
    c1, c2 = pair_columns(i, HALF, INTERLEAVED)
    x_row = x_ptr + (token * stride_xt + head * stride_xh)[:, None]
    x1 = tl.load(x_row + c1[None, :] * stride_xd, mask=ok, other=0.0).to(ACC)
    x2 = tl.load(x_row + c2[None, :] * stride_xd, mask=ok, other=0.0).to(ACC)
    cos = tl.load(cos_ptr + token[:, None] * stride_ct + i[None, :] * stride_cd, mask=ok,
                  other=0.0).to(ACC)
    sin = tl.load(sin_ptr + token[:, None] * stride_st + i[None, :] * stride_sd, mask=ok,
                  other=0.0).to(ACC)
    y1, y2 = rotate(x1, x2, cos, sin)
    out_row = out_ptr + rows.to(tl.int64)[:, None] * (2 * HALF)
    tl.store(out_row + c1[None, :], y1.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(out_row + c2[None, :], y2.to(out_ptr.dtype.element_ty), mask=ok)


def apply_rope(x, cos, sin, interleaved):
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x3 = x if x.dim() == 3 else x.unsqueeze(1)                   # [T, H, D]
    T, H, D = x3.shape
    if T * H == 0:
        return out
    block_half = triton.next_power_of_2(D // 2)
    block_rows = max(1, min(_TILE_PAIRS // block_half, triton.next_power_of_2(T * H)))
    _apply_rope_kernel[(triton.cdiv(T * H, block_rows),)](
        x3, cos, sin, out, T * H, H, D // 2,
        x3.stride(0), x3.stride(1), x3.stride(2), cos.stride(0), cos.stride(1),
        sin.stride(0), sin.stride(1),
        INTERLEAVED=interleaved, BLOCK_ROWS=block_rows, BLOCK_HALF=block_half,
        ACC=tl.float64 if x.dtype == torch.float64 else tl.float32)
    return out
