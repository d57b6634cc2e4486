"""autotune: sweeps of kernel configs and CPU strategies on the user's own hardware.

``python -m autotune sweep --op fused_moe`` (or grouped_mm, route, mla_decode, mla_prefill)
checks every candidate against the reference (a wrong one is rejected and reported, never
stored), times the rest, and stores the best per shape and bucket where ds_kernels looks them
up at run time (ds_kernels/tuning.py). On a GPU it tunes the Triton kernels' tiles; on CPU the
torch path's own knobs. Modules: spaces (candidates from ds_kernels/tuning_spaces.py, and
pruning), cases (shapes, inputs, reference answers), sweep (check, time, pick), store (atomic
writes), vllm (import).
``python -m autotune import-vllm FILE...`` converts vLLM's tuned fused_moe files.
"""
