"""The Ascend backend (backend "ascend"): npu tensors, on torch_npu's Ascend-C fused operators.

One file per op. Each maps our arguments onto the operator its documentation describes and
falls back to the torch path for what the operator does not cover. Untested on hardware: no
NPU has run this code; the tests check the argument mapping against a CPU model of each
operator's documented semantics. torch_npu is imported inside the functions, so importing
ds_kernels never needs torch_npu or Huawei's CANN.
"""
