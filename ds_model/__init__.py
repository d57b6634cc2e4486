"""ds_model: a thin DeepSeek-V3-family network built only from ds_kernels ops.

    model = DeepSeekForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    logits = model(input_ids)                               # [B, S, V]
    out = model.generate(prompts, max_new_tokens=64)        # greedy; paged latent cache

``python -m ds_model generate --preset tiny`` runs it from the command line; DeepSeek's FP8
checkpoints load as published and stay quantised (ds_model/quantized.py), and
``python -m ds_model quantize SRC DST`` writes a bf16 checkpoint in that format.
"""

from ds_model.config import PRESETS, ModelConfig
from ds_model.model import DeepSeekForCausalLM, KVCache

__all__ = ["DeepSeekForCausalLM", "KVCache", "ModelConfig", "PRESETS"]
