"""Hugging Face configuration of a Dual-Path model (model_type "dualpath").

This file is copied, with the model code it needs, next to the weights by `dualpath export --hf`, so
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` works without dualpath installed.
Inside the dualpath package it imports `..model`; the exported copy imports `.model` (the exporter
rewrites the two-dot imports).

Every field of `dualpath.model.ModelConfig` is a config attribute, plus inference settings that
`from_pretrained(DIR, trust_remote_code=True, K=2, gates="deep-only")` (and so lm-eval's `--model_args`)
can set:

    K                 loop steps of the deep path (1..max_loops), as `Overrides(K=...)` does natively
                      (`trained_K` keeps the K the weights were trained with)
    extra_steps_gain  "last" | "own": the gain of steps beyond trained_K (see `Overrides`)
    gates             None | a gate mode of `Overrides` (dual only)
    gate_seed         seed of the shuffled gate modes
    adaptive          None | an adaptive-depth policy string, e.g. "exit=0.1,deep=0.05" (`AdaptivePolicy`;
                      loop and dual only); `dualpath export --adaptive POLICY` writes one into config.json
"""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from ..errors import CheckpointError, ConfigError
from ..model import GATE_MIXES, AdaptivePolicy, ModelConfig, check_gate_override

# The layout of config.json. Tracks dualpath.checkpoint.CONFIG_VERSION (a test keeps them equal).
# Raise it, and extend `upgrade_fields`, whenever a ModelConfig field is renamed or changes meaning.
DUALPATH_CONFIG_VERSION = 1

MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
GATE_OVERRIDES = "deep-only, wide-only, both=C, " + ", ".join(GATE_MIXES)


def upgrade_fields(fields: dict, version: int) -> dict:
    """Bring the ModelConfig fields of an older config.json up to DUALPATH_CONFIG_VERSION.

    Version 0 (no version field) has the same layout as version 1.
    """
    return fields


def check_gates(gates) -> None:
    if gates is None:
        return
    try:
        check_gate_override(gates if isinstance(gates, str) else "")
    except ConfigError:
        raise ValueError(f"gates={gates!r} is not one of {GATE_OVERRIDES}") from None


def check_adaptive(adaptive) -> str | None:
    """The policy in its canonical spelling (None when absent or inert); ValueError when it does not parse."""
    if adaptive is None or isinstance(adaptive, AdaptivePolicy):
        policy = adaptive
    else:
        try:
            policy = AdaptivePolicy.parse(str(adaptive))
        except ConfigError as e:
            raise ValueError(str(e)) from None
    return None if policy is None or policy == AdaptivePolicy() else str(policy)


class DualPathConfig(PretrainedConfig):
    model_type = "dualpath"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "max_position_embeddings": "seq_len",
    }

    def __init__(self, gates: str | None = None, gate_seed: int = 0, trained_K: int | None = None,
                 extra_steps_gain: str = "last", adaptive: str | None = None,
                 dualpath_config_version: int = DUALPATH_CONFIG_VERSION, **kwargs):
        try:
            version = int(dualpath_config_version)
        except (TypeError, ValueError):
            raise CheckpointError(f"dualpath_config_version={dualpath_config_version!r} is not an integer") from None
        if version > DUALPATH_CONFIG_VERSION:
            raise CheckpointError(
                f"this export has dualpath_config_version {version}, but its model code reads up to "
                f"{DUALPATH_CONFIG_VERSION}: re-export the checkpoint with a matching dualpath "
                f"(dualpath export CHECKPOINT --hf DIR)")
        fields = {name: kwargs.pop(name) for name in MODEL_FIELDS if name in kwargs}
        fields = upgrade_fields(fields, version)
        defaults = ModelConfig()
        for name in MODEL_FIELDS:
            setattr(self, name, fields.get(name, getattr(defaults, name)))
        check_gates(gates)
        self.gates = gates
        self.gate_seed = int(gate_seed)
        # K is the inference setting (from_pretrained(..., K=3)); the weights were trained with trained_K
        self.trained_K = int(trained_K if trained_K is not None else self.K)
        if extra_steps_gain not in ("last", "own"):
            raise ValueError(f"extra_steps_gain={extra_steps_gain!r} is not one of last, own")
        self.extra_steps_gain = extra_steps_gain
        self.adaptive = check_adaptive(adaptive)
        self.dualpath_config_version = DUALPATH_CONFIG_VERSION  # upgraded on load
        kwargs["tie_word_embeddings"] = bool(self.tie_embeddings)
        kwargs.setdefault("use_cache", True)
        super().__init__(**kwargs)

    def to_model_config(self) -> ModelConfig:
        """The dualpath ModelConfig; raises ConfigError if the fields are inconsistent."""
        cfg = ModelConfig(**{name: getattr(self, name) for name in MODEL_FIELDS})
        cfg.K = self.trained_K
        return cfg.validate()
