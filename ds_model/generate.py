"""generate: batched decoding of prompts of different lengths (DeepSeekForCausalLM.generate).

One varlen prefill writes every prompt into a paged latent cache that holds prompt +
max_new_tokens tokens per sequence; then each step decodes one token for every sequence still
running, each at its own cache length. A sequence stops at an EOS token (which it keeps) or
after max_new_tokens; a finished sequence leaves the batch and costs nothing more.

Outputs follow transformers' generate: for a [B, S] tensor, [B, S + n] with n the longest
continuation, rows that stopped early padded with the (first) EOS id; for a list of prompts,
a list of 1-D tensors, each its prompt followed by its continuation.

Expert parallelism (a model built with ep_group): every rank calls generate on its own prompts
(any number, none included, each with its own max_new_tokens), and each MoE layer exchanges
tokens with the other ranks. A rank whose sequences are done keeps joining the exchanges
(model.join_experts) until every rank is done - one small all-reduce a step says so - so no
rank waits forever on one that left.
"""

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ds_model import speculative as _speculative

BLOCK_SIZE = 64  # tokens a cache page


@torch.inference_mode()
def generate(model, input_ids, max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
             generator: torch.Generator | None = None,
             on_step: Callable[[int], None] | None = None, fp8_kv_cache: bool = False,
             speculative: str | None = None, draft_tokens: int = 1, stats: dict | None = None,
             compile: bool = False):
    """Continue each prompt by up to max_new_tokens tokens (model: a DeepSeekForCausalLM).

    input_ids: an integer tensor [B, S], or a list of B prompts (1-D tensors or lists of ids),
    each at least one token long. temperature 0 is greedy (argmax); above 0, tokens are drawn
    (with ``generator``) from softmax(logits / temperature) cut to the top_p nucleus: the most
    likely tokens until their probabilities add up to top_p. eos_token_id: an id or a list of
    them; None takes model.config.eos_token_id, and None there never stops early. on_step(n)
    is called after each of the n steps (the first is the prefill), e.g. for a progress bar.
    fp8_kv_cache: hold the latent cache in FlashMLA's FP8 rows (KVCache), 57% of bf16's bytes
    (DeepSeek-V3.2: its index keys in FP8 rows too, 52%).
    speculative="mtp": greedy decoding with draft_tokens tokens a step drafted by the model's
    multi-token-prediction layer (from_pretrained(..., mtp=True)) and verified in one forward
    (ds_model/speculative.py): the same tokens as plain greedy; stats, a dict, then gets
    "steps", "drafted" and "accepted".
    compile=True: the decode steps run captured (ds_model/captured.py: CUDA graphs on CUDA,
    torch.compile elsewhere), the batch padded to a power of two; the same tokens as eager up
    to rounding. The first step of each batch size captures it: stats, a dict, then gets
    "capture_s", the seconds that took (torch.compile's graphs persist across calls; CUDA
    graphs are captured again for each call's cache).
    """
    group = getattr(model, "ep_group", None)
    prompts = _prompts(input_ids, model, allow_none=group is not None)
    if type(max_new_tokens) is not int or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    device = model.lm_head.weight.device
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device)         # [num_eos]
    if compile and (speculative is not None or group is not None):
        raise ValueError("compile=True captures plain decode steps: not with speculative= or "
                         "expert parallelism (ep_group)")
    if speculative is not None:
        _check_speculative(model, speculative, draft_tokens, temperature, group)
        if max_new_tokens:
            new, counts = _speculative.generate(model, prompts, max_new_tokens, draft_tokens,
                                                eos_ids, fp8_kv_cache, on_step, stats)
            return _outputs(input_ids, prompts, new, counts)

    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)    # [B]
    new = torch.full((B, max_new_tokens), eos[0] if eos else 0, device=device)  # [B, new]
    counts = torch.zeros(B, dtype=torch.long, device=device)            # [B] tokens generated
    done = B == 0 or max_new_tokens == 0
    if not done:
        capacities = [len(p) + max_new_tokens for p in prompts]
        if compile:
            from ds_model import captured  # it builds on model.py, which imports this module
            capacities = captured.capacities(capacities, BLOCK_SIZE)
        cache = model.new_cache(capacities, block_size=BLOCK_SIZE, fp8=fp8_kv_cache)
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)   # [B + 1]
        logits = model.prefill(torch.cat(prompts), cu_seqlens, cache)   # [B, V]
        if compile:
            decode = captured.CapturedDecode(model, cache)
    elif group is not None:
        model.join_experts()                                            # the others' prefill
    active = torch.arange(B, device=device)                             # [n] still running
    step = 0
    while True:  # one step of every rank: sample, then a decode forward (or joining one)
        if not done:
            tokens = _sample(logits, temperature, top_p, generator)     # [n]
            new[active, step] = tokens
            counts[active] = step + 1
            running = ~torch.isin(tokens, eos_ids)                      # [n]
            if on_step is not None:
                on_step(step + 1)
            step += 1
            done = step == max_new_tokens or not bool(running.any())
        if not _any_rank_running(not done, group, device):
            break
        if done:
            model.join_experts()
            continue
        active, tokens = active[running], tokens[running]
        logits = decode(tokens, active) if compile else model.decode(tokens, active, cache)

    if compile and stats is not None and B and max_new_tokens:
        stats["capture_s"] = decode.capture_s
    return _outputs(input_ids, prompts, new, counts)


