"""speculative: generate(..., speculative="mtp") against plain greedy generate, on one model.

The model: bench_model's network (4 layers, hidden 256, DeepSeek-V3's head dims, 16 experts)
in ds_model with one MTP layer, random weights N(0, 0.02) - except that it is built so the MTP
layer agrees with the main model (``copying_mtp``): every residual branch of the main layers
writes zeros (o_proj, the experts' and MLPs' down projections), so the main model's next token
is a function of the current token alone, and the MTP layer is set to compute that function
of the token it is given. Every layer still does all its work. The acceptance rate is then
1.0 by construction: these rows measure what speculation costs and saves per token at a
given acceptance, not the acceptance a trained MTP layer reaches (DeepSeek reports 85-90% for
V3's second token).

Rows (op "speculative"): tokens/s of 1 (and 4) prompts of PROMPT tokens continued by NEW tokens
each, the prefill included, plain greedy (the baseline) and MTP with k = 1, 2, 3 drafts; notes["acceptance"] is the
measured rate. The outputs are checked equal to plain greedy's before timing.
"""

import sys

import torch

from bench.bench_model import CONFIG as MODEL_CONFIG
from bench.harness import Row, time_fns
from ds_model import DeepSeekForCausalLM, ModelConfig

OP = "speculative"
BASELINE = "greedy"
PROMPT, NEW = 128, 32
BATCHES = ((1, 4), (1,))                                            # (full, quick)
DRAFTS = (1, 2, 3)


def copying_mtp(model: DeepSeekForCausalLM) -> DeepSeekForCausalLM:
    """Make ``model``'s first MTP layer predict exactly what the main model will: zero every
    main layer's residual branches (the next token then depends on the current one only:
    lm_head(norm(embed(t)))), unit norm weights, and the MTP layer passing the embedding of the
    token it is given through (eh_proj = [I, 0], its own branches zeroed) to the shared head."""
    H = model.config.hidden_size
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj", "down_proj.weight")):
                tensor.zero_()
            elif name.endswith("norm.weight"):
                tensor.fill_(1.0)
        mtp = model.model.layers[model.model.decoder_layers]
        mtp.eh_proj.weight.zero_()
        mtp.eh_proj.weight[:, :H] = torch.eye(H)
        mtp.embed_tokens.weight.copy_(model.model.embed_tokens.weight)
        mtp.shared_head.head.weight.copy_(model.lm_head.weight)
    return model


def run(device: torch.device, quick: bool) -> list[Row]:
    config = ModelConfig.from_hf_config(MODEL_CONFIG)
    model = DeepSeekForCausalLM(config, mtp_layers=1).to(device)
    model.init_weights(generator=torch.Generator(device).manual_seed(0))
    model = copying_mtp(model).eval()
    g = torch.Generator().manual_seed(1)
    rows = []
    for B in BATCHES[quick]:
        prompts = [torch.randint(config.vocab_size, (PROMPT,), generator=g).to(device)
                   for _ in range(B)]
        want = model.generate(prompts, NEW)
        fns, acceptance = {BASELINE: lambda: model.generate(prompts, NEW)}, {BASELINE: None}
        for k in DRAFTS:
            stats = {}
            got = model.generate(prompts, NEW, speculative="mtp", draft_tokens=k, stats=stats)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), f"k={k}: not greedy's"
            name = f"mtp k={k}"
            fns[name] = (lambda k=k: model.generate(prompts, NEW, speculative="mtp",
                                                    draft_tokens=k))
            acceptance[name] = round(stats["accepted"] / stats["drafted"], 3)
        times = time_fns(fns, device, warmup=1, reps=5, budget_s=2.0)
        for name, t in times.items():
            notes = {} if acceptance[name] is None else {"acceptance": str(acceptance[name])}
            rows.append(Row(op=OP, impl=name, shape=dict(B=B, prompt=PROMPT, new=NEW),
                            dtype="float32", device=str(device), notes=notes,
                            median_us=round(t["median_us"], 3), p20_us=round(t["p20_us"], 3),
                            p80_us=round(t["p80_us"], 3),
                            tokens_per_s=round(B * NEW / (t["median_us"] * 1e-6), 1),
                            baseline=BASELINE, others_cpu=t["others_cpu"]))
            accepted = "" if acceptance[name] is None else f" (acceptance {acceptance[name]})"
            print(f"[speculative] B={B} {name}: {B * NEW / (t['median_us'] * 1e-6):.1f} "
                  f"tok/s{accepted}", file=sys.stderr, flush=True)
    return rows
