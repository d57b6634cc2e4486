"""autotune: sweeps of kernel configs and CPU strategies on the user's own hardware.

``python -m autotune sweep --op fused_moe`` checks every candidate against the reference
(a wrong one is rejected and reported, never stored), times the rest, and stores the best per
shape and token bucket where ds_kernels looks them up at run time (ds_kernels/tuning.py).
``python -m autotune import-vllm FILE...`` converts vLLM's tuned fused_moe files.
"""
