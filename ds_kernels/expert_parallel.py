"""Expert parallelism on torch.distributed: the routed experts sharded over the ranks of a
process group, each rank running forward on its own tokens (data-parallel attention).

Placement: rank r holds experts [r*E/W, (r+1)*E/W), or the ids ``expert_map[r]`` lists; an
expert listed on several ranks is a replica (EPLB-style, for hot experts), each assignment to it
going to one of them, picked by token so that its load splits evenly.

One forward, per MoE layer (ShardedExperts.forward):
  1. each (token, expert) assignment goes to a rank holding its expert: the per-rank row counts
     are exchanged (all_to_all_single on W counts), then the token rows, in the layer's wire
     format (ds_kernels/expert_wire.py: as they are, or FP8), and their experts' local indices
     (uneven splits; a rank may send or receive nothing);
  2. while the rows travel (asynchronous all-to-alls), the shared expert runs on this rank's
     tokens;
  3. the receiving rank runs its local experts over the rows, one per assignment (k = 1,
     weight 1): the forward of the module it is mixed into (Experts, or ds_model's quantised
     QuantExperts);
  4. the results come back by the reverse all-to-all, and the sending rank adds them into its
     tokens with the routing weights, in fp32.
Both row exchanges are differentiable (_Arrived: the gradient goes back by the reverse
all-to-all, in its own dtype, straight through a lossy wire format): d hidden, d topk_weights and
each rank's own expert gradients flow back across ranks, so training works. A token is sent once
per assignment (k rows a token, DeepSeek-V3's 8 x 7168 values), where DeepEP's normal mode sends
it once per rank at most: deduplication is not done. Split sizes are read on the host (one sync
per layer on a GPU).
"""

import contextlib

import torch
import torch.distributed as dist

from ds_kernels.expert_wire import NativeWire, wire_of


def placement(num_experts: int, world: int, expert_map=None) -> list[list[int]]:
    """experts_of[r]: the sorted global expert ids rank r holds. Raises ValueError, naming the
    problem, for an expert count the ranks cannot split without a map, or a map that is not one
    list per rank, holds an id twice on a rank or out of [0, E), leaves a rank empty or drops an
    expert."""
    if expert_map is None:
        if num_experts % world:
            raise ValueError(f"{num_experts} experts do not split evenly over {world} ranks: pass "
                             "an expert_map (one list of expert ids per rank)")
        per_rank = num_experts // world
        return [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(world)]
    if len(expert_map) != world:
        raise ValueError(f"expert_map must list the experts of each of the {world} ranks, got "
                         f"{len(expert_map)} lists")
    experts_of = []
    for r, ids in enumerate(expert_map):
        ids = [int(e) for e in ids]
        if not ids:
            raise ValueError(f"expert_map[{r}] is empty: every rank must hold an expert")
        if len(set(ids)) != len(ids) or not all(0 <= e < num_experts for e in ids):
            raise ValueError(f"expert_map[{r}] = {ids} must hold distinct expert ids in "
                             f"[0, {num_experts})")
        experts_of.append(sorted(ids))
    missing = sorted(set(range(num_experts)) - {e for ids in experts_of for e in ids})
    if missing:
        raise ValueError(f"expert_map places no rank on experts {missing[:16]}")
    return experts_of


def check_same_placement(experts_of, group):
    """Raise ValueError on every rank if the ranks of ``group`` were given different maps (a
    token would be sent to a rank that does not hold its expert)."""
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, experts_of, group=group)
    differ = [r for r, other in enumerate(gathered) if other != experts_of]
    if differ:
        raise ValueError(f"rank {dist.get_rank(group)}'s expert placement differs from that of "
                         f"ranks {differ}: every rank must pass the same expert_map")


