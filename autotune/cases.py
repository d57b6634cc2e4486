"""What a sweep runs, per op: default shapes, buckets, inputs, the shape key and bucket under
which ds_kernels looks the result up, and how to call and check the op.

Shape keys come from ds_kernels.tuning.SHAPE_KEYS, the table the ops use at run time, so a
stored result is always found. The bucket is the token count T, except M rows for grouped_mm
and quant_linear, B sequences for mla_decode, and T queries for sparse_mla and
lightning_indexer (one a sequence, as in decode).

The GEMM ops also run on quantised weights (``weights`` "fp8" or "mxfp4", DeepSeek's formats):
their configs are tuned apart, under the kernel names tuning.gemm_kernel gives them (and
quant_linear's fmt= key), since decoding weight tiles in the K-loop moves the best tiles.
"""

import dataclasses
from typing import Callable

import torch

import ds_kernels
from autotune import spaces
from ds_kernels import tuning
from ds_kernels.quant_formats import FP8, MXFP4, MXFP4_GROUP

# Default shapes: DeepSeek-V3 on a GPU (MLA with 16 heads, as with 8-way tensor parallelism,
# and with all 128); on CPU the benchmark shapes, with smaller experts and fewer heads.
_V3_MLA = dict(Dc=512, Dr=64, page=64)
_V3_PREFILL = dict(Dqk=192, Dv=128, causal=1, seqs=4)
SHAPES = {
    "fused_moe": {"cuda": [dict(E=256, I=2048, H=7168, k=8)],
                  "cpu": [dict(E=64, I=256, H=1024, k=6)]},
    "grouped_mm": {"cuda": [dict(E=256, N=4096, K=7168)], "cpu": [dict(E=64, N=512, K=1024)]},
    "route": {"cuda": [dict(E=256, n_group=8, topk_group=4, k=8)],
              "cpu": [dict(E=256, n_group=8, topk_group=4, k=8)]},
    "mla_decode": {"cuda": [dict(_V3_MLA, Hq=16, context=4096),
                            dict(_V3_MLA, Hq=128, context=4096)],
                   "cpu": [dict(_V3_MLA, Hq=16, context=2048)]},
    "mla_prefill": {"cuda": [dict(_V3_PREFILL, H=16), dict(_V3_PREFILL, H=128)],
                    "cpu": [dict(_V3_PREFILL, H=4)]},
    # DeepSeek-V3.2's DSA: top 2048 keys by the 64 x 128 indexer, 576-wide latent rows.
    "lightning_indexer": {"cuda": [dict(H=64, D=128, page=64, top_k=2048, context=16384)],
                          "cpu": [dict(H=64, D=128, page=64, top_k=2048, context=4096)]},
    "sparse_mla": {"cuda": [dict(_V3_MLA, Hq=16, top_k=2048), dict(_V3_MLA, Hq=128, top_k=2048)],
                   "cpu": [dict(_V3_MLA, Hq=16, top_k=2048)]},
    # DeepSeek-V3's q_b_proj, o_proj and shared expert gate+up; on CPU the bench's quick shape.
    "quant_linear": {"cuda": [dict(N=24576, K=1536), dict(N=7168, K=16384), dict(N=4096, K=7168)],
                     "cpu": [dict(N=2048, K=2048)]},
}
_TOKENS = {"cuda": [1, 4, 16, 64, 256, 1024, 4096, 16384], "cpu": [1, 16, 256, 4096]}
_QUICK_TOKENS = {"cuda": [1, 64, 4096], "cpu": [1, 64, 4096]}
# (full, quick) buckets per op and device.
BUCKETS = {
    **{op: {d: (_TOKENS[d], _QUICK_TOKENS[d]) for d in _TOKENS}
       for op in ("fused_moe", "grouped_mm", "route", "quant_linear")},
    "mla_decode": {"cuda": ([1, 2, 4, 8, 16, 32, 64, 128], [1, 8, 64]),
                   "cpu": ([1, 4, 16], [1, 8])},
    **{op: {"cuda": ([1, 4, 16, 64, 256, 1024], [1, 64, 1024]), "cpu": ([1, 4, 16], [1, 16])}
       for op in ("lightning_indexer", "sparse_mla")},
    "mla_prefill": {"cuda": ([256, 1024, 4096, 8192], [1024, 8192]),
                    "cpu": ([256, 1024, 4096], [256, 2048])},
}
# The kernels of an op that are tuned apart (each has its own entries and override), as
# (forward, backward) lists; None is an op's forward where its key has no kernel prefix.
KERNELS = {
    **{(op, backend): ([None], ["backward"])
       for op in ("fused_moe", "grouped_mm") for backend in ("triton", "torch")},
    ("mla_prefill", "triton"): (["fwd"], ["dkdv", "dq"]),
    ("mla_prefill", "torch"): (["fwd"], ["bwd"]),
    ("quant_linear", "triton"): ([None], ["backward"]),
}
# What a sweep on quantised weights tunes, per backend: the ops with a knob for them. (The
# torch grouped_mm runs quant_linear per expert on them: its knob is quant_linear's.)
WEIGHTS_OPS = {"triton": ("fused_moe", "grouped_mm", "quant_linear"),
               "torch": ("fused_moe", "quant_linear")}
