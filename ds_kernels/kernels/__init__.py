"""Triton kernels and their launchers (backend "triton"): one file per op.

Each file reads top to bottom: constants, @triton.jit helpers, kernels, then the plain-Python
launcher that the dispatcher calls. Under TRITON_INTERPRET=1 the same kernels run on CPU
tensors in Triton's interpreter, which is how CI checks them.
"""
