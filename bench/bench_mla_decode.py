"""mla_decode: one decode step of DeepSeek-V3 attention over a paged latent cache, absorbed
(ds_kernels.mla_decode) against the naive path that re-expands the whole latent cache through
kv_b_proj every step, as transformers' DeepseekV3Attention does, and the reference.

Every impl maps (q_head [B, Hq, Dn], q_pe [B, Hq, Dr], kv_cache, block_table, cache_seqlens)
to the attention output [B, Hq, Dv], so the absorbed rows include absorbing W_UK into the query
and applying W_UV to the latent output. "ds_kernels[attention]" is the op by itself (the query
absorbed beforehand): its GB/s is the cache bytes read over its time, and on CUDA its
pct_of_peak the percentage of the GPU's measured copy bandwidth. "ds_kernels[attention, fp8
cache]" is the same op on the same tokens held in an FP8 cache (FlashMLA's DeepSeek-V3.2
layout, written by mla_cache_write), its GB/s of the 656 bytes a token it reads. Each impl's
output is checked against ds_kernels' before it is timed (the FP8 row against ds_kernels on
the dequantised cache).

Shapes: DeepSeek-V3's Dc=512, Dr=64, Dn=Dv=128, 64-token pages, every sequence at the same
context. CPU: fp32, B=4, Hq=16. CUDA: bf16, B in (1, 32, 128), Hq=128 (one GPU) and 16 (TP=8).
The naive path is skipped where its expanded K/V would pass NAIVE_MAX_BYTES, the reference
(an fp64 loop over sequences) above REFERENCE_MAX_B sequences.

Why absorb: the latent cache holds (Dc + Dr) * 2 = 1,152 bytes per token per layer in bf16
(656 in FP8: 512 e4m3 codes, 4 fp32 scales, 64 bf16 rope values); per-head K/V would hold
Hq * (Dn + Dr + Dv) * 2 = 81,920 at Hq=128 (71x). run() prints all three.
"""

import math
import sys

import torch
import torch.nn.functional as F

from bench.harness import Impl, Row, assert_close, compare, skip, working
from ds_kernels.mla_cache_format import FP8_CACHE_DTYPE, row_width
from ds_kernels.ops.mla_cache_write import mla_cache_write
from ds_kernels.ops.mla_decode import mla_decode
from ds_kernels.reference.fp8_mla_cache import dequantize

OP = "mla_decode"
DC, DR, DN, DV, PAGE = 512, 64, 128, 128, 64
# mscale = 0.1 * ln(40) + 1 for YaRN factor 40, squared, over sqrt(Dn + Dr).
SOFTMAX_SCALE = 192**-0.5 * (0.1 * math.log(40) + 1.0) ** 2
BATCHES = {"cpu": (4,), "cuda": (1, 32, 128)}
HEADS = {"cpu": (16,), "cuda": (128, 16)}
CONTEXTS = {"cpu": ((256, 1024, 4096, 8192), (256, 2048, 8192)),     # (full, quick)
            "cuda": ((1024, 4096, 8192), (1024, 8192))}
# HBM bandwidth the CUDA rows are measured against (an H200's, as sustained copies reach it).
# Relative (norm-wise) error allowed against ds_kernels: summation order only, in each dtype.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
NAIVE_MAX_BYTES = 16 << 30
REFERENCE_MAX_B = 4
BASELINE = "decompress+attend"
FP8_IMPL = "ds_kernels[attention, fp8 cache]"


def run(device: torch.device, quick: bool) -> list[Row]:
    kind = "cuda" if device.type == "cuda" else "cpu"
    dtype = torch.bfloat16 if kind == "cuda" else torch.float32
    print(f"[{OP}] KV-cache bytes per token per layer: latent in bf16 (Dc + Dr) * 2 = "
          f"{_token_bytes(torch.bfloat16):,}, in {str(dtype).replace('torch.', '')} "
          f"{_token_bytes(dtype):,}, in FP8 (Dc e4m3 + Dc/128 fp32 scales + Dr bf16) "
          f"{_token_bytes(FP8_CACHE_DTYPE):,}; per-head K/V in bf16 Hq * (Dn + Dr + Dv) * 2 = "
          f"{128 * (DN + DR + DV) * 2:,} at Hq=128", file=sys.stderr, flush=True)
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for Hq in HEADS[kind]:
        # kv_b_proj.weight as transformers holds it: [Hq * (Dn + Dv), Dc], K rows first per head.
        kv_b = torch.randn(Hq * (DN + DV), DC, generator=g, device=device, dtype=dtype) / DC**0.5
        for B in BATCHES[kind]:
            for ctx in CONTEXTS[kind][quick]:
                rows += _bench(dict(ctx=ctx, B=B, Hq=Hq, Dc=DC, Dr=DR, page=PAGE), kv_b, g,
                               dtype, device)
    return rows


def _token_bytes(dtype) -> int:
    return row_width(DC, DR, dtype) * dtype.itemsize