WEIGHTS = (FP8, MXFP4)
# Weights' in-features per op: MXFP4 needs them in whole groups of 32.
_IN_FEATURES = {"fused_moe": ("H", "I"), "grouped_mm": ("K",), "quant_linear": ("K",)}


@dataclasses.dataclass
class Case:
    """One (shape, bucket, kernel) of an op: inputs made once, the reference answer, a runner."""

    op: str
    shape_key: str
    bucket: int
    run: Callable[[], torch.Tensor]  # the op on the inputs, under the current override/backend
    expected: torch.Tensor
    reduction: int  # reduction length, for the tolerance
    candidates: list[dict]
    kernel: str | None = None  # for an op with several kernels: the one the candidates tune


def check_weights(op: str, backend: str, weights: str | None):
    """Raise ValueError if ``op`` on ``backend`` has nothing to tune on ``weights`` (None:
    unquantised)."""
    if weights is None:
        if op == "quant_linear":
            raise ValueError("quant_linear multiplies quantised weights: sweep it with "
                             "--dtype fp8 or --dtype mxfp4")
        return
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if op not in WEIGHTS_OPS[backend]:
        why = (" (on quantised weights it runs quant_linear per expert: sweep --op quant_linear)"
               if op == "grouped_mm" else "")
        raise ValueError(f"{op} has no {backend} config for {weights} weights to tune{why}; "
                         f"ops with one: {', '.join(WEIGHTS_OPS[backend])}")


def check_shape(op: str, shape: dict, routing=None, weights: str | None = None):
    """Raise ValueError, naming what is wrong, if ``op`` cannot be swept at ``shape`` (with the
    recorded ``routing`` of fused_moe, on ``weights``): before a sweep tunes any shape for
    minutes."""
    if op not in _BUILDERS:
        raise ValueError(f"no sweep for op {op!r}; ops: {sorted(_BUILDERS)}")
    needed = set(SHAPES[op]["cpu"][0])
    if set(shape) != needed:
        raise ValueError(f"a {op} shape needs exactly {', '.join(sorted(needed))}; got "
                         f"{', '.join(sorted(shape))}")
    partial = [d for d in _IN_FEATURES.get(op, ()) if shape[d] % MXFP4_GROUP]
    if weights == MXFP4 and partial:
        raise ValueError(f"MXFP4 weights need in-features in groups of {MXFP4_GROUP}, but "
                         + ", ".join(f"{d}={shape[d]}" for d in partial))
    if routing is None or op != "fused_moe":
        return
    if routing.shape[1] != shape["k"]:
        suggested = ",".join(f"{name}={value}" for name, value in
                             dict(shape, k=routing.shape[1]).items())
        raise ValueError(f"the recorded routing has k={routing.shape[1]} experts per token, but "
                         f"the shape {tuning.shape_key(op, **shape)} has k={shape['k']}; "
                         f"sweep the recorded model's shape: --shapes {suggested}")
    if int(routing.max()) >= shape["E"]:
        raise ValueError(f"the recorded routing uses expert {int(routing.max())}, but "
                         f"E={shape['E']}")


