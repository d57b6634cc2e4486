"""Tolerances from one dtype table, growing with the reduction length, and an assert that
names the first bad indices."""

import torch

# (atol, rtol) for one rounding of the dtype; sums of n terms grow these by sqrt(n).
BASE_TOLERANCE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 1.6e-2),
}


def tolerance(dtype: torch.dtype, reduction: int = 1) -> tuple[float, float]:
    atol, rtol = BASE_TOLERANCE[dtype]
    grow = max(1.0, reduction) ** 0.5
    return atol * grow, rtol * grow


def assert_close(actual, expected, dtype, reduction: int = 1, what: str = "values"):
    """Like torch.testing.assert_close with our table; NaNs must match position for position."""
    atol, rtol = tolerance(dtype, reduction)
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol, equal_nan=True)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        pairs = [(i, actual[tuple(i)].item(), expected[tuple(i)].item()) for i in idx]
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} differ beyond "
                             f"atol={atol:.2g} rtol={rtol:.2g}; first (index, got, expected): {pairs}")
