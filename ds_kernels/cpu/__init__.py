"""The fast torch path (backend "torch"): vectorised, no Python loop over experts or tokens.

Runs on any device torch runs on; it is what CPU tensors get, and the fallback for devices
whose preferred backend lacks an op.
"""
