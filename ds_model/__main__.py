"""python -m ds_model generate [--preset NAME | --checkpoint DIR] [--batch 4] [--prompt-len 32]
    [--max-new-tokens 64] [--dtype float32] [--temperature 0] [--top-p 1] [--seed 0]
    [--record-routing FILE.safetensors]

Continues random prompts with random weights (a preset, "tiny" by default) or the weights of
an HF-format checkpoint folder, shows a progress bar on stderr, and prints the prefill and
decode throughput and the generated ids. --record-routing saves every MoE layer's expert
choices for `python -m autotune sweep --op fused_moe --routing FILE`.

What the user can fix (a missing or broken checkpoint, a --record-routing file whose folder
does not exist, a device that is not there, a model too large for it) ends the run with one
line on stderr and exit status 1, before any generation.
"""

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

from ds_model import PRESETS, DeepSeekForCausalLM, ModelConfig
from ds_model.loading import check_fits
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
    gen.add_argument("--batch", type=int, default=4)
    gen.add_argument("--prompt-len", type=int, default=32)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gen.add_argument("--record-routing", type=Path, metavar="FILE",
                     help="save the experts each MoE layer chose (safetensors) for autotune; "
                     "the timings then include the recording")
    args = parser.parse_args(argv)
    if min(args.batch, args.prompt_len, args.max_new_tokens) < 1:
        parser.error("--batch, --prompt-len and --max-new-tokens must be >= 1")

    if args.record_routing and not args.record_routing.parent.is_dir():
        _fail(f"--record-routing {args.record_routing}: no folder {args.record_routing.parent}")

    torch.manual_seed(args.seed)
    dtype, device = getattr(torch, args.dtype), _device(args.device)
    try:
        model = _model(args, dtype, device)
    except (OSError, ValueError) as error:  # the loaders name the file, field or value
        _fail(str(error))
    total, active = model.config.num_parameters()
    print(f"model: {args.checkpoint or args.preset}, {total / 1e6:.1f}M parameters "
          f"({active / 1e6:.1f}M active), {args.dtype} on {device}", file=sys.stderr)

    prompts = torch.randint(model.config.vocab_size, (args.batch, args.prompt_len),
                            device=device)
    generator = torch.Generator(device).manual_seed(args.seed)
    stamps = []

    def on_step(step):
        stamps.append(time.perf_counter())
        done = BAR_WIDTH * step // args.max_new_tokens
        print(f"\r[{'#' * done}{'.' * (BAR_WIDTH - done)}] {step}/{args.max_new_tokens} steps",
              end="", file=sys.stderr, flush=True)

    # Untimed first: one-time costs (lazy imports, first allocations) stay out of the numbers.
    model.generate(list(prompts[:1, :2]), 2)
    recorder = RoutingRecorder(model) if args.record_routing else contextlib.nullcontext()
    start = time.perf_counter()
    with recorder:
        outputs = model.generate(list(prompts), args.max_new_tokens,
                                 temperature=args.temperature, top_p=args.top_p,
                                 generator=generator, on_step=on_step)
    print(file=sys.stderr)
    if args.record_routing:
        ids = recorder.tensors()["topk_ids"]
        print(f"routing: {tuple(ids.shape)} topk_ids -> {recorder.save(args.record_routing)}",
              file=sys.stderr)
    generated = sum(len(o) for o in outputs) - prompts.numel()
    prefill_s, decode_s = stamps[0] - start, stamps[-1] - stamps[0]
    print(f"prefill: {args.batch} x {args.prompt_len} tokens in {prefill_s * 1e3:.1f} ms "
          f"({prompts.numel() / prefill_s:,.0f} tokens/s)")
    if len(stamps) > 1:
        print(f"decode: {generated - args.batch} tokens in {len(stamps) - 1} steps, "
              f"{decode_s:.2f} s: {(generated - args.batch) / decode_s:,.1f} tokens/s, "
              f"{decode_s / (len(stamps) - 1) * 1e3:.2f} ms/step")
    for b, out in enumerate(outputs):
        print(f"sequence {b}: {out[args.prompt_len:].tolist()}")


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


def _model(args, dtype, device) -> DeepSeekForCausalLM:
    if args.checkpoint:
        return DeepSeekForCausalLM.from_pretrained(args.checkpoint, dtype=dtype, device=device)
    config = ModelConfig.preset(args.preset)
    check_fits(config, dtype, device, f"--preset {args.preset}")
    with device:
        return DeepSeekForCausalLM(config).init_weights().to_dtype(dtype).eval()


if __name__ == "__main__":
    main()
