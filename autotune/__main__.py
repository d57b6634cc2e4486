"""python -m autotune sweep --op OP [--shapes ...] [--quick] [--dtype fp8] [--routing FILE] ...
   python -m autotune import-vllm FILE... [--hidden-size 7168] [--top-k 8]
   python -m autotune placement --routing FILE --experts E --ranks W [--redundant R] [--out F]"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from autotune import cases, placement, sweep, vllm
from ds_kernels import tuning

_FLOATS = ("float32", "float16", "bfloat16")


def _shape(text: str) -> dict:
    """"E=64,I=256,H=1024,k=6" -> {"E": 64, ...}"""
    try:
        return {k: int(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected NAME=INT,NAME=INT,...")


def _routing(path: Path, key: str = "topk_ids") -> torch.Tensor:
    """Recorded topk_ids [T, k] from .npy (never unpickled) or .safetensors (``key``: all
    layers' "topk_ids", or one router's name)."""
    if not path.is_file():
        raise SystemExit(f"--routing {path}: no such file (record one with `python -m ds_model "
                         "generate ... --record-routing FILE`)")
    if path.suffix == ".npy":
        ids = torch.from_numpy(np.load(path, allow_pickle=False))
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(path)
        if key not in tensors:
            raise SystemExit(f"--routing {path} has no {key!r}; it holds {sorted(tensors)}")
        ids = tensors[key]
    else:
        raise SystemExit(f"--routing {path}: expected a .npy or .safetensors file")
    if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
        raise SystemExit(f"--routing {path}: expected integer topk_ids [T, k], got "
                         f"{ids.dtype} {tuple(ids.shape)}")
    return ids


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m autotune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("sweep", help="tune an op on this machine and store the results")
    run.add_argument("--op", required=True, choices=sorted(cases.SHAPES))
    run.add_argument("--shapes", nargs="+", type=_shape,
                     help="e.g. E=256,I=2048,H=7168,k=8 for fused_moe; "
                     "Hq=16,Dc=512,Dr=64,page=64,context=4096 for mla_decode; "
                     "H=16,Dqk=192,Dv=128,causal=1,seqs=4 for mla_prefill; "
                     "N=7168,K=16384 for quant_linear; "
                     "H=64,D=128,page=64,top_k=2048,context=16384 for lightning_indexer; "
                     "Hq=128,Dc=512,Dr=64,page=64,top_k=2048 for sparse_mla "
                     "(default: the op's default shapes)")
    run.add_argument("--tokens", nargs="+", type=int,
                     help="buckets: tokens (rows for grouped_mm, sequences for mla_decode, "
                     "queries for lightning_indexer and sparse_mla); "
                     "default per op and device")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--dtype", choices=_FLOATS + cases.WEIGHTS,
                     help="the inputs' dtype (default: bfloat16 on cuda, float32 on cpu); fp8 or "
                     "mxfp4: the GEMM ops (fused_moe, grouped_mm, quant_linear) on weights in "
                     "DeepSeek's FP8-block or MXFP4 format, tuned apart from unquantised ones")
    run.add_argument("--activations", choices=_FLOATS,
                     help="with --dtype fp8 / mxfp4: the activations' dtype (default as --dtype)")
    run.add_argument("--quick", action="store_true", help="few shapes and candidates")
    run.add_argument("--backward", action="store_true",
                     help="also tune the backward kernels (fused_moe, grouped_mm, mla_prefill), "
                     "for training")
    run.add_argument("--routing", type=Path, help="recorded topk_ids to replay (.npy/.safetensors)")
    run.add_argument("--out", type=Path, help=f"default: {tuning.tuning_dir()}")
    place = commands.add_parser("placement", help="an expert_map for expert parallelism that "
                                "evens out recorded routing over the ranks")
    place.add_argument("--routing", type=Path, required=True,
                       help="recorded topk_ids (.npy/.safetensors, ds_model --record-routing)")
    place.add_argument("--layer", default="topk_ids",
                       help="a router's name in the .safetensors file (default: all layers)")
    place.add_argument("--experts", type=int, required=True, help="routed experts E")
    place.add_argument("--ranks", type=int, required=True, help="expert-parallel ranks W")
    place.add_argument("--redundant", type=int, default=0,
                       help="extra copies of hot experts (E + R a multiple of W)")
    place.add_argument("--out", type=Path, help="write the map as JSON (default: stdout)")
    imp = commands.add_parser("import-vllm", help="convert vLLM fused_moe tuned files")
    imp.add_argument("files", nargs="+", type=Path)
    imp.add_argument("--hidden-size", type=int, default=7168)
    imp.add_argument("--top-k", type=int, default=8)
    imp.add_argument("--dtype", default="bfloat16")
    imp.add_argument("--out", type=Path, help=f"default: {tuning.tuning_dir()}")
    args = parser.parse_args(argv)

    if args.command == "placement":
        _placement(args)
        return
    if args.command == "import-vllm":
        failed = 0
        for path in args.files:
            try:
                written = vllm.import_file(path, hidden_size=args.hidden_size, top_k=args.top_k,
                                           dtype=getattr(torch, args.dtype),
                                           out_dir=args.out or tuning.tuning_dir())
            except (OSError, ValueError) as error:
                print(f"autotune: skipped {path}: {error}", file=sys.stderr)
                failed += 1
                continue
            print(f"autotune: {path.name} -> {written}")
        if failed:
            raise SystemExit(f"autotune: {failed} of {len(args.files)} files not imported")
        return

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    weights = args.dtype if args.dtype in cases.WEIGHTS else None
    if args.activations and not weights:
        parser.error("--activations goes with --dtype fp8 or mxfp4 (otherwise --dtype is the "
                     "activations' dtype)")
    floats = args.activations or (None if weights else args.dtype)
    dtype = getattr(torch, floats or ("bfloat16" if device.type == "cuda" else "float32"))
    routing = _routing(args.routing) if args.routing else None
    try:
        rows = sweep.sweep(args.op, device, dtype, shapes=args.shapes, buckets=args.tokens,
                           quick=args.quick, backward=args.backward, routing=routing,
                           out_dir=args.out, weights=weights)
    except (TypeError, ValueError) as error:  # a shape, dtype or routing the op does not take
        raise SystemExit(f"autotune: {error}")
    print(sweep.format_summary(rows))


def _placement(args):
    ids = _routing(args.routing, args.layer)
    try:
        load = placement.expert_load(ids, args.experts)
        expert_map = placement.balanced_map(load, args.ranks, args.redundant)
        contiguous = placement.rank_loads(load, [list(range(r * args.experts // args.ranks,
                                                            (r + 1) * args.experts // args.ranks))
                                                 for r in range(args.ranks)])
    except ValueError as error:
        raise SystemExit(f"autotune placement: {error}")
    balanced = placement.rank_loads(load, expert_map)
    print(f"autotune placement: {ids.shape[0]} routed tokens, {sum(load)} assignments over "
          f"{args.experts} experts on {args.ranks} ranks; busiest rank / mean: "
          f"{placement.imbalance(contiguous):.3f} with E/W contiguous experts a rank, "
          f"{placement.imbalance(balanced):.3f} with this map ({args.redundant} redundant copies)",
          file=sys.stderr)
    text = json.dumps(dict(expert_map=expert_map, experts=args.experts, ranks=args.ranks,
                           redundant=args.redundant, rank_loads=balanced), indent=1)
    if args.out:
        args.out.write_text(text + "\n")
        print(f"autotune placement: wrote {args.out}", file=sys.stderr)
    else:
        print(text)


if __name__ == "__main__":
    main()
