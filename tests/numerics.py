"""assert_close with the library's dtype tolerance table (ds_kernels/testing.py)."""

from ds_kernels.testing import mismatches


def assert_close(actual, expected, dtype, reduction: int = 1, what: str = "values"):
    """Close within the dtype's tolerance grown by the reduction length; names the first bad
    indices. NaNs must match position for position."""
    problem = mismatches(actual, expected, dtype, reduction)
    assert problem is None, f"{what}: {problem}"
