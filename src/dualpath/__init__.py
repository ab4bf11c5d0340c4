"""dualpath: Dual-Path (deep + wide) and Duo-LLM language models, with exact FLOP accounting."""

from .config import load_config
from .errors import CheckpointError, ConfigError, DataError, DualPathError
from .model import DualPathLM, KVCache, LMOutput, ModelConfig, Overrides, TokenChoice, swiglu_hidden

__version__ = "0.1.0"

__all__ = ["ModelConfig", "load_config", "DualPathLM", "KVCache", "LMOutput", "Overrides", "TokenChoice", "swiglu_hidden",
           "DualPathError", "ConfigError", "DataError", "CheckpointError"]
