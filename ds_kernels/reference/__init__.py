"""Readable reference twins of every op: the specification the kernels are tested against.

Each function here spells out the op's contract step by step in plain torch, favouring clarity
over speed. Nothing in this package imports a kernel.
"""
