"""One config tree: dataclasses, loaded from YAML, with dotted `key=value` overrides.

Unknown keys are rejected with the nearest valid name; wrong types and inconsistent values raise a
one-line ConfigError. Every section validates itself in `validate()`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, check_one_of as _one_of
from .model import ModelConfig  # noqa: F401  (the model section of the tree lives with the model)

# ----------------------------------------------------------------------------------------------
# Generic loading: YAML -> nested dataclasses, with checked types and nearest-key suggestions.


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    hint = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    more = f"; did you mean '{where}{hint[0]}'?" if hint else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{where}{key}'{more}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if errors else ConfigError(f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if not math.isfinite(f):  # nan, inf or an overflowing literal such as 1e999
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return f
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(str(key), list(fields), prefix)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def apply_overrides(obj: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    """Apply `a.b.c=value` overrides (values parsed as YAML scalars) to a dataclass tree, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        path, raw = item.split("=", 1)
        parts = path.strip().split(".")
        target = obj
        for depth, part in enumerate(parts):
            names = [f.name for f in dataclasses.fields(target)]
            where = ".".join(parts[:depth]) + ("." if depth else "")
            if part not in names:
                raise _unknown_key(part, names, where)
            if depth == len(parts) - 1:
                try:
                    value = yaml.safe_load(raw) if raw.strip() else ""
                except yaml.YAMLError:
                    value = raw
                hint = typing.get_type_hints(type(target))[part]
                setattr(target, part, _coerce(value, hint, path))
            else:
                target = getattr(target, part)
                if not dataclasses.is_dataclass(target):
                    raise ConfigError(f"'{'.'.join(parts[:depth + 1])}' is not a config section")
    return obj


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"invalid YAML in {p}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping at the top level")
    return data


def validate_tree(obj: Any) -> Any:
    """Call validate() on every section of a dataclass tree."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            validate_tree(v)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


CONFIG_VERSION = 1  # of the config tree written into runs and checkpoints (config.yaml)


def split_version(data: dict, where: str | Path) -> tuple[dict, int]:
    """(the tree without its `config_version` key, that version; 0 when absent). ConfigError for a version
    newer than this dualpath reads."""
    data = dict(data)
    version = data.pop("config_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ConfigError(f"{where}: config_version must be a whole number >= 0, got {version!r}")
    if version > CONFIG_VERSION:
        raise ConfigError(f"{where} has config version {version}; this dualpath reads up to {CONFIG_VERSION}: "
                          "upgrade dualpath")
    return data, version


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Load `cls` from an optional YAML file plus overrides, then validate the whole tree. A run's own
    config.yaml (with its `config_version`) loads like any other."""
    data = load_yaml(path) if path is not None else {}
    if path is not None:
        data, _ = split_version(data, path)
    obj = from_dict(cls, data)
    apply_overrides(obj, overrides)
    return validate_tree(obj)


@dataclass
class DataConfig:
    path: str = ""  # a folder written by `dualpath prepare`
    batch_size: int = 8  # sequences per micro-batch per rank
    seq_len: int = 0  # 0: model.seq_len

    def validate(self) -> "DataConfig":
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.seq_len < 0:
            raise ConfigError(f"data.seq_len must be >= 0, got {self.seq_len}")
        return self


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4  # floor of the decay
    weight_decay: float = 0.1  # on matrices only: never on embeddings, norms, gains, gates or router biases
    # The authors' reference decays the gates, norms, gains and biases too; True does that (embeddings stay
    # undecayed). Off by default; docs/MECHANISM.md reports its effect.
    decay_gates_and_norms: bool = False
    gate_lr_mult: float = 1.0  # learning-rate multiplier of the gate and gain parameters
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | wsd | constant
    wsd_decay_frac: float = 0.2  # wsd: share of steps spent decaying at the end

    def validate(self) -> "OptimConfig":
        _one_of("optim.schedule", self.schedule, ("cosine", "wsd", "constant"))
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= optim.min_lr <= optim.lr and lr > 0, got lr={self.lr} min_lr={self.min_lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError("optim.beta1 and optim.beta2 must be in [0, 1)")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("optim.warmup_steps, optim.weight_decay and optim.grad_clip must be >= 0")
        if not (math.isfinite(self.gate_lr_mult) and self.gate_lr_mult > 0):
            raise ConfigError(f"optim.gate_lr_mult must be a finite number > 0, got {self.gate_lr_mult}")
        if not 0 <= self.wsd_decay_frac <= 1:
            raise ConfigError(f"optim.wsd_decay_frac must be in [0, 1], got {self.wsd_decay_frac}")
        return self


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    # The horizon: exactly one of these (target_flops counts true training FLOPs, 3x forward).
    steps: int = 0
    tokens: int = 0
    target_flops: float = 0.0
    grad_accum: int = 1
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on cuda, fp32 on cpu) | float32 | bfloat16
    # torch.compile: true | false | auto (compiles a run long enough to repay the compile; parallel.use_compile)
    compile: bool | str = "auto"
    fsdp: bool = False  # FSDP2 fully_shard (GPU); otherwise DDP when launched by torchrun
    log_every: int = 10
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 8
    save_every: int = 200  # 0: only at the end
    keep_last: int = 2
    resume: str = ""  # "" | auto | PATH
    tensorboard: bool = True
    progress: bool = True
    peak_flops: float = 0.0  # FLOP/s for MFU; 0: measure a GEMM peak at start (CPU) or use the GPU's spec
    # Divergence guard: stop when a step's loss exceeds this factor times the mean of the last
    # divergence_window healthy losses (0: only non-finite losses and gradient norms stop a run).
    divergence_factor: float = 4.0
    divergence_window: int = 20

    def validate(self) -> "TrainConfig":
        _one_of("train.device", self.device, ("auto", "cpu", "cuda"))
        _one_of("train.dtype", self.dtype, ("auto", "float32", "bfloat16"))
        if self.seed < 0:  # numpy's generators take none
            raise ConfigError(f"train.seed must be >= 0, got {self.seed}")
        if isinstance(self.compile, str):  # YAML and key=value give bools already; a Python caller may not
            _one_of("train.compile", self.compile, ("true", "false", "auto"))
            if self.compile != "auto":
                self.compile = self.compile == "true"
        set_ = [n for n in ("steps", "tokens", "target_flops") if getattr(self, n) > 0]
        if len(set_) > 1:
            raise ConfigError(f"set only one of train.steps, train.tokens, train.target_flops (got {', '.join(set_)})")
        for n in ("steps", "tokens", "target_flops", "eval_every", "save_every", "peak_flops"):
            if getattr(self, n) < 0:
                raise ConfigError(f"train.{n} must be >= 0, got {getattr(self, n)}")
        if self.divergence_factor != 0 and self.divergence_factor <= 1:
            raise ConfigError(f"train.divergence_factor must be 0 (off) or > 1, got {self.divergence_factor}")
        for n in ("grad_accum", "log_every", "keep_last", "eval_batches", "divergence_window"):
            if getattr(self, n) < 1:
                raise ConfigError(f"train.{n} must be >= 1, got {getattr(self, n)}")
        return self


@dataclass
class RunConfig:
    """The root of the config tree: what `dualpath train CONFIG.yaml key=value ...` reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
