"""fused_moe: ds_kernels.fused_moe against transformers' DeepseekV3Experts (every
experts_implementation it registers), a plain torch version on F.grouped_mm, and the reference.

Three modes, told apart by shape["mode"]: "forward" (inference) and "forward+backward" (the
gradients of hidden, w13, w2 and topk_weights for a random output gradient, i.e. of (out *
random).sum()). CPU: fp32 at the issue's goal shape. CUDA: bf16 at DeepSeek-V3's layer, with
TFLOP/s and the percentage of the GPU's measured peak. Routing: k distinct uniformly random
experts per token with softmax weights, so every expert is about equally loaded (what a balanced
router aims for).

"quantised" (forward, bf16 activations on every device): ds_kernels on the experts quantised
as DeepSeek ships them - "ds_kernels[fp8]" (e4m3, 128x128 fp32 block scales, V3/R1) and
"ds_kernels[mxfp4]" (V4's experts) - against the bf16 weights that transformers dequantises
such an FP8 checkpoint to: transformers' experts and "ds_kernels[bf16]" on them. Each row's
gbytes_per_s counts the bytes that impl reads per call (hidden, the hit experts' weights as it
holds them, the routing) and writes (out); stderr says the bytes read per token and the weight
memory each format holds. The fp8 and bf16 rows are checked against ds_kernels[bf16], the
mxfp4 row against ds_kernels on its own dequantised weights. On a GPU with FP8 tensor cores,
"ds_kernels[fp8 w8a8]" (act_quant="fp8": activations quantised per token and 128 columns too,
DeepGEMM's recipe) joins them, checked against ds_kernels[bf16] to W8A8_TOLERANCE (e4m3's
rounding of every activation, not summation order).

Each shape's baseline is the fastest transformers implementation there ("transformers[...]").
Every impl's output (and, with backward, its four gradients) is checked against ds_kernels' before
it is timed; an impl that cannot run here (deepgemm and sonicmoe need the `kernels` package, a
GPU and bf16) is reported on stderr and has no row. Left out on purpose, also reported on stderr:
- "reference" above REFERENCE_MAX_T tokens (an fp64 loop over experts; it would dominate the run);
- transformers' batched_mm where it would gather more than a few GiB of per-assignment weights
  (it copies w13[e] and w2[e] for every (token, expert) pair: 3 MiB each here at fp32, 88 MiB on
  the GPU shape);
- with backward in --quick on CPU, transformers' eager and the reference: indexing w13[e] per
  expert makes autograd build a full-size [E, 2I, H] zero gradient for every hit expert (~3-5 s a
  call here), which would take the quick run far over its budget. Full runs time them.
- "torch.compile(reference)" in --quick on CPU. Note that Dynamo breaks its graph at the
  reference's data-dependent loop (nonzero, .tolist()), so it runs about as fast as the reference.
"""

import sys

import torch
import torch.nn.functional as F

import ds_kernels
from bench.harness import Impl, Row, assert_close, compare, format_shape, skip, working
from ds_kernels.kernels.grouped_mm import FP8_TENSOR_CORES
from ds_kernels.reference.fused_moe import fused_moe as reference_fused_moe

OP = "fused_moe"
FORWARD, BACKWARD, QUANTISED = "forward", "forward+backward", "quantised"
# The issue's goal shape on CPU; DeepSeek-V3's routed experts (one layer, all 256) on CUDA.
SHAPES = {"cpu": dict(H=1024, I=256, E=64, k=6), "cuda": dict(H=7168, I=2048, E=256, k=8)}
# (full, quick) token counts per device and mode.
TOKENS = {
    ("cpu", FORWARD): ((1, 16, 256, 4096), (1, 16, 4096)),
    ("cpu", BACKWARD): ((16, 256, 4096), (16, 4096)),
    ("cuda", FORWARD): ((1, 16, 256, 4096, 16384), (1, 16, 256, 4096, 16384)),
    ("cuda", BACKWARD): ((16, 256, 4096, 16384), (16, 4096)),
    ("cpu", QUANTISED): ((1, 16, 256, 4096), (1, 16, 256, 4096)),  # the four sizes
    ("cuda", QUANTISED): ((1, 16, 256, 4096, 16384), (16, 4096)),
}
REFERENCE_MAX_T = 256
# Relative (norm-wise) error allowed against ds_kernels: summation order only, in each dtype.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
# w8a8 against the unquantised activations: ~4% in norm in tests/test_fused_moe.py.
W8A8_TOLERANCE = 0.1
# Largest copy of gathered expert weights transformers' batched_mm may make on CPU; on CUDA,
# this fraction of the free memory.
CPU_GATHER_BYTES, CUDA_GATHER_FRACTION = 2 << 30, 0.3


