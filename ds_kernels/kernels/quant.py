"""Decoding quantised weight tiles inside a GEMM's K-loop, shared by quant_linear and the
grouped GEMM of grouped_mm / fused_moe (weight-only: activations stay unquantised).

Codes are read as bytes and decoded arithmetically (e4m3, e2m1 and e8m0 bit layouts), not
through Triton's fp8 types: the interpreter reads fp8 pointers wrongly and has no fp4/e8m0 at
all, and GPUs before sm_89 have no fp8 conversion. Each element's scale is gathered from the
small scale grid (FP8: one per 128x128 block; MXFP4: one per row and 32 of K), so any tile
shape works in either orientation of the weight; the grid stays in L1/L2.

Weight and scale addressing is 64-bit: an expert stack of E x N x K codes passes 2**31 bytes.

The w8a8 path (fp8_quantize_rows) quantises activation tiles to e4m3 for FP8 tensor cores:
there the values are rounded arithmetically too, and only the exact result is cast to fp8 (the
interpreter's own fp32 -> fp8 cast rounds half away from zero, flushes subnormals and turns NaN
into 384).
"""

import triton
import triton.language as tl

_TWO_POW_MINUS_9 = tl.constexpr(0.001953125)              # e4m3's subnormal step
_TWO_POW_MINUS_127 = tl.constexpr(5.877471754111438e-39)  # e8m0 byte 0, an fp32 subnormal
_E4M3_MIN_NORMAL = tl.constexpr(0.015625)                 # 2^-6
_ROUND_TO_INTEGER = tl.constexpr(12582912.0)              # 1.5 x 2^23: x + it - it = rint(x)
_E4M3_MAX = tl.constexpr(448.0)
_AMAX_FLOOR = tl.constexpr(1e-4)                          # quant_formats.FP8_AMAX_FLOOR


@triton.jit
def e4m3_to_fp32(code):
    """fp32 value of e4m3 bytes (int32 0..255): sign, 4 exponent bits (bias 7), 3 mantissa."""
    magnitude = code & 0x7F
    # exponent e > 0: fp32 exponent field e + 120 (bias 127 - 7), mantissa in bits 22-20
    normal = ((magnitude << 20) + (120 << 23)).to(tl.float32, bitcast=True)
    value = tl.where(magnitude < 8, magnitude.to(tl.float32) * _TWO_POW_MINUS_9, normal)
    value = tl.where(magnitude == 0x7F, float("nan"), value)
    return tl.where(code >= 0x80, -value, value)


@triton.jit
def e2m1_to_fp32(code):
    """fp32 value of e2m1 nibbles (int32 0..15): 0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives."""
    magnitude = code & 7
    # exponent e > 0: fp32 exponent field e + 126 (bias 127 - 1), mantissa in bit 22
    normal = ((magnitude << 22) + (126 << 23)).to(tl.float32, bitcast=True)
    value = tl.where(magnitude < 2, magnitude.to(tl.float32) * 0.5, normal)
    return tl.where(code >= 8, -value, value)


@triton.jit
def e8m0_to_fp32(byte):
    """2^(byte - 127) of e8m0 bytes (int32 0..255); 255 is NaN."""
    value = (byte << 23).to(tl.float32, bitcast=True)
    value = tl.where(byte == 0, _TWO_POW_MINUS_127, value)
    return tl.where(byte == 255, float("nan"), value)


@triton.jit
def weight_tile(w_ptr, s_ptr, n, k, ok, stride_wn, stride_wk, stride_sn, stride_sk,
                FP4: tl.constexpr, E8M0_SCALES: tl.constexpr, SCALE_ROWS: tl.constexpr,
                SCALE_COLS: tl.constexpr):
    """W[n, k] in fp32 for index tensors n (rows), k (columns, the in-features) that broadcast
    to the tile; 0 where not ok.

    w_ptr: W's code bytes, uint8 [N, K] (FP8) or [N, K/2] (FP4: MXFP4, the even k in the low
    nibble), strides (stride_wn, stride_wk) in bytes. s_ptr: its scales [ceil(N / SCALE_ROWS),
    ceil(K / SCALE_COLS)], strides (stride_sn, stride_sk): fp32, or e8m0 bytes (E8M0_SCALES).
    SCALE_ROWS, SCALE_COLS: the rows and columns one scale covers (128, 128 or 1, 32).
    """
    n = n.to(tl.int64)
    k = k.to(tl.int64)
    if FP4:
        byte = tl.load(w_ptr + n * stride_wn + (k // 2) * stride_wk, mask=ok, other=0)
        shift = ((k % 2) * 4).to(tl.int32)                     # even column: low nibble
        q = e2m1_to_fp32((byte.to(tl.int32) >> shift) & 0xF)
    else:
        q = e4m3_to_fp32(tl.load(w_ptr + n * stride_wn + k * stride_wk, mask=ok,
                                 other=0).to(tl.int32))
    s_ptrs = s_ptr + (n // SCALE_ROWS) * stride_sn + (k // SCALE_COLS) * stride_sk
    if E8M0_SCALES:
        s = e8m0_to_fp32(tl.load(s_ptrs, mask=ok, other=127).to(tl.int32))
    else:
        s = tl.load(s_ptrs, mask=ok, other=0.0)
    return q * s


@triton.jit
def e4m3_round(x):
    """fp32 x rounded to the nearest e4m3 value (ties to even), clamped to +-448, as fp32; x
    finite."""
    magnitude = tl.abs(x)
    bits = magnitude.to(tl.int32, bitcast=True)
    # Normal e4m3 keeps 3 of fp32's 23 mantissa bits: add half of the dropped 20 bits (less
    # one, plus the kept lowest bit: ties to even), then clear them; a carry bumps the exponent.
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    # Below 2^-6 the e4m3 step is 2^-9: fp32 addition of 1.5 x 2^23 rounds to an integer.
    subnormal = ((magnitude * 512.0 + _ROUND_TO_INTEGER) - _ROUND_TO_INTEGER) * _TWO_POW_MINUS_9
    value = tl.minimum(tl.where(magnitude < _E4M3_MIN_NORMAL, subnormal, normal), _E4M3_MAX)
    return tl.where(x.to(tl.int32, bitcast=True) < 0, -value, value)  # -0 keeps its sign


@triton.jit
def fp8_quantize_rows(a):
    """(codes float8e4nv [BM, BK], scale fp32 [BM]) of an activation tile a (fp32 [BM, BK], one
    128-column group of each row): DeepSeek's act_quant, scale = max(amax, 1e-4) / 448 and
    codes = e4m3(a / scale). A row whose group holds NaN or inf gets a NaN scale (its outputs
    become NaN) and zero codes; masked-out elements must be 0."""
    finite = tl.abs(a) < float("inf")  # False for NaN too
    amax = tl.max(tl.where(finite, tl.abs(a), 0.0), axis=1)
    # Correctly rounded divisions (fp32 "/" is approximate on NVIDIA GPUs): the codes are then
    # the reference's bit for bit.
    scale = tl.math.div_rn(tl.maximum(amax, _AMAX_FLOOR), _E4M3_MAX)
    codes = e4m3_round(tl.math.div_rn(tl.where(finite, a, 0.0), scale[:, None]))
    codes = codes.to(tl.float8e4nv)
    poisoned = tl.max(tl.where(finite, 0, 1), axis=1) > 0
    return codes, tl.where(poisoned, float("nan"), scale)
