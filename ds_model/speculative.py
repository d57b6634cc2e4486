"""Self-speculative greedy decoding with DeepSeek's multi-token-prediction layer
(generate(..., speculative="mtp"); the layer: ds_model/mtp.py).

Each step, for every running sequence whose last emitted token t_n sits at position n:
1. verify: the main model decodes [t_n, d_1, ..., d_k] (the k drafts) in one forward, each
   token attending causally (KVCache.append with k + 1 tokens a sequence); its greedy choices
   y_0..y_k follow. The drafts agreeing with them from the start, d_1..d_a (d_j == y_{j-1}),
   are accepted, and y_a comes free: a + 1 tokens a step, the same ones plain greedy decoding
   would emit (y_j is the main model's argmax after the accepted prefix).
2. rewind: the main cache keeps t_n, d_1..d_a; the MTP cache drops its speculative rows.
3. draft: the MTP layer runs rows n..n+a on (the main model's hidden states there, the tokens
   emitted after them), the last predicting d_1 of the next step; then k - 1 rows more, each on
   the previous row's output and draft, for d_2..d_k (rows that step 2 drops next time).
The prompt's prefill fills both caches the same way (the MTP rows of every prompt position).
Greedy only: with drafts accepted only where they equal the argmax, the output is plain
greedy's (up to ties between logits, which batch shapes may round differently).
"""

import torch
import torch.nn.functional as F


@torch.inference_mode()
def generate(model, prompts, max_new_tokens: int, draft_tokens: int, eos_ids, fp8_kv_cache,
             on_step, stats):
    """(new [B, max_new_tokens] int64 padded with the first EOS id or 0, counts [B]) for
    prompts (1-D int64 tensors on the model's device, max_new_tokens >= 1); on_step(n) after
    each step (the first is the prefill), n the most tokens any sequence has so far; stats (a
    dict or None) gets "steps", "drafted" and "accepted" (draft tokens proposed and taken)."""
    device, B, k = model.lm_head.weight.device, len(prompts), draft_tokens
    lengths = torch.tensor([len(p) for p in prompts], device=device)    # [B]
    new = torch.full((B, max_new_tokens), int(eos_ids[0]) if len(eos_ids) else 0,
                     device=device)                                     # [B, new]
    counts = torch.zeros(B, dtype=torch.long, device=device)            # [B]
    totals = dict(steps=1, drafted=0, accepted=0)
    # Room for the k + 1 tokens a verification appends past the last one kept.
    capacities = [len(p) + max_new_tokens + k + 1 for p in prompts]
    cache = model.new_cache(capacities, fp8=fp8_kv_cache)
    mtp_cache = model.new_cache(capacities, fp8=fp8_kv_cache, mtp=True)

    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)       # [B + 1]
    ids = torch.cat(prompts)                                            # [T]
    hidden = model.model(ids, cache.fill(cu_seqlens), cache)            # [T, H]
    last = cu_seqlens[1:].long() - 1                                    # [B]
    token = model.lm_head(hidden[last]).argmax(-1)                      # [B] t_n
    active = torch.arange(B, device=device)
    running = _emit(new, counts, active, token[:, None], eos_ids, max_new_tokens)
    if on_step is not None:
        on_step(1)
    # The prompts' MTP rows: row i takes (h_i, t_{i+1}); t_n is the token just emitted.
    following = torch.cat([ids[1:], ids[:1]]).index_put((last,), token)  # [T]
    g, logits = model.model.draft(following, hidden, mtp_cache.fill(cu_seqlens), mtp_cache)
    active, token = active[running], token[running]
    g, first_draft = g[last][running], logits[last].argmax(-1)[running]

    while active.numel():
        drafts = _drafts(model, mtp_cache, active, g, first_draft, k)   # [n, k]
        n = active.numel()
        start = cache.seqlens[active].long()                            # [n] t_n's position
        tokens = torch.cat([token[:, None], drafts], dim=1)             # [n, k + 1]
        hidden = model.model(tokens.reshape(-1), cache.append(active, k + 1), cache)
        hidden = hidden.view(n, k + 1, -1)                              # [n, k + 1, H]
        choice = model.lm_head(hidden).argmax(-1)                       # [n, k + 1] y_0..y_k
        agreed = (drafts == choice[:, :k]).long().cumprod(dim=1).sum(dim=1)  # [n] a
        totals["steps"] += 1
        totals["drafted"] += n * k
        totals["accepted"] += int(agreed.sum())
        cache.rewind(active, start + agreed + 1)                        # t_n, d_1..d_a
        mtp_cache.rewind(active, start)                                 # its rows up to t_n's
        taken = torch.arange(k + 1, device=device) <= agreed[:, None]   # [n, k + 1] y_0..y_a
        running = _emit(new, counts, active, torch.where(taken, choice, -1), eos_ids,
                        max_new_tokens)
        if on_step is not None:
            on_step(int(counts.max()))
        active, taken, choice, hidden = (t[running] for t in (active, taken, choice, hidden))
        if not active.numel():
            break
        # MTP rows n..n+a: (the main model's hidden state there, the token emitted after it).
        rows = taken.sum(dim=1)                                         # [n] a + 1
        g, logits = model.model.draft(choice[taken], hidden[taken],
                                      mtp_cache.append(active, rows), mtp_cache)
        ends = torch.cumsum(rows, 0) - 1                                # [n] each one's last row
        g, first_draft = g[ends], logits[ends].argmax(-1)
        token = choice.gather(1, (rows - 1)[:, None]).squeeze(1)        # [n] y_a
    if stats is not None:
        stats.update(totals)
    return new, counts


def _drafts(model, mtp_cache, active, g, first_draft, k):
    """[n, k]: first_draft, then k - 1 more MTP rows, each on the previous row's output g and
    draft (appended to mtp_cache, to be rewound after verification)."""
    drafts = [first_draft]
    for _ in range(k - 1):
        g, logits = model.model.draft(drafts[-1], g, mtp_cache.append(active, 1), mtp_cache)
        drafts.append(logits.argmax(-1))
    return torch.stack(drafts, dim=1)


def _emit(new, counts, active, tokens, eos_ids, max_new_tokens):
    """Append each sequence active[i]'s tokens[i] ([n, m]; -1: none) to its row of new, up
    to and including its first EOS and within max_new_tokens; running [n] bool: which of them
    may continue."""
    valid = tokens >= 0
    eos = torch.isin(tokens, eos_ids) & valid
    valid &= (torch.cumsum(eos.long(), dim=1) - eos.long()) == 0        # nothing after an EOS
    room = max_new_tokens - counts[active]                              # [n]
    valid &= torch.cumsum(valid.long(), dim=1) <= room[:, None]
    where = counts[active][:, None] + torch.cumsum(valid.long(), dim=1) - 1   # [n, m]
    rows = active[:, None].expand_as(tokens)
    new.index_put_((rows[valid], where[valid]), tokens[valid])
    counts[active] += valid.sum(dim=1)
    return ~((eos & valid).any(dim=1) | (counts[active] >= max_new_tokens))
