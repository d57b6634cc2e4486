"""mHC on the torch path: the reference's formulas (ds_kernels/reference/mhc.py) in float32,
and their backward by autograd through them. The work is a few small ops a token, which
torch's kernels already run as fast as a rewrite would; the Triton backend's backward is this
one too (its forward kernels fuse what matters on a GPU: two launches instead of ~50)."""

import torch

from ds_kernels.reference import mhc as reference


def mhc_pre(*args):
    return reference.mhc_pre(*args, compute=torch.float32)


def mhc_post(*args):
    return reference.mhc_post(*args, compute=torch.float32)


def mhc_pre_backward(*args):
    return reference.mhc_pre_backward(*args, compute=torch.float32)


def mhc_post_backward(*args):
    return reference.mhc_post_backward(*args, compute=torch.float32)