def run(device: torch.device, quick: bool) -> list[Row]:
    kind = "cuda" if device.type == "cuda" else "cpu"
    dtype = torch.bfloat16 if kind == "cuda" else torch.float32
    H, I, E, K = SHAPES[kind].values()
    g = torch.Generator(device=device).manual_seed(0)
    # Scaled so every intermediate is O(1), as in a trained layer.
    w13 = torch.randn(E, 2 * I, H, generator=g, device=device, dtype=dtype).div_(H**0.5)
    w2 = torch.randn(E, H, I, generator=g, device=device, dtype=dtype).div_(I**0.5)
    compiled = (torch.compile(reference_fused_moe, dynamic=False)
                if kind == "cuda" or not quick else None)
    unavailable: set[str] = set()  # impls whose packages are missing: tried once
    rows = []
    for mode in (FORWARD, BACKWARD):
        for T in TOKENS[kind, mode][quick]:
            hidden = torch.randn(T, H, generator=g, device=device, dtype=dtype)
            ids = torch.rand(T, E, generator=g, device=device).argsort(dim=-1)[:, :K]  # [T, k]
            weights = torch.randn(T, K, generator=g, device=device).softmax(dim=-1)    # fp32
            shape = dict(T=T, H=H, I=I, E=E, k=K, mode=mode)
            rows += _bench(mode, shape, hidden, w13, w2, weights, ids, compiled, quick,
                           unavailable)
    experts = _quantised_experts(w13, w2)
    del w13, w2
    for T in TOKENS[kind, QUANTISED][quick]:
        hidden = torch.randn(T, H, generator=g, device=device, dtype=torch.bfloat16)
        ids = torch.rand(T, E, generator=g, device=device).argsort(dim=-1)[:, :K]  # [T, k]
        weights = torch.randn(T, K, generator=g, device=device).softmax(dim=-1)    # fp32
        shape = dict(T=T, H=H, I=I, E=E, k=K, mode=QUANTISED)
        rows += _bench_quantised(shape, hidden, weights, ids, experts, unavailable)
    return rows


def _quantised_experts(w13, w2):
    """{format: (w13, w2, w13_scale, w2_scale)}: "fp8" and "mxfp4" (where H and I fill its
    32-groups), and "bf16": the FP8 experts dequantised, as transformers loads an FP8
    checkpoint (scales None). Says on stderr how much memory each holds."""
    w13_q, w13_s = ds_kernels.quantize_fp8_block(w13)
    w2_q, w2_s = ds_kernels.quantize_fp8_block(w2)
    experts = {"fp8": (w13_q, w2_q, w13_s, w2_s),
               "bf16": (ds_kernels.dequantize(w13_q, w13_s, torch.bfloat16),
                        ds_kernels.dequantize(w2_q, w2_s, torch.bfloat16), None, None)}
    if w13.shape[2] % 32 or w2.shape[2] % 32:
        skip(OP, dict(mode=QUANTISED), "ds_kernels[mxfp4]", "MXFP4 needs H and I to be "
             "multiples of 32")
    else:
        (w13_q, w13_s), (w2_q, w2_s) = ds_kernels.quantize_mxfp4(w13), ds_kernels.quantize_mxfp4(w2)
        experts["mxfp4"] = (w13_q, w2_q, w13_s, w2_s)
    held = ", ".join(f"{fmt} {_expert_bytes(e, w13.shape[0]) / 2**20:.1f} MiB"
                     for fmt, e in experts.items())
    print(f"[{OP}] expert weights held ({w13.shape[0]} experts, codes + scales): {held}",
          file=sys.stderr, flush=True)
    return experts


