"""quant_linear: ds_kernels.quant_linear on FP8-block and MXFP4 weights against a plain linear on
the weight dequantised once to the activations' dtype (the baseline: what transformers does with
an FP8 checkpoint on CPU), the same dequantised on every call, and the reference.

shape["fmt"] and shape["x"] (the activations' dtype) tell the variants apart (a plot's lines);
each row's gbytes_per_s counts the bytes that
impl reads per call (activations, its weight as it holds it, output), and stderr says how much
weight memory each impl holds:
  ds_kernels:               the codes and scales: FP8 1 + 4/16384 bytes a weight, MXFP4
                            0.5 + 1/32 (the torch path dequantises chunks that stay in cache);
  F.linear(dequantised):    2 bytes a weight in bf16, 4 in fp32, held all the time;
  dequantize + F.linear:    the codes, plus the whole dequantised weight during each call.
CPU: fp32 and bf16 activations, N = K = 2048 in --quick (a DeepSeek projection is 7168 wide:
one such quick run at 7168 takes minutes on a 2-core machine), N = 4096, K = 7168 in full
runs. CUDA: bf16 at N = K = 7168, with TFLOP/s. Each impl's output is checked against
ds_kernels' before it is timed. The reference (an fp64 product) runs up to REFERENCE_MAX_T.
"""

import sys

import torch
import torch.nn.functional as F

import ds_kernels
from bench.harness import Impl, Row, assert_close, compare, format_shape, skip, working
from ds_kernels.reference.quant_linear import quant_linear as reference_quant_linear

OP = "quant_linear"
BASELINE = "F.linear(dequantised)"
SHAPES = {("cpu", False): dict(N=4096, K=7168), ("cpu", True): dict(N=2048, K=2048),
          ("cuda", False): dict(N=7168, K=7168), ("cuda", True): dict(N=7168, K=7168)}
TOKENS = {"cpu": (1, 16, 256, 4096), "cuda": (1, 16, 256, 4096, 16384)}
DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.bfloat16,)}
FORMATS = ("fp8", "mxfp4")
REFERENCE_MAX_T = 16
# Relative (norm-wise) error allowed against ds_kernels: rounding order, and in bf16 the
# rounding of each weight to bf16 where one side keeps it in fp32.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def run(device: torch.device, quick: bool) -> list[Row]:
    kind = "cuda" if device.type == "cuda" else "cpu"
    N, K = SHAPES[kind, quick].values()
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(N, K, generator=g, device=device).div_(K ** 0.5)  # outputs O(1)
    rows = []
    for fmt in FORMATS:
        w_q, scale = (ds_kernels.quantize_mxfp4(w) if fmt == "mxfp4"
                      else ds_kernels.quantize_fp8_block(w))
        for dtype in DTYPES[kind]:
            w_deq = ds_kernels.dequantize(w_q, scale, dtype)
            _say_memory(fmt, N, K, dtype, w_q, scale, w_deq)
            for T in TOKENS[kind]:
                x = torch.randn(T, K, generator=g, device=device).to(dtype)
                shape = dict(T=T, N=N, K=K, fmt=fmt, x=str(dtype).replace("torch.", ""))
                rows += _bench(shape, x, w_q, scale, w_deq)
    return rows


def _say_memory(fmt, N, K, dtype, w_q, scale, w_deq):
    held = (w_q.nbytes + scale.nbytes) / 2**20
    print(f"[{OP}] N={N} K={K} fmt={fmt} {str(dtype).replace('torch.', '')}: weight memory "
          f"held: ds_kernels {held:.1f} MiB, {BASELINE} {w_deq.nbytes / 2**20:.1f} MiB, "
          f"dequantize + F.linear {held:.1f} MiB + {w_deq.nbytes / 2**20:.1f} MiB during a call",
          file=sys.stderr, flush=True)


def _bench(shape, x, w_q, scale, w_deq):
    T = shape["T"]
    quantized = w_q.nbytes + scale.nbytes
    io = x.nbytes + T * w_deq.shape[0] * x.itemsize               # read x, write out
    impls = {"ds_kernels": (Impl("ds_kernels", lambda x: ds_kernels.quant_linear(x, w_q, scale)),
                            quantized + io)}
    others = {BASELINE: (Impl(BASELINE, lambda x: F.linear(x, w_deq)), w_deq.nbytes + io),
              "dequantize + F.linear": (
                  Impl("dequantize + F.linear", lambda x: F.linear(
                      x, ds_kernels.dequantize(w_q, scale, x.dtype))),
                  quantized + 2 * w_deq.nbytes + io)}
    if T <= REFERENCE_MAX_T:
        others["reference"] = (Impl("reference", lambda x: reference_quant_linear(
            x, w_q, scale)), None)
    else:
        skip(OP, shape, "reference", f"T > {REFERENCE_MAX_T}: an fp64 product")
    tol = TOLERANCE.get(x.dtype, 2e-2)

    def check(name, got):
        assert_close(f"{OP} ({format_shape(shape)}) {name} vs ds_kernels", got, want, tol)

    with torch.inference_mode():
        want = impls["ds_kernels"][0](x)
        kept = [impls["ds_kernels"][0]] + working([impl for impl, _ in others.values()], (x,),
                                                  check, op=OP, shape=shape)
        del want
        nbytes = {**impls, **others}
        rows = compare(kept, (x,), op=OP, shape=shape, dtype=x.dtype, device=x.device, tokens=T,
                       baseline=BASELINE, flops=2 * T * w_deq.numel())
    for r in rows:  # each impl moves its own bytes
        moved = nbytes[r.impl][1]
        r.gbytes_per_s = None if moved is None else round(moved / (r.median_us * 1e-6) / 1e9, 6)
    return rows
