"""ModelConfig: the DeepSeek-V3 family's hyper-parameters, with transformers' field names.

Parameter counts (``num_parameters``) count every weight once; "active" counts what one token
passes through: attention, dense MLPs, the shared and top-k routed experts, the router, the
norms, and both the input embedding and the LM head (the embedding row is read, the head is a
full GEMM; DeepSeek's 37B counts them the same way to within rounding).

Presets:
  "tiny": a few million parameters for tests and the CLI.
  "deepseek-v3-671b": DeepSeek-V3's published config.json (without the MTP module):
      671.0B total, 37.6B active.
  "r2-hypothetical-1.2t": HYPOTHETICAL. "DeepSeek-R2" is a rumour (1.2T total, 78B active,
      "hybrid MoE"); no config is public. Derived by keeping V3's attention (hidden 7168, 128
      heads, the same MLA ranks) and searching layers, routed experts, expert width and top-k
      for the V3-style config nearest both rumoured numbers: 70 layers, 320 experts of width
      2560 in 8 groups, 16 routed + 1 shared per token gives 1200.3B total (+0.03%) and 79.0B
      active (+1.3%). "Hybrid" is not modelled.
"""

import dataclasses
from typing import Any

# Fields of a transformers DeepseekV3Config / config.json that describe no weight or math we
# run (metadata, training-only settings, generation defaults).
_IGNORED_FIELDS = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "use_cache", "initializer_range", "attention_dropout", "pretraining_tp", "bos_token_id",
    "pad_token_id", "ep_size", "moe_layer_freq", "num_nextn_predict_layers", "seq_aux",
    "topk_method", "aux_loss_alpha", "num_key_value_heads", "qk_head_dim", "rope_parameters",
    "max_window_layers", "output_router_logits", "router_aux_loss_coef",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "tokenizer_class", "prefix",
    "sep_token_id", "decoder_start_token_id", "task_specific_params", "problem_type",
    "id2label", "label2id", "cross_attention_hidden_size", "tie_encoder_decoder", "finetuning_task",
    "_name_or_path", "_attn_implementation_autoset", "_experts_implementation", "pruned_heads",
    "name_or_path", "attention_bias_type", "mlp_bias", "head_dim", "layer_types",
}


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
    n_group: int = 8
    topk_group: int = 4
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
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
    quantization_config: dict | None = None  # FP8 checkpoints: refused at load time

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf_config(cls, config: Any) -> "ModelConfig":
        """From a transformers DeepseekV3Config or a config.json dict. A field that is neither
        one of ours nor known metadata raises, naming it: silently ignoring it could build a
        different model than the checkpoint's."""
        fields = config if isinstance(config, dict) else config.to_dict()
        ours = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - ours - _IGNORED_FIELDS)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}: not a DeepSeek-V3-family "
                             "config, or a variant ds_model does not implement")
        values = {k: v for k, v in fields.items() if k in ours}
        derived = fields.get("qk_head_dim")
        if derived is not None and derived != values.get("qk_nope_head_dim", 128) + values.get(
                "qk_rope_head_dim", 64):
            raise ValueError(f"qk_head_dim={derived} is not qk_nope_head_dim + qk_rope_head_dim")
        # transformers 5 keeps rope settings in rope_parameters (and rope_theta inside it).
        rope = fields.get("rope_parameters")
        if rope:
            values["rope_theta"] = rope.get("rope_theta", values.get("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                values["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        return cls(**values)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def num_parameters(self) -> tuple[int, int]:
        """(total, active per token); see the module docstring for what is counted."""
        h, heads = self.hidden_size, self.num_attention_heads
        if self.q_lora_rank:
            q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * heads * self.qk_head_dim
        else:
            q = h * heads * self.qk_head_dim
        kv = (h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
              + self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim))
        layer = q + kv + heads * self.v_head_dim * h + 2 * h   # attention, o_proj, two norms
        expert = 3 * h * self.moe_intermediate_size
        router = self.n_routed_experts * h + self.n_routed_experts
        dense = self.first_k_dense_replace
        moe = self.num_hidden_layers - dense
        shared = self.n_shared_experts * expert + router
        common = (self.num_hidden_layers * layer + dense * 3 * h * self.intermediate_size
                  + 2 * self.vocab_size * h + h)
        total = common + moe * (self.n_routed_experts * expert + shared)
        active = common + moe * (self.num_experts_per_tok * expert + shared)
        return total, active


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
    "r2-hypothetical-1.2t": dict(
        num_hidden_layers=70, n_routed_experts=320, moe_intermediate_size=2560,
        num_experts_per_tok=16,
        rope_scaling={"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
}
