"""ModelConfig: the DeepSeek-V3 family's hyper-parameters, with transformers' field names.

Parameter counts (``num_parameters``) count every weight once; "active" counts what one token
passes through: attention, dense MLPs, the shared and top-k routed experts, the router, the
norms, and both the input embedding and the LM head (the embedding row is read, the head is a
full GEMM; DeepSeek's 37B counts them the same way to within rounding). Biases count where
attention_bias has them, the routers' correction bias where topk_method has one (noaux_tc).

Memory (``weight_bytes``): the bytes the weights take as from_pretrained holds them, and the
bytes one token reads. With quantization_config: FP8 projections and experts at 1 byte a weight
plus an fp32 scale per 128x128 block, MXFP4 experts at 0.5 + 1/32 byte, kv_b_proj in the model
dtype (dequantised at load), routers fp32. DeepSeek-V3 (no MTP layer) in bf16: 1250 GiB; FP8
(the rest bf16): 628 GiB; with MXFP4 experts: 342 GiB.

Presets:
  "tiny": a few million parameters for tests and the CLI.
  "deepseek-v3-671b": DeepSeek-V3's published config.json (without the MTP module):
      671.0B total, 37.6B active.
  "deepseek-v3.2-685b": DeepSeek-V3.2's (and V3.2-Exp's) config.json: V3's plus the lightning
      indexer (index_topk 2048, 64 heads of 128): 671.9B total without the MTP module (685B
      with it, the name DeepSeek gives), 38.4B active.
  "r2-hypothetical-1.2t": HYPOTHETICAL. "DeepSeek-R2" is a rumour (1.2T total, 78B active,
      "hybrid MoE"); no config is public. Derived by keeping V3's attention (hidden 7168, 128
      heads, the same MLA ranks) and searching layers, routed experts, expert width and top-k
      for the V3-style config nearest both rumoured numbers: 70 layers, 320 experts of width
      2560 in 8 groups, 16 routed + 1 shared per token gives 1200.3B total (+0.03%) and 79.0B
      active (+1.3%). "Hybrid" is not modelled.

Every ModelConfig is validated when it is built (``validate``): each field's type and range,
and the cross-field rules that would otherwise fail only at the first forward (experts that
n_group does not divide, top-k beyond the experts the groups leave), each error naming the
field and its value.
"""

import dataclasses
import math
from typing import Any

import torch

from ds_kernels import moe
from ds_kernels.ops.route import SCORINGS
from ds_kernels.quant_formats import FP8, MXFP4
from ds_kernels.rope import rope_attention_factor, rope_frequencies
from ds_model.quantized import Quantization, scale_grid

# Fields of a transformers DeepseekV3Config / config.json that describe no weight or math we
# run (metadata, training-only settings, generation defaults).
_IGNORED_FIELDS = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "use_cache", "initializer_range", "attention_dropout", "pretraining_tp", "bos_token_id",
    "pad_token_id", "ep_size", "moe_layer_freq", "num_nextn_predict_layers", "seq_aux",
    "aux_loss_alpha", "num_key_value_heads", "qk_head_dim", "rope_parameters",
    "max_window_layers", "output_router_logits", "router_aux_loss_coef",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "tokenizer_class", "prefix",
    "sep_token_id", "decoder_start_token_id", "task_specific_params", "problem_type",
    "id2label", "label2id", "cross_attention_hidden_size", "tie_encoder_decoder", "finetuning_task",
    "_name_or_path", "_attn_implementation_autoset", "_experts_implementation", "pruned_heads",
    "name_or_path", "attention_bias_type", "mlp_bias", "head_dim", "layer_types",
    "expert_dtype",  # V4's place for quantization_config's expert_dtype: moved in there
    "mlp_layer_types",  # DeepseekV32Config's dense/sparse per layer: first_k_dense_replace's
}

# Fields every DeepSeek-V2/V3 config.json has, DeepSeek's and transformers' alike: they fix the
# weights' shapes and the routing. A config.json without one is refused rather than filled in
# with the defaults, which are DeepSeek-V3-671B's (config.json = {} would mean 671B).
_REQUIRED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "num_hidden_layers", "first_k_dense_replace", "n_routed_experts", "n_shared_experts",
    "num_experts_per_tok", "n_group", "topk_group", "num_attention_heads", "q_lora_rank",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
)

# How the router picks experts (config.json "topk_method"): DeepSeek-V3's noaux_tc (groups
# scored by their two best biased scores), V2's group_limited_greedy (groups scored by their
# best score), and plain top-k over all experts ("greedy", DeepSeek-V2-Lite), where n_group and
# topk_group play no part. ds_kernels.MoE maps each onto route's arguments.
TOPK_METHODS = tuple(moe.TOPK_METHODS)
HIDDEN_ACTS = ("silu",)  # the experts and dense MLPs are SwiGLU