def _expert_bytes(experts, n_hit):
    """Bytes of ``n_hit`` experts' weights and scales, as held."""
    return n_hit * sum(t[0].nbytes for t in experts if t is not None)  # t[0]: one expert


def _bench_quantised(shape, hidden, weights, ids, experts, unavailable):
    T = shape["T"]
    args = (hidden, weights, ids)
    impls = {}
    for fmt, (w13, w2, w13_scale, w2_scale) in experts.items():
        impls[f"ds_kernels[{fmt}]"] = (Impl(f"ds_kernels[{fmt}]", _quantised_call(
            w13, w2, w13_scale, w2_scale)), fmt)
    if hidden.device.type == "cuda" and (torch.cuda.get_device_capability(hidden.device)
                                         >= FP8_TENSOR_CORES):
        impls["ds_kernels[fp8 w8a8]"] = (Impl("ds_kernels[fp8 w8a8]", _quantised_call(
            *experts["fp8"], act_quant="fp8")), "fp8")
    bf16_w13, bf16_w2 = experts["bf16"][:2]
    for name in _hf_names():
        impl_name = f"transformers[{name}]"
        if name == "batched_mm":
            need = T * shape["k"] * 3 * shape["I"] * shape["H"] * bf16_w13.itemsize
            limit = (CPU_GATHER_BYTES if hidden.device.type != "cuda"
                     else CUDA_GATHER_FRACTION * torch.cuda.mem_get_info(hidden.device)[0])
            if need > limit:
                skip(OP, shape, impl_name, f"would gather {need / 2**30:.1f} GiB of expert "
                     f"weights (limit {limit / 2**30:.1f} GiB)")
                continue
        experts_fn = _hf_experts(name, shape, bf16_w13, bf16_w2, False)
        impls[impl_name] = (Impl(impl_name, lambda h, w, i, f=experts_fn: f(h, None, None, w, i)),
                            "bf16")
    n_hit = int(ids.unique().numel())
    moved = {fmt: 2 * hidden.nbytes + ids.nbytes + weights.nbytes + _expert_bytes(e, n_hit)
             for fmt, e in experts.items()}
    print(f"[{OP}] {format_shape(shape)}: bytes read per token (hit experts' weights / T): "
          + ", ".join(f"{fmt} {_expert_bytes(e, n_hit) / T / 2**10:.0f} KiB"
                      for fmt, e in experts.items()), file=sys.stderr, flush=True)

    with torch.inference_mode():
        want = {fmt: _quantised_call(*experts["bf16"][:2], None, None)(*args)
                for fmt in ("fp8", "bf16")}
        if "mxfp4" in experts:
            mx = experts["mxfp4"]
            want["mxfp4"] = _quantised_call(ds_kernels.dequantize(mx[0], mx[2], torch.bfloat16),
                                            ds_kernels.dequantize(mx[1], mx[3], torch.bfloat16),
                                            None, None)(*args)

        def check(name, got):
            assert_close(f"{OP} ({format_shape(shape)}) {name}", got, want[impls[name][1]],
                         W8A8_TOLERANCE if "w8a8" in name else TOLERANCE[torch.bfloat16])

        kept = working([impl for impl, _ in impls.values()], args, check, op=OP, shape=shape,
                       unavailable=unavailable)
        del want
        timing = dict(warmup=1) if hidden.device.type == "cpu" and T >= 1024 else {}
        flops = T * shape["k"] * (2 * shape["H"] * 2 * shape["I"] + 2 * shape["I"] * shape["H"])
        rows = compare(kept, args, op=OP, shape=shape, dtype=hidden.dtype, device=hidden.device,
                       tokens=T, flops=flops, **timing)
    hf = [r for r in rows if r.impl.startswith("transformers")]
    baseline = min(hf, key=lambda r: r.median_us).impl if hf else None
    for r in rows:
        r.baseline = baseline
        r.gbytes_per_s = round(moved[impls[r.impl][1]] / (r.median_us * 1e-6) / 1e9, 6)
    return rows