class _Transfer:
    """Token rows [N, H] encoded in ``wire`` and ``extra`` tensors of N rows (sent as they are)
    on their way to the ranks, send_sizes rows to each, by one asynchronous all_to_all_single a
    tensor; recv_sizes rows arrive from each."""

    def __init__(self, wire, rows, extra, send_sizes, recv_sizes, group):
        self.wire, self.group = wire, group
        self.send_sizes, self.recv_sizes = send_sizes, recv_sizes
        parts = [*wire.encode(rows.detach()), *extra]
        self.received = [p.new_empty(sum(recv_sizes), *p.shape[1:]) for p in parts]
        self.works = [dist.all_to_all_single(out, p.contiguous(), recv_sizes, send_sizes,
                                             group=group, async_op=True)
                      for out, p in zip(self.received, parts)]
        self.encoded, self.extra = (self.received[:len(parts) - len(extra)],
                                    self.received[len(parts) - len(extra):])

    def rows(self, dtype):                                        # [R, H]
        for work in self.works:
            work.wait()
        return self.wire.decode(self.encoded, dtype)


class _Arrived(torch.autograd.Function):
    """The rows a _Transfer of ``rows`` delivers, as a function of ``rows``: the gradient goes
    back to the senders by the reverse all-to-all, in its own dtype."""

    @staticmethod
    def forward(ctx, rows, transfer):
        ctx.transfer = transfer
        return transfer.rows(rows.dtype)

    @staticmethod
    def backward(ctx, grad):                                      # [R, H]
        t = ctx.transfer
        d_rows = grad.new_empty(sum(t.send_sizes), grad.shape[1])   # [N, H]
        dist.all_to_all_single(d_rows, grad.contiguous(), t.send_sizes, t.recv_sizes,
                               group=t.group)
        return d_rows, None


@contextlib.contextmanager
def _peers_blamed(rank, world):
    """A failed exchange (a peer's process ended, or it never came within the group's timeout)
    raised with what usually causes it, instead of the backend's bare socket error."""
    try:
        yield
    except RuntimeError as error:
        raise RuntimeError(f"expert-parallel MoE on rank {rank} of {world}: exchanging tokens "
                           "with the other ranks failed - a rank stopped (it raised, or was "
                           "killed), or did not reach this MoE layer within the process group's "
                           "timeout. Every rank must run each MoE layer as often as the others "
                           f"(a rank without tokens runs it on none). The backend said: {error}"
                           ) from error


# The backends whose all_to_all_single takes tensors of each device type.
_BACKENDS_FOR = {"cpu": ("gloo", "mpi"), "cuda": ("nccl",), "npu": ("hccl",)}


def check_backend(group, device: torch.device):
    """Raise ValueError if ``group``'s backend cannot exchange tensors on ``device`` (a gloo
    group and CUDA tensors, an NCCL group and CPU tensors), naming both and the way out."""
    backend = str(dist.get_backend(group))
    # "cpu:gloo,cuda:nccl" names one per device type
    per_device = dict(part.split(":") for part in backend.split(",")) if ":" in backend else None
    name = per_device.get(device.type) if per_device else backend
    allowed = _BACKENDS_FOR.get(device.type, ())
    if name not in allowed:
        raise ValueError(f"expert-parallel MoE: the ep_group's backend {backend!r} cannot "
                         f"exchange {device.type} tensors; the hidden states are on {device}: "
                         f"use a group of backend {' or '.join(allowed) or 'for that device'} "
                         f"(torch.distributed.new_group(backend=...)), or move the model")


