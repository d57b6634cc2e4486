"""What a sweep runs, per op: default shapes, token buckets, inputs, the shape key and bucket
under which ds_kernels looks the result up, and how to call and check the op.

The shape keys here must equal the ones the ops build at run time (ds_kernels/kernels/*.py,
ds_kernels/cpu/*.py): a result stored under another key is never found.
"""

import dataclasses
from typing import Callable

import torch

import ds_kernels
from autotune import spaces

# Default shapes: DeepSeek-V3 on a GPU; on CPU the benchmark shape, smaller experts.
SHAPES = {
    "fused_moe": {"cuda": [dict(E=256, I=2048, H=7168, k=8)],
                  "cpu": [dict(E=64, I=256, H=1024, k=6)]},
    "grouped_mm": {"cuda": [dict(E=256, N=4096, K=7168)], "cpu": [dict(E=64, N=512, K=1024)]},
    "route": {"cuda": [dict(E=256, n_group=8, topk_group=4, k=8)],
              "cpu": [dict(E=256, n_group=8, topk_group=4, k=8)]},
}
BUCKETS = {"cuda": [1, 4, 16, 64, 256, 1024, 4096, 16384],
           "cpu": [1, 16, 256, 4096]}
QUICK_BUCKETS = {"cuda": [1, 64, 4096], "cpu": [1, 64, 4096]}


@dataclasses.dataclass
class Case:
    """One (shape, bucket) of an op: inputs made once, the reference answer, and a runner."""

    op: str
    shape_key: str
    bucket: int
    run: Callable[[], torch.Tensor]  # the op on the inputs, under the current override/backend
    expected: torch.Tensor
    reduction: int  # reduction length, for the tolerance
    candidates: list[dict]


def _routing(T, E, k, device, replay):
    """topk_ids [T, k]: replayed rows of a recorded routing (cycled), else k distinct uniform
    random experts per token."""
    if replay is not None:
        if int(replay.max()) >= E:
            raise ValueError(f"the recorded routing uses expert {int(replay.max())}, but E={E}")
        return replay[torch.arange(T) % replay.shape[0]].to(device)
    return torch.rand(T, E).argsort(-1)[:, :k].to(device)


def _reference(fn):
    with ds_kernels.use_backend("reference"):
        return fn()


def make_case(op: str, shape: dict, n: int, backend: str, device, dtype, *, quick: bool,
              routing=None) -> Case:
    g = torch.Generator().manual_seed(n)
    if op == "fused_moe":
        E, I, H, k = shape["E"], shape["I"], shape["H"], shape["k"]
        hidden = torch.randn(n, H, generator=g).to(device, dtype)          # [T, H]
        w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(device, dtype)
        w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(device, dtype)
        ids = _routing(n, E, k, device, routing)                            # [T, k]
        weights = torch.rand(n, k, generator=g).to(device)

        def run():
            return ds_kernels.fused_moe(hidden, w13, w2, weights, ids)
        key, reduction, gemm = f"E={E},I={I},H={H},k={k}", H + I, (n * k / E, 2 * I, H, True)
    elif op == "grouped_mm":
        E, N, K = shape["E"], shape["N"], shape["K"]
        a = torch.randn(n, K, generator=g).to(device, dtype)                # [M, K]
        b = (torch.randn(E, K, N, generator=g) / K**0.5).to(device, dtype)
        sizes = torch.bincount(torch.randint(0, E, (n,), generator=g), minlength=E)
        offs = sizes.cumsum(0).to(device=device, dtype=torch.int32)

        def run():
            return ds_kernels.grouped_mm(a, b, offs)
        key, reduction, gemm = f"E={E},N={N},K={K}", K, (n / E, N, K, False)
    elif op == "route":
        logits = torch.randn(n, shape["E"], generator=g).to(device, dtype)

        def run():
            weights, ids = ds_kernels.route(logits, shape["k"], n_group=shape["n_group"],
                                            topk_group=shape["topk_group"])
            return torch.cat([weights, ids.float()], dim=1)  # ids must match exactly
        key, reduction, gemm = f"E={shape['E']}", 1, None
    else:
        raise ValueError(f"no sweep for op {op!r}; ops: {sorted(SHAPES)}")

    if backend == "torch":
        candidates = [dict(strategy=s) for s in spaces.CPU_STRATEGIES[op]]
    elif gemm is not None:
        rows, N_, K_, swiglu = gemm
        candidates = spaces.gemm_candidates(rows, N_, K_, dtype, torch.device(device),
                                            quick=quick, swiglu=swiglu)
    else:
        raise ValueError(f"{op} has no {backend} tuning space")
    return Case(op, key, n, run, _reference(run), reduction, candidates)
