"""Recording the experts a model really picks, to tune fused_moe on them.

Real routing is skewed (hot experts, correlated choices across tokens), and the best tiles for
a few overfull experts differ from those for uniform random routing. Record a run, then replay
it in a sweep:

    with RoutingRecorder(model) as recorder:
        model.generate(prompts, max_new_tokens=64)
    recorder.save("topk_ids.safetensors")
    # python -m autotune sweep --op fused_moe --routing topk_ids.safetensors

The file holds "topk_ids" (int32 [rows, k], every MoE layer's choices, layer after layer, in
the order they ran) and "<router name>" per layer.
"""

from pathlib import Path

import torch
from torch import nn

from ds_kernels.moe import Router


class RoutingRecorder:
    """Collects the topk_ids of every ds_kernels Router inside ``model`` while active."""

    def __init__(self, model: nn.Module):
        self.routers = {name: m for name, m in model.named_modules() if isinstance(m, Router)}
        if not self.routers:
            raise ValueError("the model has no ds_kernels.moe.Router to record")
        self.ids: dict[str, list[torch.Tensor]] = {name: [] for name in self.routers}
        self._hooks = []

    def __enter__(self):
        for name, router in self.routers.items():
            self._hooks.append(router.register_forward_hook(self._keeper(name)))
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _keeper(self, name):
        def keep(module, args, output):
            _, topk_ids = output                                  # [T, k]
            self.ids[name].append(topk_ids.detach().to("cpu", torch.int32))
        return keep

    def tensors(self) -> dict[str, torch.Tensor]:
        per_layer = {name: torch.cat(ids) for name, ids in self.ids.items() if ids}
        if not per_layer:
            raise ValueError("nothing was recorded: run the model inside the `with` block")
        return {"topk_ids": torch.cat(list(per_layer.values())), **per_layer}

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        save_file({name: t.contiguous() for name, t in self.tensors().items()}, str(path))
        return Path(path)