def _bench(shape, kv_b, g, dtype, device):
    ctx, B, Hq = shape["ctx"], shape["B"], shape["Hq"]
    pages = -(-ctx // PAGE)
    kv_cache = torch.randn(B * pages, PAGE, DC + DR, generator=g, device=device, dtype=dtype)
    order = torch.randperm(B * pages, generator=g, device=device)
    block_table = order.view(B, pages).to(torch.int32)            # shuffled pages
    seqlens = torch.full((B,), ctx, dtype=torch.int32, device=device)
    q_head = torch.randn(B, Hq, DN, generator=g, device=device, dtype=dtype)
    q_pe = torch.randn(B, Hq, DR, generator=g, device=device, dtype=dtype)
    args = (q_head, q_pe, kv_cache, block_table, seqlens)
    # The absorbed model keeps W_UK and W_UV apart (split once at load time, not per step).
    w = kv_b.view(Hq, DN + DV, DC)
    w_uk, w_uv = w[:, :DN].contiguous(), w[:, DN:].contiguous()   # [Hq, Dn, Dc], [Hq, Dv, Dc]

    def absorbed(q_head, q_pe, kv_cache, block_table, seqlens):
        q_nope = torch.einsum("bhn,hnc->bhc", q_head, w_uk)        # [B, Hq, Dc]
        out, _ = mla_decode(q_nope, q_pe, kv_cache, block_table, seqlens, SOFTMAX_SCALE)
        return torch.einsum("bhc,hvc->bhv", out, w_uv)            # [B, Hq, Dv]

    q_nope = torch.einsum("bhn,hnc->bhc", q_head, w_uk)           # absorbed once, untimed

    def attention_only(q_head, q_pe, kv_cache, block_table, seqlens):
        return mla_decode(q_nope, q_pe, kv_cache, block_table, seqlens, SOFTMAX_SCALE)

    # The same tokens in an FP8 cache, written once, untimed.
    tokens = kv_cache.view(-1, DC + DR)                           # [pages * PAGE, Dc + Dr]
    fp8_cache = torch.empty(*kv_cache.shape[:2], row_width(DC, DR, FP8_CACHE_DTYPE),
                            dtype=FP8_CACHE_DTYPE, device=device)
    mla_cache_write(tokens[:, :DC], tokens[:, DC:], fp8_cache,
                    torch.arange(tokens.shape[0], device=device))

    def attention_fp8(q_head, q_pe, kv_cache, block_table, seqlens):
        return mla_decode(q_nope, q_pe, fp8_cache, block_table, seqlens, SOFTMAX_SCALE)

    ds_impl = Impl("ds_kernels", absorbed)
    others = []
    if B * ctx * Hq * (DN + DR + DV) * dtype.itemsize > NAIVE_MAX_BYTES:
        skip(OP, shape, BASELINE, f"its expanded K/V would pass {NAIVE_MAX_BYTES >> 30} GiB")
    else:
        others.append(Impl(BASELINE, lambda *a: _decompress_and_attend(kv_b, *a)))
    if B > REFERENCE_MAX_B:
        skip(OP, shape, "reference", f"B > {REFERENCE_MAX_B}: an fp64 loop over sequences")
    else:
        others.append(Impl("reference", absorbed, backend="reference"))

    def check(name, got):
        assert_close(f"{OP} ({shape}) {name} vs ds_kernels", got.float(), want.float(),
                     TOLERANCE[dtype])

    def check_fp8(name, got):
        assert_close(f"{OP} ({shape}) {name} vs ds_kernels on the dequantised cache",
                     got[0].float(), want_fp8.float(), TOLERANCE[dtype])

    timing = dict(warmup=1) if device.type == "cpu" else {}      # working() warmed them up
    cache_bytes = B * ctx * _token_bytes(dtype)
    fp8_bytes = B * ctx * _token_bytes(FP8_CACHE_DTYPE)
    with torch.inference_mode():
        want = ds_impl(*args)
        impls = [ds_impl] + working(others, args, check, op=OP, shape=shape)
        del want
        rows = compare(impls, args, op=OP, shape=shape, dtype=dtype, device=device, tokens=B,
                       baseline=BASELINE, **timing)
        rows += compare([Impl("ds_kernels[attention]", attention_only)], args, op=OP,
                        shape=shape, dtype=dtype, device=device, tokens=B, nbytes=cache_bytes,
                        baseline=BASELINE, **timing)
        want_fp8, _ = mla_decode(q_nope, q_pe, dequantize(fp8_cache, DC, dtype), block_table,
                                 seqlens, SOFTMAX_SCALE)
        fp8 = working([Impl(FP8_IMPL, attention_fp8)], args, check_fp8, op=OP, shape=shape)
        del want_fp8
        rows += compare(fp8, args, op=OP, shape=shape, dtype=dtype, device=device, tokens=B,
                        nbytes=fp8_bytes, baseline=BASELINE, **timing)
    return rows


def _decompress_and_attend(kv_b, q_head, q_pe, kv_cache, block_table, seqlens):
    """transformers' way: the whole latent cache through kv_b_proj every step, per-head K and
    V, then standard attention (sequences padded to the longest and masked)."""
    B, Hq, _ = q_head.shape
    L = int(seqlens.max())
    rows = kv_cache[block_table.long()].flatten(1, 2)[:, :L]     # [B, L, Dc + Dr]
    kv = F.linear(rows[..., :DC], kv_b).view(B, L, Hq, DN + DV)  # [B, L, Hq, Dn + Dv]
    k_nope, v = kv.split([DN, DV], dim=-1)
    k_pe = rows[..., DC:, None].transpose(-1, -2).expand(B, L, Hq, DR)
    k = torch.cat([k_nope, k_pe], dim=-1).transpose(1, 2)        # [B, Hq, L, Dn + Dr]
    q = torch.cat([q_head, q_pe], dim=-1)[:, :, None]             # [B, Hq, 1, Dn + Dr]
    mask = (torch.arange(L, device=q.device) < seqlens[:, None])[:, None, None]  # [B, 1, 1, L]
    out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=mask,
                                         scale=SOFTMAX_SCALE)     # [B, Hq, 1, Dv]
    return out[:, :, 0]