_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                  "num_hidden_layers", "n_routed_experts", "num_experts_per_tok",
                  "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim",
                  "max_position_embeddings")
_POSITIVE_NUMBERS = ("routed_scaling_factor", "rms_norm_eps", "rope_theta")
_BOOLS = ("norm_topk_prob", "rope_interleave", "attention_bias", "tie_word_embeddings")
# rope_scaling values that must be positive numbers when given (None: the default applies).
_POSITIVE_ROPE_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow")


@dataclasses.dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432          # dense MLP of the first layers
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int | None = 8                  # None only where topk_method is "greedy"
    topk_group: int | None = 4
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"            # one of TOPK_METHODS
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None         # e.g. {"rope_type": "yarn", "factor": 40, ...}
    rope_interleave: bool = True             # RoPE on adjacent pairs, as DeepSeek's weights use
    max_position_embeddings: int = 163840
    attention_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    eos_token_id: int | list[int] | None = None
    quantization_config: dict | None = None  # FP8 checkpoints: see ds_model/quantized.py
    # DeepSeek-V3.2's sparse attention (ds_model/deepseek_v32.py): None is V3's dense MLA.
    index_topk: int | None = None            # cached tokens each query attends over
    index_head_dim: int = 128
    index_n_heads: int = 64

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field, and its value, that no model can be built
        with or that would fail only at the first forward."""
        for name in _POSITIVE_INTS:
            _check_int(name, getattr(self, name), 1)
        for name in _POSITIVE_NUMBERS:
            _check_positive_number(name, getattr(self, name))
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _check_int("first_k_dense_replace", self.first_k_dense_replace, 0,
                   self.num_hidden_layers, f" (num_hidden_layers={self.num_hidden_layers})")
        _check_int("n_shared_experts", self.n_shared_experts, 0)
        if self.q_lora_rank is not None:
            _check_int("q_lora_rank", self.q_lora_rank, 1, why=" or null")
        _check_int("qk_rope_head_dim", self.qk_rope_head_dim, 2)
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even (RoPE rotates pairs), got "
                             f"{self.qk_rope_head_dim}")
        _check_choice("scoring_func", self.scoring_func, SCORINGS)
        _check_choice("topk_method", self.topk_method, TOPK_METHODS)
        _check_choice("hidden_act", self.hidden_act, HIDDEN_ACTS)
        self._check_routing()
        self._check_index()
        self._check_rope_scaling()
        self._check_eos()
        if self.quantization_config is not None:
            Quantization.from_config(self.quantization_config)  # checks every key

    def _check_routing(self):
        """The rules ds_kernels.route enforces on every call, checked once here."""
        E, k = self.n_routed_experts, self.num_experts_per_tok
        if self.topk_method == "greedy":  # plain top-k: the groups play no part
            for name in ("n_group", "topk_group"):  # transformers' DeepseekV2Config: None
                if getattr(self, name) is not None:
                    _check_int(name, getattr(self, name), 1, why=" or null")
            _check_int("num_experts_per_tok", k, 1, E, f" (n_routed_experts={E})")
            return
        _check_int("n_group", self.n_group, 1)
        if E % self.n_group:
            raise ValueError(f"n_routed_experts={E} is not divisible by n_group={self.n_group}")
        per_group = E // self.n_group
        if self.topk_method == "noaux_tc" and self.n_group > 1 and per_group < 2:
            raise ValueError(f"noaux_tc scores each group by its two best experts, but "
                             f"n_routed_experts={E} in n_group={self.n_group} groups leaves "
                             f"{per_group} per group")
        _check_int("topk_group", self.topk_group, 1, self.n_group, f" (n_group={self.n_group})")
        _check_int("num_experts_per_tok", k, 1, self.topk_group * per_group,
                   f" (topk_group={self.topk_group} groups of {per_group} experts)")

    def _check_index(self):
        if self.index_topk is None:
            return
        _check_int("index_topk", self.index_topk, 1, why=" or null")
        _check_int("index_n_heads", self.index_n_heads, 1)
        _check_int("index_head_dim", self.index_head_dim, self.qk_rope_head_dim,
                   why=f" (its first qk_rope_head_dim={self.qk_rope_head_dim} columns are "
                       "rotated)")
        if not self.q_lora_rank:
            raise ValueError("index_topk (DeepSeek Sparse Attention) needs q_lora_rank: the "
                             "indexer's queries come from MLA's query latent")

    def _check_rope_scaling(self):
        scaling = self.rope_scaling
        if scaling is None:
            return
        if not isinstance(scaling, dict):
            raise ValueError(f"rope_scaling must be an object or null, got {scaling!r}")
        for key in _POSITIVE_ROPE_KEYS:
            if scaling.get(key) is not None:
                _check_positive_number(f"rope_scaling[{key!r}]", scaling[key])
        try:  # the tables' own checks: known keys and rope_type, what YaRN needs
            rope_frequencies(self.qk_rope_head_dim, self.rope_theta, scaling)
            rope_attention_factor(scaling)
        except (ValueError, TypeError) as error:
            raise ValueError(f"rope_scaling {scaling}: {error}") from None

    def _check_eos(self):
        eos = self.eos_token_id
        ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
        for i in ids:
            if not _is_int(i) or not 0 <= i < self.vocab_size:
                raise ValueError(f"eos_token_id must be null, an id or a list of ids in "
                                 f"[0, vocab_size={self.vocab_size}), got {eos!r}")

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf_config(cls, config: Any) -> "ModelConfig":
        """From a transformers DeepseekV3Config or a config.json dict. A field that is neither
        one of ours nor known metadata raises, naming it: silently ignoring it could build a
        different model than the checkpoint's. So does a missing one of the fields that fix
        the architecture (_REQUIRED_FIELDS): the defaults are DeepSeek-V3-671B's."""
        fields = config.to_dict() if hasattr(config, "to_dict") else config
        if not isinstance(fields, dict):
            raise ValueError(f"a config must be an object of fields, got {type(fields).__name__}")
        ours = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - ours - _IGNORED_FIELDS)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}: not a DeepSeek-V3-family "
                             "config, or a variant ds_model does not implement")
        missing = [name for name in _REQUIRED_FIELDS if name not in fields]
        if missing:
            raise ValueError(f"missing config field(s) {missing}: they fix the architecture, "
                             "and ds_model does not guess them")
        values = {k: v for k, v in fields.items() if k in ours}
        # DeepSeek-V4 writes expert_dtype beside quantization_config, V4.1 inside it (where
        # transformers' DeepseekV4Config moves it).
        if fields.get("expert_dtype") is not None and isinstance(values.get(
                "quantization_config"), dict):
            values["quantization_config"] = {"expert_dtype": fields["expert_dtype"],
                                             **values["quantization_config"]}
        derived = fields.get("qk_head_dim")
        if derived is not None and derived != values["qk_nope_head_dim"] + values[
                "qk_rope_head_dim"]:
            raise ValueError(f"qk_head_dim={derived} is not qk_nope_head_dim + qk_rope_head_dim")
        # DeepSeek-V2's gate (group_limited_greedy, greedy) is always softmax, and transformers'
        # DeepseekV2Config has no scoring_func to say so.
        if "scoring_func" not in values and values.get("topk_method", "noaux_tc") != "noaux_tc":
            values["scoring_func"] = "softmax"
        # transformers 5 keeps rope settings in rope_parameters (and rope_theta inside it).
        rope = fields.get("rope_parameters")
        if rope is not None and not isinstance(rope, dict):
            raise ValueError(f"rope_parameters must be an object or null, got {rope!r}")
        if rope:
            values["rope_theta"] = rope.get("rope_theta", values.get("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                values["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        return cls(**values)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def quantization(self) -> Quantization | None:
        """quantization_config parsed (None: a dense checkpoint)."""
        if self.quantization_config is None:
            return None
        return Quantization.from_config(self.quantization_config)

    def num_parameters(self) -> tuple[int, int]:
        """(total, active per token); see the module docstring for what is counted."""
        total = sum(math.prod(shape) * count for _, shape, count, _ in self._tensors())
        active = sum(math.prod(shape) * used for _, shape, _, used in self._tensors())
        return total, active

    def weight_bytes(self, dtype: torch.dtype, *, quantized: bool = True,
                     expert_ranks: int = 1) -> tuple[int, int]:
        """(bytes held, bytes one token reads) of the weights, as from_pretrained holds them in
        ``dtype``: routers in fp32; with quantization_config (and ``quantized``), FP8 weights
        at 1 byte + an fp32 scale per 128x128 block (V3's scales; V4's e8m0 take 1 byte) and
        MXFP4 experts at 0.5 + 1/32 byte, kv_b_proj in dtype (dequantised at load: see
        ds_model/quantized.py). A tied lm_head is held once but read by every token. With
        ``expert_ranks`` W (expert parallelism), what one rank holds: 1/W of the routed experts."""
        quantization = self.quantization if quantized else None
        held = read = 0
        for role, shape, count, used in self._tensors():
            size = _tensor_bytes(role, shape, dtype, quantization)
            if role == "experts":
                count = -(-count // expert_ranks)
            held += size * (0 if role == "lm_head" and self.tie_word_embeddings else count)
            read += size * used
        return held, read

    def _tensors(self):
        """(role, shape, count, active) of each kind of tensor the model holds: how many, and
        how many one token passes through. role: "linear" (quantised in FP8 checkpoints),
        "experts" (the routed experts' fused weights), "router" (fp32), "lm_head", "dense"
        (the model dtype: embeddings, norms, biases, kv_b_proj)."""
        h, heads, L = self.hidden_size, self.num_attention_heads, self.num_hidden_layers
        dense, moe = self.first_k_dense_replace, L - self.first_k_dense_replace
        dc, dr, ql = self.kv_lora_rank, self.qk_rope_head_dim, self.q_lora_rank
        qk_width = heads * self.qk_head_dim
        bias = self.attention_bias
        layer = [("dense", (h,), 2), ("linear", (dc + dr, h), 1), ("dense", (dc,), 1),
                 ("dense", (heads * (self.qk_nope_head_dim + self.v_head_dim), dc), 1),
                 ("linear", (h, heads * self.v_head_dim), 1),
                 ("dense", (dc + dr,), int(bias)), ("dense", (h,), int(bias))]
        if ql:
            layer += [("linear", (ql, h), 1), ("dense", (ql,), 1), ("linear", (qk_width, ql), 1),
                      ("dense", (ql,), int(bias))]
        else:
            layer += [("linear", (qk_width, h), 1)]
        if self.index_topk:  # the indexer: wq_b, wk, weights_proj and k_norm's weight and bias
            hi, di = self.index_n_heads, self.index_head_dim
            layer += [("linear", (hi * di, ql), 1), ("linear", (di, h), 1),
                      ("linear", (hi, h), 1), ("dense", (di,), 2)]
        mlp = self.intermediate_size
        shared = self.n_shared_experts * self.moe_intermediate_size
        E, I = self.n_routed_experts, self.moe_intermediate_size
        tensors = [(role, shape, n * L, n * L) for role, shape, n in layer if n]
        tensors += [("dense", (self.vocab_size, h), 1, 1), ("lm_head", (self.vocab_size, h), 1, 1),
                    ("dense", (h,), 1, 1),
                    ("linear", (mlp, h), 2 * dense, 2 * dense), ("linear", (h, mlp), dense, dense),
                    ("router", (E, h), moe, moe),
                    ("experts", (2 * I, h), moe * E, moe * self.num_experts_per_tok),
                    ("experts", (h, I), moe * E, moe * self.num_experts_per_tok)]
        if self.topk_method == "noaux_tc":  # V2's methods route without a correction bias
            tensors.append(("router", (E,), moe, moe))
        if shared:
            tensors += [("linear", (shared, h), 2 * moe, 2 * moe),
                        ("linear", (h, shared), moe, moe)]
        return [t for t in tensors if t[2]]


def _tensor_bytes(role, shape, dtype, quantization) -> float:
    """Bytes one tensor of ``shape`` takes (see weight_bytes)."""
    if role == "router":
        return math.prod(shape) * 4
    fmt = None if quantization is None else {"linear": FP8, "experts": quantization.experts}.get(
        role)
    if fmt == FP8:
        return math.prod(shape) + 4 * math.prod(scale_grid(FP8, shape))
    if fmt == MXFP4:
        return math.prod(shape) // 2 + math.prod(scale_grid(MXFP4, shape))
    return math.prod(shape) * dtype.itemsize


PRESETS = {
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=256,
                 moe_intermediate_size=64, num_hidden_layers=3, first_k_dense_replace=1,
                 n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4,
                 topk_group=2, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64,
                 qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                 max_position_embeddings=4096),
    "deepseek-v3-671b": dict(
        rope_scaling={"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
    "deepseek-v3.2-685b": dict(
        index_topk=2048, index_head_dim=128, index_n_heads=64,
        rope_scaling={"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
    "r2-hypothetical-1.2t": dict(
        num_hidden_layers=70, n_routed_experts=320, moe_intermediate_size=2560,
        num_experts_per_tok=16,
        rope_scaling={"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name, value, low, high=None, why=""):
    """value must be an int in [low, high] (high None: no bound); why says where high comes
    from."""
    if _is_int(value) and value >= low and (high is None or value <= high):
        return
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"
    raise ValueError(f"{name} must be an int {bound}{why}, got {value!r}")


def _check_positive_number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
