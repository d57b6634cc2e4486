"""assert_close with the library's dtype tolerance table (ds_kernels/testing.py)."""

import torch
from hypothesis import strategies as st

from ds_kernels.testing import mismatches

# A property test draws one of these for every random tensor it makes (random_like), so that
# hypothesis can replay a failing example on its own (the global RNG is off limits there).
SEEDS = st.integers(0, 2**31 - 1)


VIEWS = st.sampled_from(["dense", "strided", "expanded"])


def as_view(t: torch.Tensor, view: str, dim: int = 0) -> torch.Tensor:
    """``t`` as a kernel argument that is not a plain dense tensor: "strided" - the same values,
    every other element of a wider tensor; "expanded" - t's first slice along ``dim`` broadcast
    over it (stride 0, so the values change: compare against the reference on the view)."""
    if view == "strided":
        return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]
    if view == "expanded":
        return t.narrow(dim, 0, min(1, t.shape[dim])).expand(t.shape)
    return t


def random_like(t: torch.Tensor, seed: int) -> torch.Tensor:
    """Standard-normal values shaped, typed and placed like ``t``, from ``seed`` alone."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, generator=g).to(t.device, t.dtype)


def assert_close(actual, expected, dtype, reduction: int = 1, what: str = "values", scale=1.0):
    """Close within the dtype's tolerance grown by the reduction length (atol times the terms'
    ``scale``); names the first bad indices. NaNs must match position for position."""
    problem = mismatches(actual, expected, dtype, reduction, scale)
    assert problem is None, f"{what}: {problem}"