def _quantised_call(w13, w2, w13_scale, w2_scale, act_quant=None):
    def call(hidden, weights, ids):
        return ds_kernels.fused_moe(hidden, w13, w2, weights, ids, w13_scale=w13_scale,
                                    w2_scale=w2_scale, act_quant=act_quant)
    return call


def _bench(mode, shape, hidden, w13, w2, weights, ids, compiled, quick, unavailable):
    T, H, I, E, K = (shape[k] for k in ("T", "H", "I", "E", "k"))
    device, dtype = hidden.device, hidden.dtype
    backward = mode == BACKWARD
    if backward:
        # One set of leaves for every impl: transformers' modules hold w13 and w2 themselves.
        hidden = hidden.detach().requires_grad_()
        weights = weights.detach().requires_grad_()
        w13, w2 = torch.nn.Parameter(w13), torch.nn.Parameter(w2)
        args = (hidden, w13, w2, weights, ids, torch.randn_like(hidden))
    else:
        args = (hidden, w13, w2, weights, ids)

    ds_impl, others = _implementations(shape, w13, w2, compiled, quick, backward)
    tol = TOLERANCE.get(dtype, 2e-2)

    def check(name, got):
        assert_close(f"{OP} ({mode}, T={T}) {name} vs ds_kernels", got, want, tol)

    with torch.inference_mode(not backward):
        want = ds_impl(*args)  # also the warm-up: Triton compiles and autotunes here
        impls = [ds_impl] + working(others, args, check, op=OP, shape=shape,
                                    unavailable=unavailable)
        del want
        timing = dict(warmup=1) if device.type == "cpu" and T >= 1024 else {}
        flops = T * K * (2 * H * 2 * I + 2 * I * H) * (3 if backward else 1)
        # Forward: read hidden and the hit experts' weights, write out, read the routing.
        n_hit = int(ids.unique().numel())
        nbytes = (None if backward else
                  (2 * T * H + n_hit * 3 * I * H) * hidden.itemsize + ids.nbytes + weights.nbytes)
        rows = compare(impls, args, op=OP, shape=shape, dtype=dtype, device=device, tokens=T,
                       nbytes=nbytes, flops=flops,
                       **timing)
    hf = [r for r in rows if r.impl.startswith("transformers")]
    baseline = min(hf, key=lambda r: r.median_us).impl if hf else None
    for r in rows:
        r.baseline = baseline
    return rows


