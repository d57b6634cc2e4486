"""Variable-length attention on the torch path: batched matmuls over chunks of query rows.

Each chunk is a run of query rows with one window of keys, computed as [Hq, rows, keys] score
blocks by torch.bmm, so memory stays O(score_elements + Hq * longest sequence), whatever T is:
- a long sequence is cut into pieces of rows; each piece sees its sequence's keys up to its
  last row (causal) or all of them. Causal pieces of about 1/pieces of the sequence skip most
  of the upper triangle, which SDPA's math path computes and masks;
- consecutive short sequences share a chunk whose window is the chunk itself, with a
  block-diagonal mask, so many short sequences cost a few matmuls, not many tiny ones.
Only the square block of keys that share the chunk's rows ever needs a mask.

Softmax in base 2 (log2(e) folded into the scale; exp2 is ~2x cheaper than exp here), with the
max subtracted per row; the backward recomputes probabilities from the saved lse (flash
attention's formulas), so it also never holds more than one chunk of scores.

Packed sequences share matmuls, where a masked score's probability 0 still meets the other
sequences' values: 0 * NaN would carry one request's NaN into another's output. So a NaN or
inf in q, k or v is found first, and then the inputs are read with those values zeroed and
the rows that see them are set to NaN afterwards (the policy of reference/mla_prefill.py).
Finite inputs pay one sum of each (~6% of a 256-token forward on the 2-core dev machine,
~1% from 1024 tokens up).

The three sizes below (KNOBS) are tuned per token-count bucket, separately for the forward
and the backward, by `python -m autotune sweep --op mla_prefill`.
"""

import math

import torch

from ds_kernels import tuning

# Measured single-threaded on a 2-core EPYC at Hq=4, Dqk=192, Dv=128, T = 256..4096 in four
# ragged sequences (bench/bench_mla_prefill.py); differences below ~15% were noise there.
KNOBS = dict(
    # Score elements per chunk: 2**22 fp32 is 16 MiB per [Hq, rows, keys] block.
    score_elements=1 << 22,
    # Pieces per long sequence, each at least _MIN_ROWS rows (smaller matmuls lose more to
    # overhead than they save): 8 computes ~56% of the full square, 1 piece (no cut) 100% and
    # ran 1.5x slower at 4096 tokens.
    pieces=8,
    # Packed chunks of short sequences hold at most this many scores (Hq * rows**2): 128 rows
    # at Hq = 4. Packing four sequences of 128-384 tokens into one square cost 2x.
    pack_elements=1 << 16,
)
_MIN_ROWS = 64
_LOG2E = 1.0 / math.log(2.0)


def _knobs(kernel, q, v, causal):
    T, H, Dqk = q.shape
    key = tuning.shape_key("mla_prefill", kernel=kernel, H=H, Dqk=Dqk, Dv=v.shape[2],
                           causal=causal)
    return tuning.config("mla_prefill", "torch", key, T, q.dtype, q.device, KNOBS, kernel=kernel)


