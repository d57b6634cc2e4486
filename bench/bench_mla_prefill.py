"""mla_prefill: ds_kernels.mla_prefill against torch's scaled_dot_product_attention called once
per sequence (the baseline), torch's varlen_attn (CUDA, where it takes Dqk != Dv) and the
reference, forward and forward+backward (told apart by shape["mode"]).

T tokens split into B = 4 causal sequences of T/8, 2T/8, 3T/8 and 2T/8 tokens (ragged, as a
prefill batch is). Dqk = 192 (128 no-rope + 64 rope), Dv = 128 as in DeepSeek-V3. CPU: fp32,
Hq = 4. CUDA: bf16 at Hq = 16 (one tensor-parallel rank of 8) and 128 (the whole layer), with
TFLOP/s and the percentage of the GPU's measured peak. Useful flops count each causal (query,
key) pair once: 2 * (Dqk + Dv) per pair and head forward, 2 * (4 Dqk + 3 Dv) forward+backward
(the backward recomputes the scores and runs four more products).

Each impl's output (with backward, and its q, k, v gradients for a random output gradient) is
checked against ds_kernels' before it is timed; one that cannot run here is reported on stderr
and has no row. The reference (an fp64 loop over sequences) runs up to REFERENCE_MAX_T tokens.
"""

import inspect

import torch
import torch.nn.functional as F

from bench.bench_fused_moe import TOLERANCE
from bench.harness import Impl, Row, assert_close, compare, skip, working
from ds_kernels.ops.mla_prefill import mla_prefill
from ds_kernels.reference.mla_prefill import mla_prefill as reference_mla_prefill

OP = "mla_prefill"
FORWARD, BACKWARD = "forward", "forward+backward"
DQK, DV = 192, 128
HEADS = {"cpu": (4,), "cuda": (16, 128)}
TOKENS = {"cpu": ((256, 1024, 4096), (256, 1024)),                # (full, quick)
          "cuda": ((1024, 4096, 16384), (1024, 4096, 16384))}
SEQUENCE_EIGHTHS = (1, 2, 3, 2)
REFERENCE_MAX_T = {"cpu": 1024, "cuda": 4096}
BASELINE = "torch.sdpa per sequence"


def run(device: torch.device, quick: bool) -> list[Row]:
    kind = "cuda" if device.type == "cuda" else "cpu"
    dtype = torch.bfloat16 if kind == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for mode in (FORWARD, BACKWARD):
        for Hq in HEADS[kind]:
            for T in TOKENS[kind][quick]:
                lengths = [T * e // 8 for e in SEQUENCE_EIGHTHS]
                cu_seqlens = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
                q, k, v = (torch.randn(T, Hq, d, generator=g, device=device, dtype=dtype)
                           for d in (DQK, DQK, DV))
                shape = dict(T=T, B=len(lengths), Hq=Hq, Dqk=DQK, Dv=DV, mode=mode)
                rows += _bench(mode, shape, q, k, v, cu_seqlens, lengths)
    return rows


def _bench(mode, shape, q, k, v, cu_seqlens, lengths):
    T, Hq = shape["T"], shape["Hq"]
    device, dtype = q.device, q.dtype
    backward = mode == BACKWARD
    scale = DQK**-0.5
    wrap = _with_backward if backward else (lambda f: f)
    if backward:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        args = (q, k, v, cu_seqlens, torch.randn_like(v))
    else:
        args = (q, k, v, cu_seqlens)

    def ds(q, k, v, cu_seqlens):
        return mla_prefill(q, k, v, cu_seqlens, softmax_scale=scale)[0]

    bounds = cu_seqlens.tolist()

    def sdpa(q, k, v, cu_seqlens):
        return torch.cat([
            F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)),
                                           is_causal=True, scale=scale).transpose(0, 1)
            for a, b in zip(bounds[:-1], bounds[1:])])

    def varlen(q, k, v, cu_seqlens):
        from torch.nn.attention.varlen import varlen_attn
        # torch 2.10 and 2.11 take is_causal; later ones a (left, right) window.
        causal = (dict(is_causal=True) if "is_causal" in inspect.signature(varlen_attn).parameters
                  else dict(window_size=(-1, 0)))
        longest = max(lengths)
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, longest, longest, scale=scale,
                           **causal)

    ds_impl = Impl("ds_kernels", wrap(ds))
    others = [Impl(BASELINE, wrap(sdpa))]
    if device.type == "cuda":
        others.append(Impl("torch.varlen_attn", wrap(varlen)))
    if T > REFERENCE_MAX_T[device.type]:
        skip(OP, shape, "reference", f"T > {REFERENCE_MAX_T[device.type]}: an fp64 loop")
    else:
        # Backward by autograd through the reference, as bench_fused_moe explains.
        others.append(Impl("reference", wrap(
            lambda q, k, v, cu: reference_mla_prefill(q, k, v, cu, True, scale)[0])))

    def check(name, got):
        assert_close(f"{OP} ({mode}, T={T}, Hq={Hq}) {name} vs ds_kernels", got, want,
                     TOLERANCE.get(dtype, 2e-2))

    with torch.inference_mode(not backward):
        want = ds_impl(*args)  # also the warm-up: Triton compiles here
        impls = [ds_impl] + working(others, args, check, op=OP, shape=shape)
        del want
        pairs = sum(n * (n + 1) // 2 for n in lengths)             # causal (query, key) pairs
        flops = 2 * pairs * Hq * ((4 * DQK + 3 * DV) if backward else (DQK + DV))
        # Forward: read q, k, v; write out and the fp32 lse.
        nbytes = None if backward else T * Hq * ((2 * DQK + 2 * DV) * q.itemsize + 4)
        timing = dict(warmup=1) if device.type == "cpu" and T >= 1024 else {}
        return compare(impls, args, op=OP, shape=shape, dtype=dtype, device=device, tokens=T,
                       nbytes=nbytes, baseline=BASELINE, flops=flops,
                       **timing)


def _with_backward(forward):
    def forward_backward(q, k, v, cu_seqlens, grad_out):
        out = forward(q, k, v, cu_seqlens)
        return (out, *torch.autograd.grad(out, (q, k, v), grad_out))
    return forward_backward
