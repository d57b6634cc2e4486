"""Benchmarks of ds_kernels ops against their references and peer implementations.

``python -m bench --help``. ``harness`` measures and reports; each ``bench_<op>.py`` builds the
inputs of one op, checks every implementation against ds_kernels, and times them side by side.
"""
