"""lightning_indexer: DeepSeek-V3.2's key selection (top 2048 keys a query by the indexer's
score) against transformers' way (DeepseekV32Indexer: every query's scores against every key
as one dense [T, S] matrix, masked, then torch.topk), for decode (one query a sequence) and a
chunk of prefill (the last 256 positions of one sequence), against the context length.

Shapes: V3.2's indexer, 64 heads x 128 dims, top 2048, 64-key pages (shuffled). CPU: fp32;
CUDA: bf16. Every impl returns the slots [T, 2048]; the dense peer is checked against
ds_kernels by the scores of the keys each selects (torch.topk picks any among equal scores -
zeros, where every head's dot is negative, are common - and summation orders differ): the
same sorted scores to 1e-4 relative. Its [T, H, S] fp32 scores are skipped past
DENSE_MAX_BYTES. GB/s: the index keys read (T_seq x S x 128 values, one read per sequence);
TFLOP/s: 2 x T x S x 64 x 128 (the scoring dots). "ds_kernels fp8 keys" scores the same keys
held as FP8 rows (index_cache_write's, 132 bytes a key; its GB/s column still counts the
float keys' bytes), checked the same way within 2% (FP8's rounding moves scores near the cut).
"""

import torch

from bench.harness import Impl, Row, assert_close, compare, skip, working
from ds_kernels.cpu.mla_cache_write import quantize_rows
from ds_kernels.ops.lightning_indexer import lightning_indexer

OP = "lightning_indexer"
H, D, TOP_K, PAGE = 64, 128, 2048, 64
CONTEXTS = {"cpu": ((1024, 4096, 16384, 65536), (1024, 16384)),        # (full, quick)
            "cuda": ((4096, 16384, 65536, 131072), (4096, 65536))}
PREFILL_CONTEXTS = {"cpu": ((4096, 16384), (4096,)), "cuda": ((4096, 16384, 65536), (16384,))}
DECODE_BATCH = {"cpu": 4, "cuda": 64}
PREFILL_QUERIES = 256
DENSE_MAX_BYTES = 4 << 30
BASELINE = "dense scores + topk (transformers)"
FP8 = "ds_kernels fp8 keys"


def run(device: torch.device, quick: bool) -> list[Row]:
    kind = "cuda" if device.type == "cuda" else "cpu"
    dtype = torch.bfloat16 if kind == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for ctx in CONTEXTS[kind][quick]:
        rows += _bench("decode", DECODE_BATCH[kind], ctx, g, dtype, device)
    for ctx in PREFILL_CONTEXTS[kind][quick]:
        rows += _bench("prefill", 1, ctx, g, dtype, device)
    return rows


def _bench(phase, B, ctx, g, dtype, device):
    pages = -(-ctx // PAGE)
    k_cache = torch.randn(B * pages, PAGE, D, generator=g, device=device, dtype=dtype)
    table = torch.randperm(B * pages, generator=g, device=device).view(B, pages).int()
    if phase == "decode":  # each sequence's next token
        seq = torch.arange(B, dtype=torch.int32, device=device)
        pos = torch.full((B,), ctx - 1, dtype=torch.int32, device=device)
    else:  # a chunk of prefill: the sequence's last PREFILL_QUERIES positions
        pos = torch.arange(ctx - PREFILL_QUERIES, ctx, dtype=torch.int32, device=device)
        seq = torch.zeros_like(pos)
    T = pos.shape[0]
    q = torch.randn(T, H, D, generator=g, device=device, dtype=dtype)
    weights = torch.randn(T, H, generator=g, device=device) * H**-0.5 * D**-0.5
    args = (q, weights, k_cache, table, seq, pos)
    shape = dict(phase=phase, ctx=ctx, T=T, H=H, D=D, top_k=TOP_K)

    def ours(*a):
        return lightning_indexer(*a, TOP_K)

    rows = k_cache.view(-1, D)
    fp8_cache = quantize_rows(rows, rows[:, :0]).view(B * pages, PAGE, -1)
    others = [Impl(FP8, lambda q, w, _, *a: lightning_indexer(q, w, fp8_cache, *a, TOP_K))]
    if T * H * ctx * 4 > DENSE_MAX_BYTES:
        skip(OP, shape, BASELINE, f"its [T, H, S] fp32 scores would pass "
             f"{DENSE_MAX_BYTES >> 30} GiB")
    else:
        others.append(Impl(BASELINE, lambda *a: dense_top_k(*a, TOP_K, PAGE)))

    def check(name, got):
        assert_close(f"{OP} ({shape}) {name}'s selected scores vs ds_kernels'",
                     _selected_scores(got, *args), _selected_scores(want, *args),
                     2e-2 if name == FP8 else 1e-4)

    with torch.inference_mode():
        want = ours(*args)
        impls = [Impl("ds_kernels", ours)] + working(others, args, check, op=OP, shape=shape)
        del want
        timing = dict(warmup=1) if device.type == "cpu" else {}
        return compare(impls, args, op=OP, shape=shape, dtype=dtype, device=device, tokens=T,
                       nbytes=B * ctx * D * dtype.itemsize, flops=2 * T * ctx * H * D,
                       baseline=BASELINE, **timing)


def _selected_scores(slots, q, weights, k_cache, table, seq, pos):
    """fp64 [T, top_k]: the scores of the keys in ``slots``, sorted (0 for -1)."""
    keys = k_cache.reshape(-1, k_cache.shape[-1])[slots.clamp_min(0).long()].double()
    dots = torch.einsum("thd,tkd->tkh", q.double(), keys).relu()
    scores = (dots * weights.double()[:, None, :]).sum(-1).masked_fill(slots < 0, 0.0)
    return scores.sort(dim=1).values


def dense_top_k(q, weights, k_cache, table, seq, pos, top_k, page):
    """transformers' DeepseekV32Indexer: all of a sequence's keys gathered, [T, H, S] scores,
    relu, the weighted head sum, the causal mask, torch.topk (-1 where fewer keys are seen)."""
    S = int(pos.max()) + 1
    positions = torch.arange(S, device=q.device)
    keys = k_cache[table[:, positions // page].long(), positions % page].float()  # [B, S, D]
    if keys.shape[0] == 1:  # one sequence's queries share its keys
        scores = torch.einsum("thd,sd->ths", q.float(), keys[0]).relu()  # [T, H, S]
    else:
        scores = torch.einsum("thd,tsd->ths", q.float(), keys[seq.long()]).relu()
    scores = torch.einsum("th,ths->ts", weights.float(), scores)          # [T, S]
    scores = scores.masked_fill(positions[None, :] > pos[:, None], float("-inf"))
    top = scores.topk(min(top_k, S), dim=1)
    slots = table[seq.long()[:, None], top.indices // page].long() * page + top.indices % page
    slots = torch.where(top.values > float("-inf"), slots, -1).int()
    return torch.nn.functional.pad(slots, (0, top_k - slots.shape[1]), value=-1)  # [T, top_k]
