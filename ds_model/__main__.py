"""python -m ds_model generate [--preset NAME [--quantize fp8|mxfp4] | --checkpoint DIR
    [--dequantize]] [--batch 4] [--prompt-len 32] [--max-new-tokens 64] [--dtype float32]
    [--temperature 0] [--top-p 1] [--seed 0] [--record-routing FILE.safetensors]
    [--speculative mtp [--draft-tokens 1]] [--compile]
python -m torch.distributed.run --nproc-per-node W -m ds_model generate ... --expert-parallel
    [--ep-wire native|fp8]
python -m ds_model quantize SRC DST [--scale-fmt float|ue8m0] [--experts fp8|mxfp4]

generate continues random prompts with random weights (a preset, "tiny" by default; with
--quantize held as DeepSeek's FP8 checkpoints hold them, mxfp4: with V4's MXFP4 experts) or the
weights of an HF-format checkpoint folder (a quantised one stays quantised unless
--dequantize), shows a progress bar on stderr, and prints the weights' memory, the prefill and
decode throughput and the generated ids. --record-routing saves every MoE layer's expert
choices for `python -m autotune sweep --op fused_moe --routing FILE`. --expert-parallel (under
torchrun: gloo on CPU, NCCL on GPUs, one GPU a rank) shards the routed experts over the ranks,
each rank continuing its own random prompts; rank 0 prints the throughput of all ranks together;
--ep-wire fp8 sends the tokens to the experts FP8-quantised (ds_kernels/expert_wire.py).
--speculative mtp decodes greedily with --draft-tokens drafted a step by the checkpoint's
multi-token-prediction layer (a preset: one with random weights, which drafts nothing useful)
and prints the share of drafts accepted. --compile runs the decode steps captured (CUDA graphs
on CUDA, torch.compile elsewhere; ds_model/captured.py) and prints the capture time apart from
the decode throughput.

quantize writes the bf16/fp32 checkpoint SRC into the new folder DST in DeepSeek's published
FP8 format (ds_model/convert.py), tensor by tensor.

What the user can fix (a missing or broken checkpoint, a --record-routing file whose folder
does not exist, a device that is not there, a model too large for it, a DST that is not empty)
ends the run with one line on stderr and exit status 1, before any generation or writing.
"""

import argparse
import contextlib
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from ds_kernels.expert_wire import WIRES
from ds_kernels.quant_formats import FP8, MXFP4, SCALE_FMTS
from ds_model import PRESETS, DeepSeekForCausalLM, ModelConfig
from ds_model.convert import quantize_checkpoint
from ds_model.loading import check_fits, empty
from ds_model.quantized import QUANTIZED_MODULES, Quantization, planned_formats, quantize_modules
from ds_model.routing import RoutingRecorder

BAR_WIDTH = 40
PROG = "python -m ds_model"


