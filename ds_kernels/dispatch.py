"""The one registry that maps (op, backend) to an implementation.

Adding an op means adding one row to ``_IMPLEMENTATIONS``; adding a backend means adding a
name to ``BACKENDS`` and ``_FOLDERS`` plus its availability check. Implementations are named as
"module:function" strings and imported on first use, so that importing ``ds_kernels`` never
imports triton or torch_npu, and ``TRITON_INTERPRET`` may be set any time before the first call.

Selection, for the device of an op's first tensor argument:
  1. ``ds_kernels.use_backend(...)`` (a context manager), else ``DS_KERNELS_BACKEND`` - forced:
     if that backend cannot run here, or lacks the op, a ``BackendUnavailableError`` says why.
  2. otherwise by device: cuda/xpu -> triton, npu -> ascend, anything else -> torch. If the
     preferred backend cannot run (triton not installed, an op with no Ascend kernel yet), the
     torch path runs instead and a warning is logged once per (op, backend).
"""

import contextlib
import functools
import importlib
import importlib.util
import logging
import os
from typing import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

BACKENDS = ("triton", "ascend", "torch", "reference")

# Where each backend keeps its implementations: ds_kernels/<folder>/<module>.py
_FOLDERS = {"triton": "kernels", "ascend": "ascend", "torch": "cpu", "reference": "reference"}


def _paths(module: str, op: str, backends=("triton", "torch", "reference")) -> dict[str, str]:
    return {backend: f"ds_kernels.{_FOLDERS[backend]}.{module}:{op}" for backend in backends}


_IMPLEMENTATIONS: dict[str, dict[str, str]] = {
    "route": _paths("route", "route", BACKENDS),
    "moe_align": _paths("moe_align", "moe_align"),
    "grouped_mm": _paths("grouped_mm", "grouped_mm"),
    "grouped_mm_backward": _paths("grouped_mm", "grouped_mm_backward"),
    "fused_moe": _paths("fused_moe", "fused_moe"),
    "fused_moe_backward": _paths("fused_moe", "fused_moe_backward"),
    "rms_norm": _paths("rms_norm", "rms_norm"),
    "rms_norm_backward": _paths("rms_norm", "rms_norm_backward"),
    "apply_rope": _paths("apply_rope", "apply_rope"),
    "mla_cache_write": _paths("mla_cache_write", "mla_cache_write"),
    "mla_cache_write_fused": _paths("mla_cache_write", "mla_cache_write_fused"),
    "mla_decode": _paths("mla_decode", "mla_decode"),
    "index_cache_write": _paths("index_cache_write", "index_cache_write"),
    "lightning_indexer": _paths("lightning_indexer", "lightning_indexer"),
    "sparse_mla": _paths("sparse_mla", "sparse_mla"),
    "mla_prefill": _paths("mla_prefill", "mla_prefill"),
    "mla_prefill_backward": _paths("mla_prefill", "mla_prefill_backward"),
    "quant_linear": _paths("quant_linear", "quant_linear"),
    "quant_linear_backward": _paths("quant_linear", "quant_linear_backward"),
    "mhc_pre": _paths("mhc", "mhc_pre"),
    "mhc_post": _paths("mhc", "mhc_post"),
    # Torch code on every backend (ds_kernels/cpu/mhc.py): the Triton entry names it too.
    "mhc_pre_backward": {**_paths("mhc", "mhc_pre_backward", ("torch", "reference")),
                         "triton": "ds_kernels.cpu.mhc:mhc_pre_backward"},
    "mhc_post_backward": {**_paths("mhc", "mhc_post_backward", ("torch", "reference")),
                          "triton": "ds_kernels.cpu.mhc:mhc_post_backward"},
}

# Devices whose tensors Triton compiles for (ROCm GPUs report "cuda" too).
_TRITON_DEVICES = ("cuda", "xpu")

log = logging.getLogger("ds_kernels")
_warned: set[tuple[str, str]] = set()
# Process-wide, not thread-local: autograd runs CUDA backward passes on its own threads, which
# must see the backend that the forward was forced to.
_forced: list[str | None] = [None]


class BackendUnavailableError(RuntimeError):
    """A backend was asked for explicitly but cannot run this op on this device."""


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force ``name`` for ops called inside the block (None: automatic); overrides the env var."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    previous = _forced[0]
    _forced[0] = name
    try:
        yield
    finally:
        _forced[0] = previous


def forced_backend() -> str | None:
    """The backend forced by ``use_backend`` or ``DS_KERNELS_BACKEND``, else None."""
    name = _forced[0] or os.environ.get("DS_KERNELS_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"DS_KERNELS_BACKEND={name!r} is not a backend; expected one of {BACKENDS}")
    return name


def preferred_backend(device: torch.device) -> str:
    if device.type in _TRITON_DEVICES:
        return "triton"
    if device.type == "npu":
        return "ascend"
    return "torch"


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` here, or None if it can."""
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton; Linux only)"
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return ("Triton kernels on CPU tensors run only in Triton's interpreter: set "
                    "TRITON_INTERPRET=1 before importing ds_kernels")
        if device.type not in _TRITON_DEVICES + ("cpu",):
            return f"Triton does not compile for {device.type} tensors"
    if backend == "ascend":
        if device.type != "npu":
            return f"the Ascend backend needs npu tensors, got {device.type}"
        if importlib.util.find_spec("torch_npu") is None:
            return "torch_npu is not installed (pip install 'ds-kernels[ascend]' plus Huawei's CANN)"
    return None


@functools.cache
def _load(path: str) -> Callable:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def implementation(op: str, device: torch.device) -> Callable:
    """The function that runs ``op`` for tensors on ``device`` under the current selection."""
    table = _IMPLEMENTATIONS[op]
    forced = forced_backend()
    if forced is not None:
        reason = unavailable_reason(forced, device)
        if reason is None and forced not in table:
            reason = f"{op} has no {forced} implementation yet"
        if reason is not None:
            raise BackendUnavailableError(f"backend {forced!r} was forced for {op}, but {reason}")
        return _load(table[forced])
    backend = preferred_backend(device)
    reason = unavailable_reason(backend, device)
    if reason is None and backend not in table:
        reason = f"{op} has no {backend} implementation yet"
    if reason is not None:
        if (op, backend) not in _warned:
            _warned.add((op, backend))
            log.warning("ds_kernels.%s: %s backend unavailable (%s); using the torch path",
                        op, backend, reason)
        backend = "torch"
    return _load(table[backend])


def implementations(op: str) -> tuple[str, ...]:
    """The backends that implement ``op``."""
    return tuple(b for b in BACKENDS if b in _IMPLEMENTATIONS[op])


def direct_call_allowed(*tensors) -> bool:
    """Whether a public op may call its backend directly instead of through torch.ops.

    torch.ops' custom-op layer costs ~50 us a call on CPU (bench/bench_route.py at T=1), more
    than a decode step's routing itself. It only matters to autograd, torch.compile,
    dispatch modes (fake tensors, tracing) and meta tensors, so plain eager inference on plain
    tensors skips it.
    """
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    grad = torch.is_grad_enabled()
    # Meta tensors (shape inference, deferred init) hold no values: the ops' fake
    # implementations answer for them.
    return all(t is None or (type(t) in _PLAIN and not t.is_meta
                             and not (grad and t.requires_grad)) for t in tensors)


# Tensor types that no subclass logic (fake tensors, DTensor, ...) needs to see.
_PLAIN = (torch.Tensor, torch.nn.Parameter)
