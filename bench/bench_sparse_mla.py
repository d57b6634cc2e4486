"""sparse_mla: one DeepSeek-V3.2 decode step's attention against the context length - dense
absorbed attention over every cached token (mla_decode), DSA (lightning_indexer's top 2048
keys, then sparse_mla over them), sparse_mla alone (the slots given), and transformers'
DeepseekV32 way: the indexer's dense [B, S] scores and torch.topk, then attention over every
token with the unselected ones masked out of a dense score matrix (here in absorbed form, one
latent row a token, which is cheaper than transformers' per-head K/V).

Past index_topk tokens DSA's attention stops growing: only the indexer (64 heads x 128 dims a
key, against Hq x 576 for attention) still reads every key. Shapes: V3.2's Dc=512, Dr=64,
indexer 64 x 128, top 2048, 64-token pages. CPU: fp32, B=4, Hq=16; CUDA: bf16, B=32, Hq=128.
DSA's output is checked against the masked dense attention over the same selection.
"""

import torch

from bench.bench_lightning_indexer import dense_top_k
from bench.harness import Impl, Row, assert_close, compare, working
from ds_kernels.ops.lightning_indexer import lightning_indexer
from ds_kernels.ops.mla_decode import mla_decode
from ds_kernels.ops.sparse_mla import sparse_mla

OP = "sparse_mla"
DC, DR, IH, ID, TOP_K, PAGE = 512, 64, 64, 128, 2048, 64
SOFTMAX_SCALE = 192**-0.5
BATCH = {"cpu": 4, "cuda": 32}
HEADS = {"cpu": 16, "cuda": 128}
CONTEXTS = {"cpu": ((1024, 4096, 16384, 65536), (1024, 16384)),
            "cuda": ((4096, 16384, 65536, 131072), (4096, 65536))}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
BASELINE = "mla_decode (dense)"
DSA = "lightning_indexer + sparse_mla"


def run(device: torch.device, quick: bool) -> list[Row]:
    kind = "cuda" if device.type == "cuda" else "cpu"
    dtype = torch.bfloat16 if kind == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for ctx in CONTEXTS[kind][quick]:
        rows += _bench(BATCH[kind], HEADS[kind], ctx, g, dtype, device)
    return rows


def _bench(B, Hq, ctx, g, dtype, device):
    pages = -(-ctx // PAGE)
    kv_cache = torch.randn(B * pages, PAGE, DC + DR, generator=g, device=device, dtype=dtype)
    k_index = torch.randn(B * pages, PAGE, ID, generator=g, device=device, dtype=dtype)
    table = torch.randperm(B * pages, generator=g, device=device).view(B, pages).int()
    seqlens = torch.full((B,), ctx, dtype=torch.int32, device=device)
    seq = torch.arange(B, dtype=torch.int32, device=device)
    pos = seqlens - 1
    q = torch.randn(B, Hq, DC + DR, generator=g, device=device, dtype=dtype)
    q_index = torch.randn(B, IH, ID, generator=g, device=device, dtype=dtype)
    weights = torch.randn(B, IH, generator=g, device=device) * (IH * ID) ** -0.5
    slots = lightning_indexer(q_index, weights, k_index, table, seq, pos, TOP_K)
    shape = dict(ctx=ctx, B=B, Hq=Hq, top_k=TOP_K)
    args = (q, kv_cache, table, seqlens, q_index, weights, k_index, seq, pos, slots)

    def dense(q, kv_cache, table, seqlens, *_):
        return mla_decode(q[..., :DC], q[..., DC:], kv_cache, table, seqlens, SOFTMAX_SCALE)[0]

    def dsa(q, kv_cache, table, seqlens, q_index, weights, k_index, seq, pos, _):
        chosen = lightning_indexer(q_index, weights, k_index, table, seq, pos, TOP_K)
        return sparse_mla(q, kv_cache, chosen, SOFTMAX_SCALE, v_dim=DC)[0]

    def sparse_only(q, kv_cache, *rest):
        return sparse_mla(q, kv_cache, rest[-1], SOFTMAX_SCALE, v_dim=DC)[0]

    def masked(q, kv_cache, table, seqlens, q_index, weights, k_index, seq, pos, _):
        chosen = dense_top_k(q_index, weights, k_index, table, seq, pos, TOP_K, PAGE)
        t = torch.arange(ctx, device=q.device)
        rows = kv_cache[table[:, t // PAGE].long(), t % PAGE].float()        # [B, S, Dk]
        scores = torch.einsum("bhd,bsd->bhs", q.float(), rows) * SOFTMAX_SCALE
        keep = torch.zeros(B, ctx, dtype=torch.bool, device=q.device)
        named = chosen >= 0
        slot_pos = _positions(chosen, table, ctx)
        keep[torch.arange(B, device=q.device)[:, None].expand_as(chosen)[named],
             slot_pos[named]] = True
        scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
        return (scores.softmax(-1) @ rows[..., :DC]).to(q.dtype)

    def check(name, got):
        assert_close(f"{OP} ({shape}) {name} vs {DSA}", got.float(), want.float(),
                     TOLERANCE[dtype])

    timing = dict(warmup=1) if device.type == "cpu" else {}
    with torch.inference_mode():
        want = dsa(*args)
        impls = [Impl(BASELINE, dense), Impl(DSA, dsa), Impl("sparse_mla alone", sparse_only)]
        impls += working([Impl("transformers (dense indexer, masked dense attention)",
                               masked)], args, check, op=OP, shape=shape)
        attention_flops = 2 * B * Hq * (DC + DR + DC)
        rows = compare(impls, args, op=OP, shape=shape, dtype=dtype, device=device, tokens=B,
                       baseline=BASELINE, **timing)
        for row in rows:  # the rows each impl attends over: all, or the top_k
            keys = min(ctx, TOP_K) if row.impl in (DSA, "sparse_mla alone") else ctx
            row.notes["attended keys"] = keys
            row.notes["attention GFLOP"] = round(attention_flops * keys / 1e9, 3)
    return rows


def _positions(slots, table, ctx):
    """int64 [B, top_k]: the token position of each slot in its sequence's pages."""
    page_of = torch.full((int(table.max()) + 1,), -1, dtype=torch.long, device=slots.device)
    B, pages = table.shape
    index = torch.arange(pages, device=slots.device).expand(B, pages)
    page_of[table.long().flatten()] = index.flatten()
    safe = slots.clamp_min(0).long()
    return (page_of[safe // PAGE] * PAGE + safe % PAGE).clamp(0, ctx - 1)

