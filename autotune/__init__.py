"""autotune: sweeps of kernel configs on the user's own hardware (``python -m autotune``).

Not built yet (its issue builds on the kernel issues). The reader of tuned configs will live in
ds_kernels; this package only writes them.
"""
