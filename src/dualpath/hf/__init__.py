"""Hugging Face integration: `export_hf` writes a transformers-loadable folder from a dualpath checkpoint.

    from dualpath.hf import export_hf
    export_hf("runs/x", "exports/x")          # then AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)

`DualPathConfig` and `DualPathForCausalLM` (which need transformers) are imported lazily.
See docs/HF_AND_LM_EVAL.md.
"""

from __future__ import annotations

from .export import export_hf, model_code_files

__all__ = ["export_hf", "model_code_files", "DualPathConfig", "DualPathForCausalLM", "DualPathCache",
           "DUALPATH_CONFIG_VERSION"]


def __getattr__(name):
    if name in ("DualPathConfig", "DUALPATH_CONFIG_VERSION"):
        from . import configuration_dualpath

        return getattr(configuration_dualpath, name)
    if name in ("DualPathForCausalLM", "DualPathCache"):
        from . import modeling_dualpath

        return getattr(modeling_dualpath, name)
    raise AttributeError(f"module 'dualpath.hf' has no attribute '{name}'")