def main(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="time generation on random prompts")
    source = gen.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="random weights of this config (default: tiny)")
    source.add_argument("--checkpoint", type=Path, help="HF-format folder: config.json + "
                        "*.safetensors")
    gen.add_argument("--quantize", choices=(FP8, MXFP4), help="with --preset: weights held "
                     "quantised, FP8 128x128 blocks (mxfp4: the routed experts MXFP4)")
    gen.add_argument("--dequantize", action="store_true", help="with --checkpoint: fold a "
                     "quantised checkpoint's weights into --dtype at load")
    gen.add_argument("--kv-cache", choices=("model", "fp8"), default="model",
                     help="latent cache rows: the model's dtype, or FlashMLA's FP8 layout "
                     "(656 bytes a token a layer for DeepSeek-V3; needs kv_lora_rank % 128 == 0; "
                     "V3.2's index keys too, 132 bytes)")
    gen.add_argument("--batch", type=int, default=4)
    gen.add_argument("--prompt-len", type=int, default=32)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gen.add_argument("--expert-parallel", action="store_true",
                     help="shard the routed experts over torchrun's ranks")
    gen.add_argument("--ep-wire", choices=sorted(WIRES), default="native",
                     help="with --expert-parallel: how tokens travel to the experts (fp8: 1 "
                     "byte a value and a scale per 128)")
    gen.add_argument("--speculative", choices=("mtp",), help="greedy speculative decoding, "
                     "drafts from the model's multi-token-prediction layer")
    gen.add_argument("--draft-tokens", type=int, default=1, help="with --speculative: drafts "
                     "a step")
    gen.add_argument("--compile", action="store_true", help="captured decode steps (CUDA "
                     "graphs on CUDA, torch.compile elsewhere)")
    gen.add_argument("--record-routing", type=Path, metavar="FILE",
                     help="save the experts each MoE layer chose (safetensors) for autotune; "
                     "the timings then include the recording")
    quantize = commands.add_parser("quantize", help="write a checkpoint in DeepSeek's FP8 "
                                   "format")
    quantize.add_argument("src", type=Path, help="HF-format folder, bf16/fp16/fp32 weights")
    quantize.add_argument("dst", type=Path, help="new (or empty) folder")
    quantize.add_argument("--scale-fmt", choices=SCALE_FMTS, default="float",
                          help="ue8m0: power-of-two scales (V3.1+)")
    quantize.add_argument("--experts", choices=(FP8, MXFP4), default=FP8,
                          help="mxfp4: the routed experts as DeepSeek-V4 ships them")
    args = parser.parse_args(argv)
    if args.command == "quantize":
        return _quantize(args)
    if min(args.batch, args.prompt_len, args.max_new_tokens) < 1:
        parser.error("--batch, --prompt-len and --max-new-tokens must be >= 1")
    if args.quantize and args.checkpoint:
        parser.error("--quantize goes with --preset (a checkpoint's config.json says how its "
                     "weights are held)")
    if args.dequantize and not args.checkpoint:
        parser.error("--dequantize goes with --checkpoint")

    if args.speculative and (args.expert_parallel or args.temperature != 0):
        parser.error("--speculative decodes greedily (--temperature 0) on one process")
    if args.draft_tokens < 1 or (args.draft_tokens != 1 and not args.speculative):
        parser.error("--draft-tokens must be >= 1 and goes with --speculative")
    if args.compile and (args.speculative or args.expert_parallel):
        parser.error("--compile goes without --speculative and --expert-parallel")
    if args.expert_parallel and args.record_routing:
        parser.error("--expert-parallel does not go with --record-routing yet")
    if args.ep_wire != "native" and not args.expert_parallel:
        parser.error("--ep-wire goes with --expert-parallel")
    if args.record_routing and not args.record_routing.parent.is_dir():
        _fail(f"--record-routing {args.record_routing}: no folder {args.record_routing.parent}")

    torch.manual_seed(args.seed)
    dtype, device = getattr(torch, args.dtype), _device(args.device)
    group = _join_ranks(device) if args.expert_parallel else None
    rank, world = (0, 1) if group is None else (dist.get_rank(), dist.get_world_size())
    if device.type == "cuda" and group is not None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    try:
        model = _model(args, dtype, device, group)
    except (OSError, ValueError) as error:  # the loaders name the file, field or value
        _fail(str(error))
    total, active = model.config.num_parameters()
    held = sum(t.nbytes for t in model.parameters()) + sum(t.nbytes for t in model.buffers())
    if rank == 0:
        per_rank = " on each of {world} ranks (its share of the experts)" if group else ""
        print(f"model: {args.checkpoint or args.preset}, {total / 1e6:.1f}M parameters "
              f"({active / 1e6:.1f}M active), {args.dtype} on {device}, weights "
              f"{held / 2**20:.1f} MiB{per_rank.format(world=world)}{_formats(model)}",
              file=sys.stderr)

    # Each rank its own prompts (the same weights: the seed is shared).
    prompts = torch.randint(model.config.vocab_size, (args.batch, args.prompt_len),
                            device=device, generator=torch.Generator(device).manual_seed(
                                args.seed + rank))
    generator = torch.Generator(device).manual_seed(args.seed)
    stamps = []

    def on_step(step):
        stamps.append(time.perf_counter())
        if rank:
            return
        done = BAR_WIDTH * step // args.max_new_tokens
        print(f"\r[{'#' * done}{'.' * (BAR_WIDTH - done)}] {step}/{args.max_new_tokens} steps",
              end="", file=sys.stderr, flush=True)

    # Untimed first: one-time costs (lazy imports, first allocations) stay out of the numbers.
    fp8_kv_cache = args.kv_cache == "fp8"
    # With --compile, on every prompt: it captures the step of the batch's size.
    warm = dict(compile=True, stats={}) if args.compile else {}
    model.generate(list(prompts[:, :2] if args.compile else prompts[:1, :2]), 2,
                   fp8_kv_cache=fp8_kv_cache, **warm)
    recorder = RoutingRecorder(model) if args.record_routing else contextlib.nullcontext()
    options = dict(speculative=args.speculative, draft_tokens=args.draft_tokens,
                   stats={}) if args.speculative else {}
    if args.compile:
        options = dict(compile=True, stats={})
    start = time.perf_counter()
    with recorder:
        outputs = model.generate(list(prompts), args.max_new_tokens,
                                 temperature=args.temperature, top_p=args.top_p,
                                 generator=generator, on_step=on_step,
                                 fp8_kv_cache=fp8_kv_cache, **options)
    print(file=sys.stderr)
    if options and options["stats"].get("drafted"):
        stats = options["stats"]
        print(f"speculative: {stats['accepted']} of {stats['drafted']} drafted tokens accepted "
              f"({stats['accepted'] / stats['drafted']:.0%})", file=sys.stderr)
    if args.record_routing:
        ids = recorder.tensors()["topk_ids"]
        print(f"routing: {tuple(ids.shape)} topk_ids -> {recorder.save(args.record_routing)}",
              file=sys.stderr)
    generated = sum(len(o) for o in outputs) - prompts.numel()
    prefill_s, decode_s = stamps[0] - start, stamps[-1] - stamps[0]
    steps = len(stamps) - 1
    if args.compile:
        print(f"capture: {warm['stats'].get('capture_s', 0.0):.2f} s before timing (the "
              f"batch's step); {options['stats'].get('capture_s', 0.0):.2f} s within the timed "
              "decode (smaller batches, once sequences end)", file=sys.stderr)
    if group is not None:  # all ranks' tokens over the slowest rank's time
        totals = torch.tensor([float(generated), float(prompts.numel())])
        times = torch.tensor([prefill_s, decode_s])
        dist.all_reduce(totals, group=group)
        dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)
        (generated, prompt_tokens), (prefill_s, decode_s) = totals.tolist(), times.tolist()
        generated = int(generated)
    else:
        prompt_tokens = prompts.numel()
    if rank == 0:
        ranks = f" on {world} ranks" if group is not None else ""
        each = f" a rank{ranks}, {int(prompt_tokens)} in all" if group is not None else ""
        print(f"prefill: {args.batch} x {args.prompt_len} tokens{each} in "
              f"{prefill_s * 1e3:.1f} ms ({prompt_tokens / prefill_s:,.0f} tokens/s)")
        if steps:
            decoded = generated - args.batch * world
            print(f"decode: {decoded} tokens{ranks} in {steps} steps, {decode_s:.2f} s: "
                  f"{decoded / decode_s:,.1f} tokens/s, {decode_s / steps * 1e3:.2f} ms/step")
    # One write per rank: ranks sharing a terminal (torchrun) then do not interleave lines.
    print("\n".join(f"{f'rank {rank} ' if group is not None else ''}sequence {b}: "
                    f"{out[args.prompt_len:].tolist()}" for b, out in enumerate(outputs)),
          flush=True)
    if group is not None:
        # No rank tears gloo down while another may still use it: without this barrier, 1 run
        # in 6 of 2 CPU ranks aborted at exit ("terminate called without an active
        # exception") once the expert exchanges were asynchronous; 0 in 12 with it.
        dist.barrier(group=group)
        dist.destroy_process_group()


