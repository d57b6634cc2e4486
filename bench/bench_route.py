"""route: ds_kernels.route against its reference and transformers' DeepseekV3TopkRouter.

DeepSeek-V3's gate: E=256 experts in 8 groups, 4 groups kept, k=8, sigmoid scores, a correction
bias, renormalised weights scaled by 2.5. HF's router cannot run without its gate GEMM, so every
implementation starts from the same hidden states and runs that GEMM as HF does (hidden upcast
to fp32, fp32 weight); the rows then differ by the routing alone. "linear_only" is that GEMM by
itself: the floor under every other row.
"""

import torch
import torch.nn.functional as F

import ds_kernels
from bench.harness import Impl, Row, compare
from ds_kernels.reference.route import route as reference_route

E, N_GROUP, TOPK_GROUP, K, SCALE = 256, 8, 4, 8, 2.5
# DeepSeek-V3's hidden size is 7168; 1024 keeps the CPU's GEMM from drowning the routing.
H = 1024
TOKENS = (1, 16, 256, 4096)
QUICK_TOKENS = (1, 16, 4096)
BASELINE = "transformers"


def run(device: torch.device, quick: bool) -> list[Row]:
    # A GPU model's activations are bf16 (every impl upcasts them for the gate GEMM, as HF does).
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(E, H, generator=g) / H**0.5).to(device)   # [E, H], logits ~ N(0, 1)
    bias = (0.05 * torch.randn(E, generator=g)).to(device)           # [E]
    impls = _implementations(device, weight, bias, with_compile=device.type == "cuda" or not quick)
    rows = []
    with torch.inference_mode():
        for T in QUICK_TOKENS if quick else TOKENS:
            hidden = torch.randn(T, H, generator=g).to(device, dtype)  # [T, H]
            for impl in impls:
                if impl.name != "linear_only":
                    _check(impl.name, impl(hidden), bias)
            rows += compare(impls, (hidden,), op="route", shape=dict(T=T, H=H, E=E, k=K),
                            dtype=dtype, device=device, tokens=T, baseline=BASELINE,
                            # read hidden and weight; write ids and weights (4 bytes each)
                            nbytes=hidden.nbytes + weight.nbytes + T * K * 8)
    return rows


def _gate(hidden, weight):
    return F.linear(hidden.float(), weight)                       # [T, E] fp32, as HF computes it


def _implementations(device, weight, bias, with_compile):
    """Each maps hidden [T, H] to (logits, weights, ids)."""
    def ds_route(hidden):
        logits = _gate(hidden, weight)
        return (logits, *ds_kernels.route(logits, K, correction_bias=bias, n_group=N_GROUP,
                                          topk_group=TOPK_GROUP, routed_scaling_factor=SCALE))

    def reference(hidden):
        logits = _gate(hidden, weight)
        return (logits, *reference_route(logits, K, "sigmoid", bias, N_GROUP, TOPK_GROUP, True,
                                         SCALE, "top2_sum"))

    impls = [Impl("transformers", _hf_router(device, weight, bias)),
             Impl("ds_kernels", ds_route),
             Impl("reference", ds_route, backend="reference")]
    if with_compile:
        # Static shapes: one specialised graph per T, as a serving engine would capture.
        impls.append(Impl("torch.compile(reference)", torch.compile(reference, dynamic=False)))
    impls.append(Impl("linear_only", lambda hidden: _gate(hidden, weight)))
    return impls


def _hf_router(device, weight, bias):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = DeepseekV3Config(n_routed_experts=E, n_group=N_GROUP, topk_group=TOPK_GROUP,
                              num_experts_per_tok=K, hidden_size=H, norm_topk_prob=True,
                              routed_scaling_factor=SCALE)
    router = DeepseekV3TopkRouter(config).to(device)
    with torch.no_grad():
        router.weight.copy_(weight)
        router.e_score_correction_bias.copy_(bias)
    return router


def _check(name, out, bias):
    """``name`` must choose the experts ds_kernels chooses from the same logits, with the same
    weights; the order within a row is free (HF's top-k is unsorted)."""
    logits, weights, ids = out
    want_weights, want_ids = ds_kernels.route(logits, K, correction_bias=bias, n_group=N_GROUP,
                                              topk_group=TOPK_GROUP, routed_scaling_factor=SCALE)
    got, got_order = ids.long().sort(dim=-1)                      # [T, k]
    want, want_order = want_ids.long().sort(dim=-1)
    bad = (got != want).any(dim=-1)
    if bad.any():
        raise AssertionError(f"route: {name} chose other experts than ds_kernels for "
                             f"{int(bad.sum())} of {len(bad)} tokens, the first being "
                             f"token {int(bad.nonzero()[0])}")
    torch.testing.assert_close(weights.float().gather(1, got_order),
                               want_weights.gather(1, want_order),
                               msg=lambda m: f"route: {name} weights differ from ds_kernels: {m}")
