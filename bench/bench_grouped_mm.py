"""grouped_mm: ds_kernels.grouped_mm against torch's own grouped GEMM (the baseline) and the
reference, forward and forward+backward (told apart by shape["mode"]).

a [M, K] splits into E groups of about M / E rows each (each row's group drawn uniformly, so
some groups are empty at small M); b [E, K, N]. CPU: fp32, K=1024, N=512, E=64. CUDA: bf16 at
one expert-parallel rank's share of DeepSeek-V3's up projection (64 of the 256 experts, K=7168,
N=2I=4096), with TFLOP/s and the percentage of the GPU's measured peak. Each impl's output (and
gradients) is checked against ds_kernels' before it is timed; one that raises (torch's CPU
grouped_mm backward does for some layouts) is reported on stderr and has no row at that shape.
The reference runs up to REFERENCE_MAX_M rows, and with backward only in full runs on CPU
(autograd through its loop costs ~3 s a call); "torch.compile(reference)" only in full runs
(Dynamo breaks the graph at offs.tolist() and compiles the unrolled loop, ~30 s a shape on CPU).
"""

import torch
import torch.nn.functional as F

import ds_kernels
from bench.bench_fused_moe import TOLERANCE
from bench.harness import Impl, Row, assert_close, compare, skip, working
from ds_kernels.reference.grouped_mm import grouped_mm as reference_grouped_mm

OP = "grouped_mm"
FORWARD, BACKWARD = "forward", "forward+backward"
SHAPES = {"cpu": dict(K=1024, N=512, E=64), "cuda": dict(K=7168, N=4096, E=64)}
ROWS = {"cpu": ((16, 256, 4096), (16, 256, 4096)),                # (full, quick)
        "cuda": ((16, 256, 4096, 32768), (16, 256, 4096, 32768))}
REFERENCE_MAX_M = 256
BASELINE = "torch.grouped_mm"


def run(device: torch.device, quick: bool) -> list[Row]:
    kind = "cuda" if device.type == "cuda" else "cpu"
    dtype = torch.bfloat16 if kind == "cuda" else torch.float32
    K, N, E = SHAPES[kind].values()
    g = torch.Generator(device=device).manual_seed(0)
    b = torch.randn(E, K, N, generator=g, device=device, dtype=dtype).div_(K**0.5)
    # Static shapes: one graph per M. Dynamo breaks the graph at the reference's offs.tolist().
    compiled = None if quick else torch.compile(reference_grouped_mm, dynamic=False)
    rows = []
    for mode in (FORWARD, BACKWARD):
        for M in ROWS[kind][quick]:
            a = torch.randn(M, K, generator=g, device=device, dtype=dtype)
            group = torch.randint(0, E, (M,), generator=g, device=device)
            offs = torch.bincount(group, minlength=E).cumsum(0).to(torch.int32)   # [E]
            rows += _bench(mode, dict(M=M, K=K, N=N, E=E, mode=mode), a, b, offs, compiled,
                           quick)
    return rows


def _bench(mode, shape, a, b, offs, compiled, quick):
    M, K, N, E = (shape[k] for k in ("M", "K", "N", "E"))
    device, dtype = a.device, a.dtype
    backward = mode == BACKWARD
    wrap = _with_backward if backward else (lambda f: f)
    if backward:
        a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
        args = (a, b, offs, torch.randn(M, N, device=device, dtype=dtype))
    else:
        args = (a, b, offs)

    ds_impl = Impl("ds_kernels", wrap(ds_kernels.grouped_mm))
    others = []
    if hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm"):
        others.append(Impl(BASELINE, wrap(_torch_grouped_mm)))
    else:
        skip(OP, shape, BASELINE, f"torch {torch.__version__} has no grouped_mm")
    if M > REFERENCE_MAX_M:
        skip(OP, shape, "reference", f"M > {REFERENCE_MAX_M}: a loop over groups")
    elif backward and quick and device.type == "cpu":
        # Autograd builds a full-size [E, K, N] zero gradient for each b[e] the loop indexes.
        skip(OP, shape, "reference", "--quick on CPU: ~3 s a call; timed in full runs")
    else:
        # Backward by autograd through the reference: see bench_fused_moe on use_backend.
        others.append(Impl("reference", _with_backward(reference_grouped_mm)) if backward
                      else Impl("reference", ds_kernels.grouped_mm, backend="reference"))
    if compiled is not None:
        others.append(Impl("torch.compile(reference)", wrap(compiled)))

    def check(name, got):
        assert_close(f"{OP} ({mode}, M={M}) {name} vs ds_kernels", got, want,
                     TOLERANCE.get(dtype, 2e-2))

    with torch.inference_mode(not backward):
        want = ds_impl(*args)
        impls = [ds_impl] + working(others, args, check, op=OP, shape=shape)
        del want
        flops = 2 * M * K * N * (3 if backward else 1)
        # Forward: read a, the non-empty groups of b and offs; write out.
        groups = int((torch.diff(offs, prepend=offs.new_zeros(1)) > 0).sum())
        nbytes = (None if backward else
                  (M * K + groups * K * N + M * N) * a.itemsize + offs.nbytes)
        return compare(impls, args, op=OP, shape=shape, dtype=dtype, device=device, tokens=M,
                       nbytes=nbytes, baseline=BASELINE, flops=flops)


def _torch_grouped_mm(a, b, offs):
    grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return grouped_mm(a, b, offs=offs)


def _with_backward(forward):
    def forward_backward(a, b, offs, grad_out):
        out = forward(a, b, offs)
        return (out, *torch.autograd.grad(out, (a, b), grad_out))
    return forward_backward
