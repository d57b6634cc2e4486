"""Numerical tolerances, one dtype table for the tests and the autotune sweep's checks.

Each (atol, rtol) is about one rounding of the dtype; a sum of n terms grows both by sqrt(n)
(FlagGems' practice: tolerance grows with the reduction length). The rounding error of a sum
follows the size of its terms, not of the result: where terms cancel (an RMSNorm gradient of a
row whose mean square is far above eps), ``scale`` - the terms' magnitude, a number or a
tensor broadcast against the result - multiplies atol.
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


def mismatches(actual, expected, dtype, reduction: int = 1, scale=1.0) -> str | None:
    """None if close (NaN matching NaN), else a message with the first bad indices."""
    atol, rtol = tolerance(dtype, reduction)
    actual, expected = actual.double().cpu(), expected.double().cpu()
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if isinstance(scale, torch.Tensor):
        scale = scale.double().cpu()
    close = (actual - expected).abs() <= atol * scale + rtol * expected.abs()
    same = (actual == expected) | (actual.isnan() & expected.isnan())  # infinities, NaNs
    bad = ~(close | same)
    if not bad.any():
        return None
    pairs = [(i, actual[tuple(i)].item(), expected[tuple(i)].item()) for i in bad.nonzero()[:5].tolist()]
    scaled = "" if isinstance(scale, float) and scale == 1.0 else " (times the terms' scale)"
    return (f"{int(bad.sum())} of {bad.numel()} differ beyond atol={atol:.2g}{scaled} "
            f"rtol={rtol:.2g}; "
            f"first (index, got, expected): {pairs}")