class ShardedExperts:
    """Mixed into a routed-experts module (``class EPExperts(ShardedExperts, Experts)``): the
    module holds this rank's experts only, under the unsharded keys (gate_up_proj [E_local, 2I,
    H], ...), and its forward serves every rank's tokens routed to them. load_state_dict takes
    the full [E, ...] tensors (keeping this rank's rows) or this rank's. ``wire``: the dispatch's
    format, a name in ds_kernels.expert_wire.WIRES or a format object."""

    def __init__(self, num_experts, hidden_size, intermediate_size, *local_args, group,
                 expert_map=None, wire="native"):
        wire = wire_of(wire)
        if not dist.is_initialized():
            raise RuntimeError("ep_group needs torch.distributed initialised "
                               "(torch.distributed.init_process_group)")
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        experts_of = placement(num_experts, world, expert_map)
        with torch.device("cpu"):  # also inside a meta-device model build (from_pretrained)
            check_same_placement(experts_of, group)
        super().__init__(len(experts_of[rank]), hidden_size, intermediate_size, *local_args)
        self.group, self.num_experts, self.world, self.rank = group, num_experts, world, rank
        self.experts_of, self.local_ids, self.wire = experts_of, experts_of[rank], wire
        self._tables = {}  # device -> _routing_tables(); not buffers: to_empty would blank them

    def _routing_tables(self, device):
        """(replicas [E, width]: the i-th rank holding e, cycled to the widest; replica_counts
        [E]; local_index [W, E]: e's row on rank r, -1 where r does not hold it)."""
        if device not in self._tables:
            check_backend(self.group, device)  # once per device, beside the tables
            holders = [[r for r, ids in enumerate(self.experts_of) if e in ids]
                       for e in range(self.num_experts)]
            width = max(len(h) for h in holders)
            replicas = torch.tensor([[h[i % len(h)] for i in range(width)] for h in holders])
            local = torch.full((self.world, self.num_experts), -1, dtype=torch.long)
            for r, ids in enumerate(self.experts_of):
                local[r, ids] = torch.arange(len(ids))
            self._tables[device] = (replicas.to(device),
                                    torch.tensor([len(h) for h in holders], device=device),
                                    local.to(device))
        return self._tables[device]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self._parameters:  # weights and (quantised) their scales: [E, ...]
            full = state_dict.get(prefix + name)
            if full is not None and full.shape[0] == self.num_experts != len(self.local_ids):
                state_dict[prefix + name] = full[self.local_ids]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x, topk_ids, topk_weights, shared=None):   # x [T, H]
        """The routed experts' weighted sum for this rank's tokens, plus ``shared(x)`` (the
        shared expert, run while the tokens travel) when given."""
        T, H = x.shape
        k = topk_ids.shape[1]
        replicas, replica_counts, local_index = self._routing_tables(x.device)
        expert = topk_ids.reshape(-1).long()                      # [N = T*k]
        token = torch.arange(T, device=x.device).repeat_interleave(k)  # [N]
        # The replica of each assignment's expert: spread by token (and rank) over its holders.
        choice = (token + self.rank) % replica_counts[expert]
        dest = replicas[expert, choice]                           # [N]
        order = torch.sort(dest, stable=True).indices             # [N] grouped by rank
        send = torch.bincount(dest, minlength=self.world)         # [W]
        recv = torch.empty_like(send)
        with _peers_blamed(self.rank, self.world):  # the first exchange is where it shows
            dist.all_to_all_single(recv, send, group=self.group)
        send_sizes, recv_sizes = send.tolist(), recv.tolist()
        rows = x[token[order]]                                    # [N, H]
        local = local_index[dest[order], expert[order]]           # [N]
        dispatch = _Transfer(self.wire, rows, [local], send_sizes, recv_sizes, self.group)
        extra = shared(x) if shared is not None else None         # [T, H], overlapping
        recv_rows = _Arrived.apply(rows, dispatch)                # [R, H]
        recv_local = dispatch.extra[0]                            # [R]
        ones = recv_rows.new_ones(recv_local.shape[0], 1, dtype=torch.float32)
        y = super().forward(recv_rows, recv_local.unsqueeze(1), ones)  # [R, H] unweighted
        combine = _Transfer(_NATIVE, y, [], recv_sizes, send_sizes, self.group)
        back = _Arrived.apply(y, combine)                         # [N, H] in `order`
        weight = topk_weights.reshape(-1)[order].float().unsqueeze(1)  # [N, 1]
        out = x.new_zeros(T, H, dtype=torch.float32)
        out = out.index_add(0, token[order], back.float() * weight).to(x.dtype)
        return out if extra is None else out + extra


_NATIVE = NativeWire()
