"""moe_align: ds_kernels.moe_align against its reference (and vLLM's, when importable on cuda).

The ids come from DeepSeek-V3-style routing of random logits, so each expert's load looks like
a real batch's. block_m=64 is the fused-MoE tile height at prefill; 16 is the decode tile.
"""

import torch

import ds_kernels
from bench.harness import Impl, Row, compare

E, K, N_GROUP, TOPK_GROUP = 256, 8, 8, 4
CASES = ((1, 16), (1, 64), (16, 64), (256, 64), (4096, 64))  # (T, block_m)
QUICK_CASES = ((1, 16), (1, 64), (16, 64), (4096, 64))
BASELINE = "reference"


def run(device: torch.device, quick: bool) -> list[Row]:
    impls = [Impl("ds_kernels", ds_kernels.moe_align),
             Impl("reference", ds_kernels.moe_align, backend="reference")]
    vllm_align = _vllm_moe_align() if device.type == "cuda" else None
    if vllm_align is not None:
        impls.append(Impl("vllm", lambda ids, e, block_m: vllm_align(ids, block_m, e)))
    g = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        for T, block_m in QUICK_CASES if quick else CASES:
            logits = torch.randn(T, E, generator=g).to(device)       # [T, E]
            _, ids = ds_kernels.route(logits, K, n_group=N_GROUP, topk_group=TOPK_GROUP)  # [T, k]
            want = ds_kernels.moe_align(ids, E, block_m)
            for impl in impls:
                _check(impl.name, impl(ids, E, block_m), want, block_m)
            rows += compare(impls, (ids, E, block_m), op="moe_align",
                            shape=dict(T=T, E=E, k=K, block_m=block_m), dtype=ids.dtype,
                            device=device, tokens=T, baseline=BASELINE,
                            # read the ids, write the alignment
                            nbytes=ids.nbytes + sum(t.nbytes for t in want))
    return rows


def _vllm_moe_align():
    try:
        from vllm.model_executor.layers.fused_moe.moe_align_block_size import (
            moe_align_block_size)
    except ImportError:
        return None
    return moe_align_block_size


def _check(name, got, want, block_m):
    """Same padded length and the same (expert, assignment) slots as ds_kernels. vLLM's CUDA
    kernel orders assignments within an expert by atomics, so only ours must match exactly."""
    if name != "vllm":
        for field, a, b in zip(want._fields, got, want):
            if not torch.equal(a, b):
                raise AssertionError(f"moe_align: {name} differs from ds_kernels in {field}")
        return
    sorted_ids, expert_ids, num_post = got[:3]
    if int(num_post.reshape(-1)[0]) != int(want.num_tokens_post_padded):
        raise AssertionError(f"moe_align: {name} pads to {int(num_post.reshape(-1)[0])} slots, "
                             f"ds_kernels to {int(want.num_tokens_post_padded)}")
    if not torch.equal(_slots(sorted_ids, expert_ids, want.num_tokens_post_padded, block_m),
                       _slots(*want[:3], block_m)):
        raise AssertionError(f"moe_align: {name} puts other assignments in some expert's blocks")


def _slots(sorted_ids, expert_ids, num_post, block_m):
    """The used slots as sorted (expert, assignment) keys: the contract minus in-expert order."""
    n = int(num_post)
    experts = expert_ids[: n // block_m].long().repeat_interleave(block_m)  # [n]
    return (experts * 2**32 + sorted_ids[:n].long()).sort().values
