"""Captured decode steps: generate(..., compile=True), python -m ds_model generate --compile.

At small batch a decode step is hundreds of small launches on a GPU, and on this CPU it is
Python dispatch: either way the step costs more than its arithmetic. CapturedDecode runs
model.decode's step (one token for each of n sequences) at fixed shapes:
- n is padded up to a bucket (1, 2, 4, 8, ...); each bucket has static input buffers (tokens,
  positions, slots, block-table rows at the table's full width, lengths). Padding rows write
  no cache row (slot -1) and read none (length 0); their logits are dropped.
- Each bucket is captured once, on first use: as a torch.cuda.CUDAGraph on CUDA, replayed
  every step after; with torch.compile (fullgraph, inductor) elsewhere, one graph per bucket
  with the cache's page count symbolic, so later generate calls with other caches reuse it.
- The cache's bookkeeping (KVCache.append: positions, slots, lengths, the capacity check) runs
  outside the captured step, eagerly. Inside it, ops skip the checks that read index values
  (ds_kernels.ops.checks.trusted_values), as they do under CUDA graph capture: the values come
  from that checked bookkeeping, and a captured step cannot read back from the device.
``capture_s``: the seconds of the steps that captured (or compiled) one, their own compute
included.
"""

import dataclasses
import time

import torch

from ds_kernels.ops.checks import trusted_values
from ds_model.model import Batch, KVCache

# Counted by the backend below: every graph torch.compile builds for a captured step.
compiles = 0
# Graphs one step function may hold: one per bucket (up to 2^11 rows) and model built. Beyond
# it torch.compile would refuse (fullgraph).
RECOMPILE_LIMIT = 64


def _inductor(gm, example_inputs):
    global compiles
    compiles += 1
    from torch._inductor.compile_fx import compile_fx
    return compile_fx(gm, example_inputs)


def _step(model, cache, tokens, positions, slots, block_table, seqlens, query_seq):
    """Logits [b, V] of one decode step of b (padded) rows: model.decode without the cache's
    bookkeeping, which the caller did."""
    batch = Batch(positions, slots, block_table=block_table, seqlens=seqlens,
                  query_seq=query_seq)
    return model.lm_head(model.model(tokens, batch, cache))


_compiled_step = torch.compile(_step, backend=_inductor, fullgraph=True, dynamic=False)


def capacities(capacities: list[int], block_size: int) -> list[int]:
    """The cache capacities to allocate for ``capacities``: the longest gets a spare page when
    it would have only one. torch.compile specialises a dimension of size 1, so a one-page
    cache (or table) would compile a graph of its own; from two pages on, one graph serves
    every cache."""
    longest = max(range(len(capacities)), key=capacities.__getitem__)
    if capacities[longest] <= block_size:
        capacities = list(capacities)
        capacities[longest] = block_size + 1
    return capacities


def bucket(n: int) -> int:
    """The captured batch size that runs n rows: the next power of two."""
    return 1 << max(n - 1, 0).bit_length()


@dataclasses.dataclass
class _Bucket:
    tokens: torch.Tensor      # [b] int64
    positions: torch.Tensor   # [b] int64
    slots: torch.Tensor       # [b] int64, -1 on padding rows
    block_table: torch.Tensor  # [b, max_pages] int32
    seqlens: torch.Tensor     # [b] int32, 0 on padding rows
    query_seq: torch.Tensor   # [b] int32: row i reads block_table row i
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # [b, V], the graph's output

    def inputs(self):
        return (self.tokens, self.positions, self.slots, self.block_table, self.seqlens,
                self.query_seq)


class CapturedDecode:
    """model.decode(tokens, seq_ids, cache) for one token a sequence, captured per bucket."""

    def __init__(self, model, cache: KVCache):
        if getattr(model, "ep_group", None) is not None:
            raise ValueError("compile=True does not run with expert parallelism (ep_group): "
                             "the experts' exchange is not captured")
        self.model, self.cache = model, cache
        self.device = cache.block_table.device
        self.buckets: dict[int, _Bucket] = {}
        self.capture_s = 0.0
        if self.device.type != "cuda":
            # The page count (and so the cache's first dim and the table's width) differs
            # between generate calls: symbolic, so that one graph per bucket serves them all.
            for layer in cache.layers + cache.index_layers:
                torch._dynamo.maybe_mark_dynamic(layer, 0)

    def __call__(self, tokens, seq_ids) -> torch.Tensor:                 # [n], [n]
        """Logits [n, V], as model.decode(tokens, seq_ids, cache)."""
        n = len(seq_ids)
        batch = self.cache.append(seq_ids)
        size = bucket(n)
        b = self.buckets.get(size)
        first = b is None
        if first:
            b = self.buckets[size] = self._buffers(size)
        b.tokens[:n] = tokens
        b.positions[:n] = batch.positions
        b.slots[:n] = batch.slots
        b.slots[n:] = -1
        b.block_table[:n, :batch.block_table.shape[1]] = batch.block_table
        b.seqlens[:n] = batch.seqlens
        b.seqlens[n:] = 0
        start, built = time.perf_counter(), compiles
        with trusted_values():
            if self.device.type == "cuda":
                if first:
                    self._capture_graph(b)
                b.graph.replay()
                logits = b.logits
            else:
                if first:
                    torch._dynamo.maybe_mark_dynamic(b.block_table, 1)
                    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                        logits = _compiled_step(self.model, self.cache, *b.inputs())
                else:
                    logits = _compiled_step(self.model, self.cache, *b.inputs())
        if (first and b.graph is not None) or compiles > built:
            self.capture_s += time.perf_counter() - start
        return logits[:n]

    def _buffers(self, size: int) -> _Bucket:
        kw = dict(device=self.device)
        return _Bucket(tokens=torch.zeros(size, dtype=torch.long, **kw),
                       positions=torch.zeros(size, dtype=torch.long, **kw),
                       slots=torch.full((size,), -1, dtype=torch.long, **kw),
                       block_table=torch.zeros(size, self.cache.block_table.shape[1],
                                               dtype=torch.int32, **kw),
                       seqlens=torch.zeros(size, dtype=torch.int32, **kw),
                       query_seq=torch.arange(size, dtype=torch.int32, **kw))

    def _capture_graph(self, b: _Bucket):
        # Warm up on a side stream first (Triton compiles and autotunes; the cache allocator
        # settles), as torch.cuda.graphs requires. The warm-up writes this step's cache rows,
        # which the replay then writes again with the same values.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            _step(self.model, self.cache, *b.inputs())
        torch.cuda.current_stream().wait_stream(stream)
        b.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(b.graph):
            b.logits = _step(self.model, self.cache, *b.inputs())
