"""ds_kernels.MoE: a DeepSeek-V3 MoE layer (router + routed experts + shared experts) whose
state_dict keys and outputs equal transformers 5's DeepseekV3MoE, running on ds_kernels ops;
with ``ep_group``, its routed experts sharded over a torch.distributed group
(ds_kernels/expert_parallel.py)."""

import torch
import torch.nn.functional as F
from torch import nn

from ds_kernels.expert_parallel import ShardedExperts
from ds_kernels.ops.fused_moe import fused_moe
from ds_kernels.ops.route import route

# A checkpoint's topk_method (DeepSeek's config.json) -> route's group_scoring. "greedy"
# (DeepSeek-V2-Lite) is plain top-k: it runs as one group, where the group scoring is moot.
TOPK_METHODS = {"noaux_tc": "top2_sum", "group_limited_greedy": "max", "greedy": "max"}


class Router(nn.Module):
    """Router logits in fp32 (as DeepSeek-V3 and transformers compute them), then route().
    Without ``correction_bias`` (DeepSeek-V2's methods) it holds no e_score_correction_bias,
    as V2's checkpoints and transformers' DeepseekV2 gate hold none."""

    def __init__(self, hidden_size, num_experts, top_k, *, n_group=1, topk_group=1,
                 norm_topk_prob=True, routed_scaling_factor=1.0, scoring="sigmoid",
                 group_scoring="top2_sum", correction_bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias",
                             torch.zeros(num_experts) if correction_bias else None)
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor
        self.scoring, self.group_scoring = scoring, group_scoring

    def forward(self, x):                                         # x [T, H]
        logits = F.linear(x.float(), self.weight.float())         # [T, E]
        return route(logits, self.top_k, scoring=self.scoring,
                     correction_bias=self.e_score_correction_bias, n_group=self.n_group,
                     topk_group=self.topk_group, renormalize=self.norm_topk_prob,
                     routed_scaling_factor=self.routed_scaling_factor,
                     group_scoring=self.group_scoring)


class Experts(nn.Module):
    """The routed experts as two 3-D weights, gate rows first in gate_up_proj."""

    def __init__(self, num_experts, hidden_size, intermediate_size):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x, topk_ids, topk_weights):                 # x [T, H]
        return fused_moe(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)


class EPExperts(ShardedExperts, Experts):
    """The routed experts sharded over a torch.distributed group (see ShardedExperts)."""


class SharedExperts(nn.Module):
    """Dense SwiGLU MLP that every token passes through."""

    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """With ``ep_group`` (a torch.distributed group of W ranks) each rank holds its share of
    the routed experts (``expert_map``: the expert ids of each rank, replicas allowed; default
    E/W contiguous ones) and calls forward on its own tokens, getting what the unsharded layer
    gives for them (``ep_wire="fp8"``: with the routed experts' inputs FP8-quantised on the
    wire, ds_kernels/expert_wire.py); the shared expert runs while the tokens travel.
    load_state_dict takes the unsharded state_dict."""

    def __init__(self, hidden_size, intermediate_size, num_experts, top_k, *,
                 n_shared_experts=1, n_group=1, topk_group=1, norm_topk_prob=True,
                 routed_scaling_factor=1.0, scoring="sigmoid", group_scoring="top2_sum",
                 correction_bias=True, ep_group=None, expert_map=None, ep_wire="native"):
        super().__init__()
        if (expert_map is not None or ep_wire != "native") and ep_group is None:
            raise ValueError("expert_map and ep_wire say how experts are sharded over the ranks "
                             "of an ep_group: pass one")
        self.gate = Router(hidden_size, num_experts, top_k, n_group=n_group,
                           topk_group=topk_group, norm_topk_prob=norm_topk_prob,
                           routed_scaling_factor=routed_scaling_factor, scoring=scoring,
                           group_scoring=group_scoring, correction_bias=correction_bias)
        self.experts = (Experts(num_experts, hidden_size, intermediate_size) if ep_group is None
                        else EPExperts(num_experts, hidden_size, intermediate_size,
                                       group=ep_group, expert_map=expert_map, wire=ep_wire))
        self.shared_experts = (SharedExperts(hidden_size, intermediate_size * n_shared_experts)
                               if n_shared_experts else None)

    @classmethod
    def from_hf_config(cls, config, *, ep_group=None, expert_map=None, ep_wire="native"):
        """From a transformers DeepseekV3Config or DeepseekV2Config (or any config with their MoE
        fields). The routing follows ``topk_method`` (default "noaux_tc", which V3 configs
        leave out): see TOPK_METHODS."""
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={config.hidden_act!r}: only 'silu' experts are supported")
        method = getattr(config, "topk_method", "noaux_tc")
        if method not in TOPK_METHODS:
            raise ValueError(f"topk_method={method!r} is not supported; supported: "
                             f"{sorted(TOPK_METHODS)}")
        if method == "greedy":  # transformers' DeepseekV2Config leaves n_group None there
            n_group, topk_group = 1, 1
        else:
            n_group, topk_group = config.n_group, config.topk_group
        # DeepSeek-V2's gate is always softmax, and transformers' DeepseekV2Config has no
        # scoring_func to say so.
        scoring = getattr(config, "scoring_func", "sigmoid" if method == "noaux_tc" else "softmax")
        return cls(config.hidden_size, config.moe_intermediate_size, config.n_routed_experts,
                   config.num_experts_per_tok, n_shared_experts=config.n_shared_experts or 0,
                   n_group=n_group, topk_group=topk_group, norm_topk_prob=config.norm_topk_prob,
                   routed_scaling_factor=config.routed_scaling_factor, scoring=scoring,
                   group_scoring=TOPK_METHODS[method], correction_bias=method == "noaux_tc",
                   ep_group=ep_group, expert_map=expert_map, ep_wire=ep_wire)

    def forward(self, hidden_states):                             # [..., H]
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])                  # [T, H]
        topk_weights, topk_ids = self.gate(x)                     # [T, k] each
        if isinstance(self.experts, ShardedExperts):  # the shared expert hides the dispatch
            return self.experts(x, topk_ids, topk_weights, self.shared_experts).view(shape)
        out = self.experts(x, topk_ids, topk_weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)
