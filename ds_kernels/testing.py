"""Numerical tolerances, one dtype table for the tests and the autotune sweep's checks.

Each (atol, rtol) is about one rounding of the dtype; a sum of n terms grows both by sqrt(n)
(FlagGems' practice: tolerance grows with the reduction length).
"""

import torch

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


def mismatches(actual, expected, dtype, reduction: int = 1) -> str | None:
    """None if close (NaN matching NaN), else a message with the first bad indices."""
    atol, rtol = tolerance(dtype, reduction)
    actual, expected = actual.double().cpu(), expected.double().cpu()
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol, equal_nan=True)
    if not bad.any():
        return None
    pairs = [(i, actual[tuple(i)].item(), expected[tuple(i)].item()) for i in bad.nonzero()[:5].tolist()]
    return (f"{int(bad.sum())} of {bad.numel()} differ beyond atol={atol:.2g} rtol={rtol:.2g}; "
            f"first (index, got, expected): {pairs}")