def _outputs(input_ids, prompts, new, counts):
    """generate's result from the new tokens [B, max_new_tokens] and their counts [B]."""
    if isinstance(input_ids, torch.Tensor):
        return torch.cat([input_ids, new[:, :int(counts.max())].to(input_ids)], dim=1)
    return [torch.cat([p, new[b, :n]]) for b, (p, n) in enumerate(zip(prompts, counts.tolist()))]


def _check_speculative(model, speculative, draft_tokens, temperature, group):
    if speculative != "mtp":
        raise ValueError(f"speculative must be None or 'mtp', got {speculative!r}")
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
        raise ValueError(f"draft_tokens must be an int >= 1, got {draft_tokens!r}")
    if temperature != 0:
        raise ValueError(f"speculative='mtp' decodes greedily (temperature=0), got "
                         f"temperature={temperature}")
    if group is not None:
        raise ValueError("speculative='mtp' does not run with expert parallelism (ep_group)")
    if len(model.model.layers) == model.model.decoder_layers:
        raise ValueError("speculative='mtp' needs the model's multi-token-prediction layer: "
                         "load it with from_pretrained(..., mtp=True)")


def _any_rank_running(running: bool, group, device) -> bool:
    """Whether this rank (``running``) or, with expert parallelism, any rank of ``group`` has
    another decode step; every rank calls it once a step."""
    if group is None:
        return running
    flag = torch.tensor([int(running)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())


def _prompts(input_ids, model, allow_none: bool = False) -> list[torch.Tensor]:
    """The prompts as 1-D int64 tensors on the model's device, checked; an empty list only
    with ``allow_none`` (an expert-parallel rank without prompts)."""
    device = model.lm_head.weight.device
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"input_ids must be an integer [B, S] tensor or a list of prompts, "
                             f"got {input_ids.dtype} {tuple(input_ids.shape)}")
        input_ids = list(input_ids)
    if allow_none and isinstance(input_ids, (list, tuple)) and not input_ids:
        return []
    if not isinstance(input_ids, (list, tuple)) or not input_ids:
        raise ValueError("input_ids must be an integer [B, S] tensor or a non-empty list of "
                         f"prompts, got {type(input_ids).__name__} {input_ids!r:.80}")
    prompts = [torch.as_tensor(p) for p in input_ids]
    for b, p in enumerate(prompts):
        if p.dim() != 1 or len(p) == 0 or p.is_floating_point():
            raise ValueError(f"prompt {b} must be a non-empty 1-D list of integer ids, got "
                             f"{p.dtype} of shape {tuple(p.shape)}")
    prompts = [p.to(device, torch.long) for p in prompts]
    ids = torch.cat(prompts)
    vocab = model.config.vocab_size
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"token ids must be in [0, vocab_size={vocab}), got values in "
                         f"[{low}, {high}]")
    return prompts


def _sample(logits, temperature, top_p, generator):                    # [n, V]
    if temperature == 0:
        return logits.argmax(dim=-1)                                    # [n]
    probs = torch.softmax(logits.float() / temperature, dim=-1)         # [n, V]
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep a token while the mass before it is below top_p: the most likely always stays
        sorted_probs[sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [n]
