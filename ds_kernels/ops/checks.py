"""Argument checks shared by the ops: each error names the argument and the offending value."""

import contextlib
import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# float64 too, so that gradcheck can test the GEMM ops' backward against finite differences.
GEMM_DTYPES = FLOAT_DTYPES + (torch.float64,)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(name: str, t, *, dim: int | None = None, dtypes=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")


def check_same_device(reference_name: str, reference: torch.Tensor, **others):
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference.device}")


def check_same_dtype(reference_name: str, reference: torch.Tensor, **others):
    for name, t in others.items():
        if t.dtype != reference.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {reference_name} has {reference.dtype}")


def check_int(name: str, value, *, low: int, high: int | None = None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")


def check_finite_float(name: str, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


_trusted_values = 0  # depth of trusted_values() contexts


@contextlib.contextmanager
def trusted_values():
    """Inside: the ops skip the checks that read index tensors' values (ids, slots, lengths and
    block tables in range: a device sync and a few small host ops each), as they do while a
    CUDA graph is being captured. For callers whose values are right by construction: a
    captured decode step (ds_model/captured.py), fed by KVCache's checked bookkeeping. Shapes,
    dtypes and devices are still checked."""
    global _trusted_values
    _trusted_values += 1
    try:
        yield
    finally:
        _trusted_values -= 1


def device_checks_allowed(t: torch.Tensor) -> bool:
    """Whether a check may read values of ``t`` (a device sync): not while a CUDA graph is being
    captured, where reading back would break the capture, nor inside trusted_values()."""
    return not (_trusted_values or (t.is_cuda and torch.cuda.is_current_stream_capturing()))


def check_ids_in_range(name: str, ids: torch.Tensor, num_experts: int):
    if ids.numel() and device_checks_allowed(ids):
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= num_experts:
            raise ValueError(f"{name} must be in [0, {num_experts}), got values in [{low}, {high}]")


def check_frozen(op: str, **weights):
    """Quantised weights get no gradient: refuse one that asks for it, naming it."""
    for name, t in weights.items():
        if torch.is_grad_enabled() and t.requires_grad:
            raise ValueError(f"{op}: {name} requires grad, but quantised weights are frozen: no "
                             f"gradient reaches them or their scales (the inputs' gradients are "
                             f"computed). Hold it as a buffer or nn.Parameter(..., "
                             f"requires_grad=False), pass {name}.detach(), or train unquantised "
                             f"weights")