# Elements of a case's input tensors, per op: a lower bound of what a case holds (outputs,
# intermediates and gradients come on top), to refuse a shape the device cannot hold.
_INPUT_ELEMENTS = {
    "fused_moe": lambda s, n: n * s["H"] + 3 * s["E"] * s["I"] * s["H"] + n * s["k"],
    "grouped_mm": lambda s, n: n * s["K"] + s["E"] * s["K"] * s["N"],
    "route": lambda s, n: n * s["E"],
    "mla_decode": lambda s, n: n * (s["Dc"] + s["Dr"]) * (
        -(-s["context"] // s["page"]) * s["page"] + s["Hq"]),
    "mla_prefill": lambda s, n: n * s["H"] * (2 * s["Dqk"] + s["Dv"]),
    "lightning_indexer": lambda s, n: n * s["D"] * (s["H"] + s["context"]),
    "sparse_mla": lambda s, n: n * (s["Dc"] + s["Dr"]) * (s["Hq"] + s["top_k"]),
    "quant_linear": lambda s, n: n * s["K"] + s["N"] * s["K"],
}


def check_memory(op: str, shape: dict, n: int, device: torch.device, dtype):
    """Raise ValueError if the inputs of ``op`` at ``shape`` and bucket ``n`` alone exceed the
    device's free memory, before anything is allocated."""
    need = _INPUT_ELEMENTS[op](shape, n) * dtype.itemsize
    free = free_memory_bytes(device)
    if need > free:
        raise ValueError(f"{op} at {tuning.shape_key(op, **shape)} with {n} tokens needs at least "
                         f"{need / 2**30:.1f} GiB for its inputs, but {device} has "
                         f"{free / 2**30:.1f} GiB free; sweep smaller --shapes or --tokens")


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of a GPU, or the memory Linux can give this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as meminfo:
        available = next(line for line in meminfo if line.startswith("MemAvailable:"))
    return int(available.split()[1]) * 1024  # in kB


def _routing(T, E, k, device, replay, g):
    """topk_ids [T, k]: replayed rows of a recorded routing (cycled), else k distinct uniform
    random experts per token."""
    if replay is not None:
        return replay[torch.arange(T) % replay.shape[0]].to(device)
    return torch.rand(T, E, generator=g).argsort(-1)[:, :k].to(device)


def _reference(fn):
    with ds_kernels.use_backend("reference"):
        return fn()


def _lengths(total: int, seqs: int, g) -> list[int]:
    """``seqs`` ragged lengths (each 1/2 to 3/2 of the mean) summing to ``total``."""
    weights = 0.5 + torch.rand(seqs, generator=g)
    cuts = (weights.cumsum(0) / weights.sum() * total).round().long()
    return torch.diff(cuts, prepend=torch.zeros(1, dtype=torch.long)).tolist()


def _forward_or_grads(fn, inputs, backward: bool):
    """A runner of ``fn(*inputs)``: its (first) output, or with ``backward`` the gradients of
    all ``inputs`` for a fixed random output gradient."""
    grad = []

    def run():
        leaves = [t.detach().requires_grad_(backward) for t in inputs]
        out = fn(*leaves)
        out = out[0] if isinstance(out, tuple) else out
        if not backward:
            return out
        if not grad:
            grad.append(torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
                        .to(out))
        out.backward(grad[0])
        return torch.cat([t.grad.float().flatten() for t in leaves])
    return run


def _quantized(w, weights):
    """(w_q, scale) of w [..., N, K] in the format ``weights``."""
    return ds_kernels.quantize_fp8_block(w) if weights == FP8 else ds_kernels.quantize_mxfp4(w)


def _fused_moe(shape, n, device, dtype, g, routing, backward, weights):
    E, I, H, k = shape["E"], shape["I"], shape["H"], shape["k"]
    hidden = torch.randn(n, H, generator=g).to(device, dtype)              # [T, H]
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(device, dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(device, dtype)
    ids = _routing(n, E, k, device, routing, g)                             # [T, k]
    weights_ = torch.rand(n, k, generator=g).to(device)
    if weights is None:
        def fn(hidden, w13, w2, topk_weights):
            return ds_kernels.fused_moe(hidden, w13, w2, topk_weights, ids)
        inputs = [hidden, w13, w2, weights_]
    else:  # frozen quantised experts: gradients of the hidden states and routing weights
        (w13_q, w13_scale), (w2_q, w2_scale) = _quantized(w13, weights), _quantized(w2, weights)

        def fn(hidden, topk_weights):
            return ds_kernels.fused_moe(hidden, w13_q, w2_q, topk_weights, ids,
                                        w13_scale=w13_scale, w2_scale=w2_scale)
        inputs = [hidden, weights_]
    # The weight gradients sum over an expert's rows, about n * k / E of them.
    reduction = H + I + (n * k // E if backward and weights is None else 0)
    return _forward_or_grads(fn, inputs, backward), reduction


def _grouped_mm(shape, n, device, dtype, g, backward, weights):
    E, N, K = shape["E"], shape["N"], shape["K"]
    a = torch.randn(n, K, generator=g).to(device, dtype)                    # [M, K]
    b = (torch.randn(E, K, N, generator=g) / K**0.5).to(device, dtype)
    sizes = torch.bincount(torch.randint(0, E, (n,), generator=g), minlength=E)
    offs = sizes.cumsum(0).to(device=device, dtype=torch.int32)
    if weights is None:
        def fn(a, b):
            return ds_kernels.grouped_mm(a, b, offs)
        inputs = [a, b]
    else:  # b = W^T of a weight W [E, N, K] quantised along its in-features, as published
        w_q, scale = _quantized(b.transpose(1, 2).contiguous(), weights)

        def fn(a):
            return ds_kernels.grouped_mm(a, w_q.transpose(1, 2), offs,
                                         b_scale=scale.transpose(1, 2))
        inputs = [a]
    reduction = max(K, N) + (n // E if backward and weights is None else 0)
    return _forward_or_grads(fn, inputs, backward), reduction


def _quant_linear(shape, n, device, dtype, g, backward, weights):
    N, K = shape["N"], shape["K"]
    x = torch.randn(n, K, generator=g).to(device, dtype)                    # [M, K]
    w_q, scale = _quantized((torch.randn(N, K, generator=g) / K**0.5).to(device, dtype), weights)

    def fn(x):
        return ds_kernels.quant_linear(x, w_q, scale)
    return _forward_or_grads(fn, [x], backward), max(N, K)


def _route(shape, n, device, dtype, g):
    logits = torch.randn(n, shape["E"], generator=g).to(device, dtype)

    def run():
        weights, ids = ds_kernels.route(logits, shape["k"], n_group=shape["n_group"],
                                        topk_group=shape["topk_group"])
        return torch.cat([weights, ids.float()], dim=1)  # ids must match exactly
    return run, 1


def _mla_decode(shape, n, device, dtype, g):
    Hq, Dc, Dr, page, context = (shape[x] for x in ("Hq", "Dc", "Dr", "page", "context"))
    lens = torch.randint(context // 2, context + 1, (n,), generator=g)      # [B]
    pages = -(-context // page)
    block_table = torch.randperm(n * pages, generator=g).view(n, pages)    # [B, pages] shuffled
    kv_cache = torch.randn(n * pages, page, Dc + Dr, generator=g).to(device, dtype)
    q_nope = torch.randn(n, Hq, Dc, generator=g).to(device, dtype)
    q_pe = torch.randn(n, Hq, Dr, generator=g).to(device, dtype)
    args = (q_nope, q_pe, kv_cache, block_table.to(device, torch.int32),
            lens.to(device, torch.int32), (Dc + Dr) ** -0.5)

    def run():
        out, lse = ds_kernels.mla_decode(*args)
        return torch.cat([out.float().flatten(), lse.flatten()])
    return run, context + Dc + Dr


def _mla_prefill(shape, n, device, dtype, g, backward):
    H, Dqk, Dv, causal = shape["H"], shape["Dqk"], shape["Dv"], bool(shape["causal"])
    lengths = _lengths(n, shape["seqs"], g)
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(device, torch.int32)
    q, k = (torch.randn(n, H, Dqk, generator=g).to(device, dtype) for _ in range(2))
    v = torch.randn(n, H, Dv, generator=g).to(device, dtype)

    def fn(q, k, v):
        return ds_kernels.mla_prefill(q, k, v, cu_seqlens, causal=causal, softmax_scale=Dqk**-0.5)
    return (_forward_or_grads(fn, [q, k, v], backward),
            max(lengths) + Dqk + (Dv if backward else 0))


def _lightning_indexer(shape, n, device, dtype, g):
    """n sequences of ``context`` keys on shuffled pages, one query at the end of each. The run
    gives the scores of the keys it picked, sorted: near-equal scores may swap keys between
    backends, which the scores do not see."""
    H, D, page, context, top_k = (shape[x] for x in ("H", "D", "page", "context", "top_k"))
    pages = -(-context // page)
    k_cache = torch.randn(n * pages, page, D, generator=g).to(device, dtype)
    table = torch.randperm(n * pages, generator=g).view(n, pages).to(device, torch.int32)
    q = torch.randn(n, H, D, generator=g).to(device, dtype)
    weights = (torch.randn(n, H, generator=g) * (H * D) ** -0.5).to(device)
    seq = torch.arange(n, dtype=torch.int32, device=device)
    pos = torch.full((n,), context - 1, dtype=torch.int32, device=device)
    keys = k_cache.reshape(-1, D).double()

    def run():
        slots = ds_kernels.lightning_indexer(q, weights, k_cache, table, seq, pos, top_k)
        dots = torch.einsum("thd,tkd->tkh", q.double(), keys[slots.clamp_min(0).long()])
        scores = (dots.clamp_min(0) * weights.double()[:, None, :]).sum(-1)
        return scores.masked_fill(slots < 0, 0.0).sort(dim=1).values.float()
    return run, H * D


def _sparse_mla(shape, n, device, dtype, g):
    Hq, Dc, Dr, page, top_k = (shape[x] for x in ("Hq", "Dc", "Dr", "page", "top_k"))
    pages = -(-top_k // page)
    kv_cache = torch.randn(n * pages, page, Dc + Dr, generator=g).to(device, dtype)
    slots = torch.randint(0, n * pages * page, (n, top_k), generator=g)
    q = torch.randn(n, Hq, Dc + Dr, generator=g).to(device, dtype)
    args = (q, kv_cache, slots.to(device, torch.int32), (Dc + Dr) ** -0.5)

    def run():
        out, lse = ds_kernels.sparse_mla(*args, v_dim=Dc)
        return torch.cat([out.float().flatten(), lse.flatten()])
    return run, top_k + Dc + Dr


_BUILDERS = {"fused_moe": _fused_moe, "grouped_mm": _grouped_mm, "route": _route,
             "mla_decode": _mla_decode, "mla_prefill": _mla_prefill,
             "lightning_indexer": _lightning_indexer, "sparse_mla": _sparse_mla,
             "quant_linear": _quant_linear}


def make_cases(op: str, shape: dict, n: int, backend: str, device, dtype, *, quick: bool,
               backward: bool = False, routing=None, weights: str | None = None) -> list[Case]:
    """The cases of ``op`` at ``shape`` and bucket ``n`` (on quantised ``weights``, with
    activations in ``dtype``): one per kernel tuned apart, those of the backward pass too with
    ``backward``. The shape and weights are ones check_shape and check_weights accept."""
    device = torch.device(device)
    cases = []
    forward_kernels, backward_kernels = KERNELS.get((op, backend), ([None], []))
    for kernel in forward_kernels + (backward_kernels if backward else []):
        g = torch.Generator().manual_seed(n)
        options = {"fused_moe": dict(routing=routing)}.get(op, {})
        if op in _IN_FEATURES:
            options["weights"] = weights
        if (op, backend) in KERNELS:
            options["backward"] = kernel in backward_kernels
        elif op == "quant_linear":  # the torch path's one knob serves both directions
            options["backward"] = False
        if op in ("fused_moe", "grouped_mm"):
            kernel = tuning.gemm_kernel(weights, kernel == "backward")
        run, reduction = _BUILDERS[op](shape, n, device, dtype, g, **options)
        fits = _fits(op, backend, shape, n, kernel, dtype, device, weights)
        cases.append(Case(op, tuning.shape_key(op, kernel=kernel, fmt=weights, **shape), n, run,
                          _reference(run), reduction,
                          spaces.candidates(op, backend, quick=quick, fits=fits), kernel))
    return cases


def _fits(op, backend, shape, n, kernel, dtype, device, weights):
    """The static pruning of ``op``'s candidates at this shape and bucket (None: none)."""
    if backend != "triton":
        if op == "fused_moe" and weights is not None:  # its grouped_mm strategy runs mm_loop
            return lambda c: c["strategy"] != "grouped_mm"
        return None
    if op in _IN_FEATURES:
        if op == "fused_moe":
            rows, N, K, swiglu = n * shape["k"] / shape["E"], 2 * shape["I"], shape["H"], True
        elif op == "grouped_mm":
            rows, N, K, swiglu = n / shape["E"], shape["N"], shape["K"], False
        else:  # quant_linear: one "expert" of all the rows
            rows, N, K, swiglu = n, shape["N"], shape["K"], False
        if (kernel or "").endswith("backward"):  # both orientations, and no SwiGLU epilogue
            N = K = max(N, K)
            swiglu = False
        return lambda c: spaces.gemm_fits(c, rows, N, K, dtype, device, swiglu=swiglu)
    if op in ("mla_decode", "sparse_mla"):
        from ds_kernels.kernels import mla_decode

        return lambda c: mla_decode.fits(c, shape["Dc"], shape["Dr"], dtype, device)
    if op == "mla_prefill":
        from ds_kernels.kernels import mla_prefill

        return lambda c: mla_prefill.fits(kernel, c, shape["Dqk"], shape["Dv"], dtype, device)
    if op == "route":
        from triton import next_power_of_2

        from ds_kernels.kernels import route

        width = next_power_of_2(shape["n_group"]) * next_power_of_2(shape["E"] // shape["n_group"])
        return lambda c: route.fits(c, width)
    return None
