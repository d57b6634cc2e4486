"""ds_kernels.moe_align: vLLM's moe_align_block_size contract, as ``torch.ops.ds_kernels.moe_align``."""

from typing import NamedTuple

import torch

from ds_kernels import dispatch
from ds_kernels.ops.checks import INDEX_DTYPES, check_int, check_tensor
from ds_kernels.reference.moe_align import padded_length


class MoEAlignment(NamedTuple):
    """Assignments grouped by expert, each expert's run padded to a multiple of block_m.

    sorted_token_ids: int32 [P], indices into the flattened T*k assignments; padding = T*k.
    expert_ids: int32 [P // block_m], the expert of each block of block_m slots; -1 past the end.
    num_tokens_post_padded: int32 scalar tensor, the used length of sorted_token_ids.
    expert_counts: int32 [E], assignments per expert (before padding).
    P is a worst-case bound from shapes alone, so no host synchronisation is needed.
    """

    sorted_token_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_tokens_post_padded: torch.Tensor
    expert_counts: torch.Tensor


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    """Group the assignments of topk_ids [T, k] (int32/int64) by expert, in blocks of block_m.

    Ids outside [0, num_experts) - such as -1 for experts held by another rank under expert
    parallelism - are excluded: they appear in no run and no count, and never address memory.
    """
    if dispatch.direct_call_allowed(topk_ids):
        return MoEAlignment(*_moe_align(topk_ids, num_experts, block_m))  # checks itself
    _check(topk_ids, num_experts, block_m)  # before torch.ops, whose type errors name nothing
    return MoEAlignment(*torch.ops.ds_kernels.moe_align(topk_ids, num_experts, block_m))


def _check(topk_ids, num_experts, block_m):
    check_tensor("topk_ids", topk_ids, dim=2, dtypes=INDEX_DTYPES)
    check_int("num_experts", num_experts, low=1)
    check_int("block_m", block_m, low=1)
    P = padded_length(topk_ids.numel(), num_experts, block_m)
    if P >= 2**31:
        raise ValueError(f"moe_align: {topk_ids.numel()} assignments pad to {P} slots, beyond "
                         "the int32 indices of sorted_token_ids")
    return P


def _moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(topk_ids, num_experts, block_m)
    impl = dispatch.implementation("moe_align", topk_ids.device)
    return impl(topk_ids, num_experts, block_m)


_moe_align_op = torch.library.custom_op("ds_kernels::moe_align", _moe_align, mutates_args=())


@_moe_align_op.register_fake
def _(topk_ids, num_experts, block_m):
    P = _check(topk_ids, num_experts, block_m)
    return (topk_ids.new_empty(P, dtype=torch.int32),
            topk_ids.new_empty(P // block_m, dtype=torch.int32),
            topk_ids.new_empty((), dtype=torch.int32),
            topk_ids.new_empty(num_experts, dtype=torch.int32))