def _implementations(shape, w13, w2, compiled, quick, backward):
    """(ds_kernels, the others): each maps (hidden, w13, w2, weights, ids) to out [T, H], or with
    ``backward`` (..., grad_out) to (out, d hidden, d w13, d w2, d weights)."""
    T = shape["T"]
    device = w13.device
    wrap = _with_backward if backward else (lambda f: f)
    ds_impl = Impl("ds_kernels", wrap(ds_kernels.fused_moe))
    others = []
    for name in _hf_names():
        impl_name = f"transformers[{name}]"
        if name == "batched_mm":
            need = T * shape["k"] * 3 * shape["I"] * shape["H"] * w13.itemsize * (
                3 if backward else 1)
            limit = (CPU_GATHER_BYTES if device.type != "cuda"
                     else CUDA_GATHER_FRACTION * torch.cuda.mem_get_info(device)[0])
            if need > limit:
                skip(OP, shape, impl_name, f"would gather {need / 2**30:.1f} GiB of expert "
                     f"weights (limit {limit / 2**30:.1f} GiB)")
                continue
        if name == "eager" and backward and quick and device.type == "cpu":
            skip(OP, shape, impl_name, "--quick on CPU: ~3-5 s a call (a full-size weight "
                 "gradient per hit expert); timed in full runs")
            continue
        others.append(Impl(impl_name, wrap(_hf_experts(name, shape, w13, w2, backward))))
    others.append(Impl("torch.grouped_mm", wrap(torch_grouped_mm_moe)))

    references = []
    if T > REFERENCE_MAX_T:
        skip(OP, shape, "reference", f"T > {REFERENCE_MAX_T}: an fp64 loop over experts")
    elif backward and quick and device.type == "cpu":
        skip(OP, shape, "reference", "--quick on CPU: autograd through its loop costs ~3 s a "
             "call (as transformers' eager); timed in full runs")
    else:
        # Forward: the public op on the reference backend, as users would compare. Backward:
        # autograd straight through the reference (what its backward computes too): on CUDA,
        # autograd runs backward on its own thread, which use_backend's setting does not reach.
        references.append(Impl("reference", _with_backward(reference_fused_moe)) if backward
                           else Impl("reference", ds_kernels.fused_moe, backend="reference"))
    if compiled is not None:
        references.append(Impl("torch.compile(reference)", wrap(compiled)))
    if backward and references and device.type == "cuda":
        # Autograd through the fp64 loop keeps an fp64 copy of every hit expert's weights and
        # adds a full-size weight gradient per expert.
        E, I, H = shape["E"], shape["I"], shape["H"]
        need = E * 3 * I * H * (8 + 2 * w13.itemsize)
        free = torch.cuda.mem_get_info(device)[0]
        if need > 0.8 * free:
            for impl in references:
                skip(OP, shape, impl.name, f"needs ~{need / 2**30:.0f} GiB, "
                     f"{free / 2**30:.0f} GiB free")
            references = []
    return ds_impl, others + references


def _with_backward(forward):
    def forward_backward(hidden, w13, w2, weights, ids, grad_out):
        out = forward(hidden, w13, w2, weights, ids)
        return (out, *torch.autograd.grad(out, (hidden, w13, w2, weights), grad_out))
    return forward_backward


def torch_grouped_mm_moe(hidden, w13, w2, weights, ids):
    """The straightforward MoE on torch's grouped GEMM: sort the (token, expert) assignments by
    expert, gather their tokens, two grouped GEMMs, silu(gate) * up, weight, scatter-add."""
    grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    T, k = ids.shape
    order = ids.reshape(-1).argsort(stable=True)                   # [T*k] assignments by expert
    offs = torch.bincount(ids.reshape(-1), minlength=w13.shape[0]).cumsum(0).to(torch.int32)
    token = order // k
    gate, up = grouped_mm(hidden[token], w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    y = grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)             # [T*k, H]
    y = y * weights.reshape(-1)[order].unsqueeze(1).to(y.dtype)
    return torch.zeros_like(hidden).index_add(0, token, y)


def _hf_names():
    """"eager" (the module's own loop) and every name in transformers' ExpertsInterface."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return ["eager"]
    return list(dict.fromkeys(["eager", *ALL_EXPERTS_FUNCTIONS]))


def _hf_experts(name, shape, w13, w2, backward):
    """transformers' DeepseekV3Experts with ``name`` as experts_implementation, holding w13 and
    w2 (the very tensors with backward, so gradients reach the shared leaves)."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

    config = DeepseekV3Config(n_routed_experts=shape["E"], hidden_size=shape["H"],
                              moe_intermediate_size=shape["I"], num_experts_per_tok=shape["k"])
    config._experts_implementation = name
    with torch.device("meta"):  # no second copy of the weights
        experts = DeepseekV3Experts(config)
    if backward:
        experts.gate_up_proj, experts.down_proj = w13, w2    # the leaves themselves
    else:
        experts.gate_up_proj = torch.nn.Parameter(w13, requires_grad=False)  # shares storage
        experts.down_proj = torch.nn.Parameter(w2, requires_grad=False)

    def forward(hidden, w13, w2, weights, ids):
        return experts(hidden, ids, weights)
    return forward