def _plan(cu_seqlens, num_heads, causal, knobs):
    """The chunks covering every sequence's tokens: (rows, keys, blocked), rows and keys slices
    of tokens, blocked a [rows, rows] bool mask of the key block keys[rows] (None: no mask)."""
    device = cu_seqlens.device
    pack_rows = max(1, math.isqrt(knobs["pack_elements"] // num_heads))
    plan, packed = [], []  # packed: lengths of the short sequences in the open chunk

    def add(first, last, key_start, key_end, lengths):
        n = last - first
        blocked = torch.ones(n, n, dtype=torch.bool, device=device).triu(1) if causal else None
        if len(lengths) > 1:  # short sequences sharing the chunk: block-diagonal
            ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
            other = (ids[:, None] != ids[None, :]).to(device)         # [n, n]
            blocked = other if blocked is None else blocked | other
        plan.append((slice(first, last), slice(key_start, key_end), blocked))

    def close_packed(end):
        if packed:
            add(end - sum(packed), end, end - sum(packed), end, packed)
            packed.clear()

    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        length = end - start
        if length == 0:
            continue
        if length <= pack_rows:
            if sum(packed) + length > pack_rows:
                close_packed(start)
            packed.append(length)
            continue
        close_packed(start)
        rows = max(1, knobs["score_elements"] // (num_heads * length))
        if causal:
            rows = min(rows, max(_MIN_ROWS, length // knobs["pieces"]))
        for first in range(start, end, rows):
            last = min(end, first + rows)
            add(first, last, start, last if causal else end, [length])
    close_packed(bounds[-1])
    return plan


def _scores(qh, kh, rows, keys, blocked, scale2):
    """Base-2 scores [Hq, rows, keys] of one chunk, -inf where blocked."""
    s = torch.bmm(qh[:, rows], kh[:, keys].transpose(1, 2)).mul_(scale2)
    if blocked is not None:
        s[:, :, rows.start - keys.start:].masked_fill_(blocked, float("-inf"))
    return s


def _heads_first(t, dtype):
    return t.to(dtype).transpose(0, 1)                               # [Hq, T, D] view


def _finite_rows(t):
    """bool [T, Hq]: rows of t [T, Hq, D] without NaN or inf (amax keeps NaNs)."""
    return t.amax(dim=-1).isfinite() & t.amin(dim=-1).isfinite()


def _poisoned_rows(q, k, v, cu_seqlens, causal):
    """bool [T, Hq]: the (query, head) rows that see a NaN or inf, or None if there are none."""
    # The common case, all finite, in one pass over each input: a NaN or inf makes its sum
    # non-finite (a finite sum that overflows only costs the exact pass below).
    sums = torch.stack([t.sum(dtype=torch.float32) for t in (q, k, v)])
    if bool(sums.isfinite().all()):
        return None
    bad_q = ~_finite_rows(q)
    bad_key = ~(_finite_rows(k) & _finite_rows(v))                  # [T, Hq]
    if not (bad_q.any() or bad_key.any()):
        return None
    lengths = torch.diff(cu_seqlens).long()
    first = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)   # [T] its sequence's start
    seen = torch.cat([bad_key.new_zeros(1, bad_key.shape[1], dtype=torch.int64),
                      bad_key.long().cumsum(0)])                      # [T + 1, Hq] bad keys before
    last = torch.arange(1, q.shape[0] + 1, device=q.device) if causal else (
        torch.repeat_interleave(cu_seqlens[1:].long(), lengths))     # [T] one past its last key
    return bad_q | (seen[last] > seen[first])


def _zero_non_finite(*tensors):
    return [torch.where(t.isfinite(), t, 0) for t in tensors]


def mla_prefill(q, k, v, cu_seqlens, causal, softmax_scale):
    T, Hq, Dv = v.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    poisoned = _poisoned_rows(q, k, v, cu_seqlens, causal)
    if poisoned is not None:
        q, k, v = _zero_non_finite(q, k, v)
    qh, kh, vh = (_heads_first(t, acc) for t in (q, k, v))
    # Every token belongs to exactly one chunk, which writes its rows.
    out = torch.empty(T, Hq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, Hq, dtype=torch.float32, device=q.device)
    scale2 = softmax_scale * _LOG2E
    for rows, keys, blocked in _plan(cu_seqlens, Hq, causal, _knobs("fwd", q, v, causal)):
        p = _scores(qh, kh, rows, keys, blocked, scale2)             # [Hq, n, keys]
        row_max = p.amax(dim=-1, keepdim=True)  # finite: each row sees at least its own key
        p.sub_(row_max).exp2_()
        total = p.sum(dim=-1, keepdim=True)                          # [Hq, n, 1]
        out[rows] = torch.bmm(p, vh[:, keys]).div_(total).transpose(0, 1)
        lse[rows] = ((row_max + total.log2()) / _LOG2E).squeeze(-1).t()
    if poisoned is not None:
        out[poisoned] = float("nan")
        lse[poisoned] = float("nan")
    return out, lse


def mla_prefill_backward(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens, causal,
                         softmax_scale):
    acc = torch.promote_types(q.dtype, torch.float32)
    # The forward's NaN rows (lse NaN) are constants: their P is 0 and they pass no gradient;
    # every non-finite input has one (a key sees itself), so without them all is finite.
    poisoned = lse.isnan()                                            # [T, Hq]
    if poisoned.any():
        q, k, v = _zero_non_finite(q, k, v)
        out = out.masked_fill(poisoned[..., None], 0)
        lse = lse.masked_fill(poisoned, float("inf"))
    qh, kh, vh, doh = (_heads_first(t, acc) for t in (q, k, v, grad_out))
    # delta = d(loss)/d(lse) folded into rowsum(dO * O): dS = P * (dP - delta).
    delta = ((grad_out.to(acc) * out.to(acc)).sum(-1) - grad_lse).t()   # [Hq, T]
    lse2 = lse.t().to(acc) * _LOG2E                                   # [Hq, T]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)        # rows written once
    dk, dv = (torch.zeros(t.shape, dtype=acc, device=t.device) for t in (k, v))  # summed
    scale2 = softmax_scale * _LOG2E
    for rows, keys, blocked in _plan(cu_seqlens, q.shape[1], causal,
                                     _knobs("bwd", q, v, causal)):
        p = _scores(qh, kh, rows, keys, blocked, scale2)
        p.sub_(lse2[:, rows, None]).exp2_()                           # [Hq, n, keys]
        dv[keys] += torch.bmm(p.transpose(1, 2), doh[:, rows]).transpose(0, 1)
        ds = torch.bmm(doh[:, rows], vh[:, keys].transpose(1, 2))    # dP, then dS in place
        ds.sub_(delta[:, rows, None]).mul_(p).mul_(softmax_scale)
        dq[rows] = torch.bmm(ds, kh[:, keys]).transpose(0, 1)
        dk[keys] += torch.bmm(ds.transpose(1, 2), qh[:, rows]).transpose(0, 1)
    return dq, dk.to(k.dtype), dv.to(v.dtype)
