"""FP8 latent cache rows in Triton (layout: ds_kernels/mla_cache_format.py; recipe:
ds_kernels/reference/fp8_mla_cache.py): the tile reader of mla_decode and the row writer of
mla_cache_write; lightning_indexer and index_cache_write use them for the FP8 index-key rows
(the same layout without a rope part).

The cache is passed as bytes (uint8) and each field is reached through a pointer cast to its
type at its byte offset. e4m3 codes are decoded (kernels/quant.py, shared with the quantised
GEMMs) and encoded arithmetically, never through Triton's fp8 types: the interpreter reads fp8
pointers wrongly, and GPUs before sm_89 have no fp8 conversion. k_pe is rounded to bf16 from
its bits too: the interpreter's fp32 -> bf16 conversion truncates (it ignores rounding modes),
a GPU's rounds to nearest even, as torch does. Scales are powers of two found from the bits,
so quantising multiplies by an exact 1 / scale (no division, whose fp32 form is approximate on
GPUs): every backend writes the same bytes.
"""

import triton
import triton.language as tl

from ds_kernels.kernels.quant import e4m3_to_fp32

_E4M3_MAX = tl.constexpr(448.0)
_TILE = tl.constexpr(128)                                  # latent columns a scale covers
_TWO_POW_MINUS_9 = tl.constexpr(0.001953125)
_TWO_POW_MINUS_6 = tl.constexpr(0.015625)                 # e4m3's smallest normal
_TWO_POW_23 = tl.constexpr(8388608.0)
# FlashMLA's floor on the scale, max(amax / 448, 1e-4) rounded up: 2^-13.
_MIN_SCALE = tl.constexpr(0.0001220703125)
_E4M3_NAN = tl.constexpr(0x7F)
_BF16_NAN = tl.constexpr(0x7FC0)                           # torch's, whatever the NaN's sign


@triton.jit
def fp32_to_e4m3(x):
    """e4m3 bytes (int32 0..255) of fp32 x with |x| <= 448 or NaN, rounded to nearest even
    (as torch's float8_e4m3fn cast); NaN gives 0x7F."""
    bits = x.to(tl.int32, bitcast=True)
    a = tl.abs(x)
    a_bits = a.to(tl.int32, bitcast=True)
    # Normal: drop 20 of the 23 mantissa bits, adding half an e4m3 step minus one, plus the
    # kept lowest bit (ties to even); the carry may bump the exponent. Exponent field
    # e + 127 becomes e + 7: minus 120 << 3 once shifted.
    normal = ((a_bits + 0x7FFFF + ((a_bits >> 20) & 1)) >> 20) - (120 << 3)
    # Subnormal (|x| < 2^-6): a multiple of 2^-9, rounded to nearest even by the fp32 add of
    # 2^23 (whose ulp is 1); 8 is the smallest normal, which the code 8 also means.
    subnormal = (a * 512.0 + _TWO_POW_23).to(tl.int32, bitcast=True) - 0x4B000000
    code = tl.where(a < _TWO_POW_MINUS_6, subnormal, normal) | ((bits >> 24) & 0x80)
    return tl.where(x == x, code, _E4M3_NAN)


@triton.jit
def fp32_to_bf16_bits(x):
    """The bf16 bits (int32 holding 16 of them) of fp32 x, rounded to nearest even."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x == x, rounded, _BF16_NAN)


@triton.jit
def _pow2_scale(amax):
    """The smallest power of two >= max(amax / 448, 2^-13), for amax >= 0 finite: with
    s = the smallest power of two >= amax / 512 (from the bits), it is s when amax <= 448 s,
    else 2 s - compared exactly, without dividing."""
    q = amax * _TWO_POW_MINUS_9                                   # exact unless subnormal
    q_bits = q.to(tl.int32, bitcast=True)
    s = ((q_bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    s = tl.where(amax <= _E4M3_MAX * s, s, 2.0 * s)
    return tl.maximum(s, _MIN_SCALE)                           # subnormal q: below the floor


@triton.jit
def load_latent(row, ok, dc, dc_ok, DC):
    """latent [N, DCP] in fp32 of FP8 rows starting at byte pointers row [N] (an index-key
    cache's keys alike); 0 where not ok (rows) or past the dim (dc_ok [DCP] for columns dc).
    Each code's scale is gathered per element (4 distinct addresses a row, hits in L1)."""
    ok_c = ok[:, None] & dc_ok[None, :]
    codes = tl.load(row[:, None] + dc[None, :], mask=ok_c, other=0).to(tl.int32)
    scale_ptr = (row[:, None] + DC + 4 * (dc // _TILE)[None, :]).to(tl.pointer_type(tl.float32))
    scale = tl.load(scale_ptr, mask=ok_c, other=0.0)
    return e4m3_to_fp32(codes) * scale


@triton.jit
def load_rows(row, ok, dc, dc_ok, dr, dr_ok, DC):
    """(latent [N, DCP], k_pe [N, DRP]) in fp32 of FP8 rows starting at byte pointers row [N];
    0 where not ok (rows) or past the dims (dc_ok [DCP], dr_ok [DRP] for columns dc, dr)."""
    rope_ptr = (row[:, None] + DC + 4 * (DC // _TILE) + 2 * dr[None, :]).to(
        tl.pointer_type(tl.bfloat16))
    k_pe = tl.load(rope_ptr, mask=ok[:, None] & dr_ok[None, :], other=0.0).to(tl.float32)
    return load_latent(row, ok, dc, dc_ok, DC), k_pe


@triton.jit
def store_latent(row, ok, latent, d, DC, BLOCK_T: tl.constexpr, BLOCK_DC: tl.constexpr):
    """Quantise fp32 latent [BLOCK_T, BLOCK_DC] (columns d; those >= DC are ignored) into the
    codes and scales of FP8 rows at byte pointers row [BLOCK_T, 1], where ok [BLOCK_T]."""
    tiles = tl.reshape(latent, (BLOCK_T, BLOCK_DC // _TILE, _TILE))
    finite = (tiles == tiles) & (tl.abs(tiles) < float("inf"))
    amax = tl.max(tl.where(finite, tl.abs(tiles), 0.0), axis=2)   # [BT, tiles]
    scale = _pow2_scale(amax)
    # 1 / scale from the bits, exact: 2^e -> 2^-e is exponent field 254 - (e + 127).
    inv = (0x7F000000 - scale.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)
    q = tl.minimum(tl.maximum(tiles * inv[:, :, None], -_E4M3_MAX), _E4M3_MAX)
    codes = fp32_to_e4m3(tl.where(finite, q, float("nan")))
    codes = tl.reshape(codes, (BLOCK_T, BLOCK_DC))
    tl.store(row + d[None, :], codes.to(tl.uint8), mask=ok[:, None] & (d < DC)[None, :])
    t = tl.arange(0, BLOCK_DC // _TILE)                            # [tiles]
    scale_ptr = (row + DC + 4 * t[None, :]).to(tl.pointer_type(tl.float32))
    tl.store(scale_ptr, scale, mask=ok[:, None] & (t < DC // _TILE)[None, :])


@triton.jit
def store_rope(row, mask, x, c, DC):
    """Store x (columns c of k_pe, any float dtype) as bf16 into FP8 rows at byte pointers
    row [BLOCK_T, 1], where mask."""
    rope_ptr = (row + DC + 4 * (DC // _TILE) + 2 * c).to(tl.pointer_type(tl.int16))
    tl.store(rope_ptr, fp32_to_bf16_bits(x.to(tl.float32)).to(tl.int16), mask=mask)