def _fail(message: str):
    """End the run with one line on stderr (no traceback) and exit status 1."""
    raise SystemExit(f"{PROG}: error: {message}")


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as error:
        _fail(f"--device {name}: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        _fail(f"--device {name}: CUDA is not available on this machine")
    return device


def _join_ranks(device: torch.device):
    """The process group of torchrun's ranks (gloo on CPU, NCCL on GPUs)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        _fail("--expert-parallel runs under torchrun: python -m torch.distributed.run "
              "--nproc-per-node W -m ds_model generate ... --expert-parallel")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.group.WORLD


def _model(args, dtype, device, group=None) -> DeepSeekForCausalLM:
    if args.checkpoint:
        return DeepSeekForCausalLM.from_pretrained(args.checkpoint, dtype=dtype, device=device,
                                                   dequantize=args.dequantize, ep_group=group,
                                                   ep_wire=args.ep_wire,
                                                   mtp=bool(args.speculative))
    config = ModelConfig.preset(args.preset)
    if args.quantize:
        config.quantization_config = Quantization(experts=args.quantize).to_config()
    world = 1 if group is None else dist.get_world_size(group)
    check_fits(config, dtype, device, f"--preset {args.preset}", expert_ranks=world)
    with torch.device("meta"):
        model = DeepSeekForCausalLM(config, ep_group=group, ep_wire=args.ep_wire,
                                    mtp_layers=1 if args.speculative else 0)
        if args.quantize:
            quantize_modules(model, planned_formats(model, config.quantization))
    return empty(model, dtype, device).init_weights().eval()


def _formats(model) -> str:
    """How many modules hold each quantised format (", fp8 x 21, mxfp4 x 2"); "" if none."""
    counts = Counter(m.format.fmt for m in model.modules() if isinstance(m, QUANTIZED_MODULES))
    return "".join(f", {fmt} x {n}" for fmt, n in sorted(counts.items()))


def _quantize(args):
    try:
        written = quantize_checkpoint(args.src, args.dst, scale_fmt=args.scale_fmt,
                                      experts=args.experts)
    except (OSError, ValueError) as error:
        _fail(str(error))
    size = sum(path.stat().st_size for path in written)
    print(f"{args.dst}: {len(written)} file(s), {size / 2**20:.1f} MiB of weights "
          f"(FP8{', MXFP4 experts' if args.experts == MXFP4 else ''}, {args.scale_fmt} "
          "scales)")


if __name__ == "__main__":
    main()
