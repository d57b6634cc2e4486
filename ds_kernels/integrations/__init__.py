"""Bridges from other libraries' models onto ds_kernels ops.

Each submodule imports the library it patches, so import it by name:
``from ds_kernels.integrations.hf import patch_deepseek_v3`` (needs transformers >= 5).
"""
