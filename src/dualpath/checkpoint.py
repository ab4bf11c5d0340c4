"""Checkpoints: one folder per step, written atomically (temp folder, fsync, rename), read with weights_only.

    RUN/checkpoints/step_00000100/
        model.safetensors   weights (a tied LM head is stored once, as embed.weight)
        optimizer.pt        optimizer state            (torch.load(weights_only=True))
        trainer_state.pt    step, RNG states, data position, counters
        config.yaml         the whole config tree, with its version
        tokenizer.json      copied from the data folder, so eval and generate need nothing else
        data_meta.json
    RUN/checkpoints/latest  the name of the newest complete checkpoint (replaced atomically)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import yaml

from .config import RunConfig, from_dict, to_dict
from .errors import CheckpointError, ConfigError
from .fileio import atomic_write_text, fsync_dir, fsync_file  # noqa: F401 (atomic_write_text re-exported)

CONFIG_VERSION = 1
WEIGHTS = "model.safetensors"


def weights_for_saving(state: dict, cfg: RunConfig) -> dict:
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if cfg.model.tie_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as embed.weight
    return state


def write_config(path: str | Path, cfg: RunConfig) -> None:
    """The whole config tree with its version, as YAML (atomically): a run's and a checkpoint's config.yaml."""
    atomic_write_text(path, yaml.safe_dump({"config_version": CONFIG_VERSION, **to_dict(cfg)}, sort_keys=False))


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict, cfg: RunConfig, *,
                    optimizer_state: dict | None = None, trainer_state: dict | None = None,
                    files: dict[str, Path] | None = None, keep_last: int = 2) -> Path:
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(weights_for_saving(model_state, cfg), str(tmp / WEIGHTS), metadata={"format": "pt"})
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    write_config(tmp / "config.yaml", cfg)
    for name, src in (files or {}).items():
        if src is not None and Path(src).is_file():
            shutil.copyfile(src, tmp / name)
    for f in tmp.iterdir():
        fsync_file(f)
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    atomic_write_text(root / "latest", final.name + "\n")
    _prune(root, keep_last)
    return final


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder, a run folder, or a checkpoints folder."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if (p / WEIGHTS).is_file():
        return p
    for root in (p / "checkpoints", p):
        latest = root / "latest"
        if latest.is_file():
            cand = root / latest.read_text().strip()
            if (cand / WEIGHTS).is_file():
                return cand
        steps = sorted(q for q in root.glob("step_*") if (q / WEIGHTS).is_file())
        if steps:
            return steps[-1]
    raise CheckpointError(f"no checkpoint in {p} (expected {WEIGHTS} or a checkpoints/ folder)")


def find_latest(run_dir: str | Path) -> Path | None:
    try:
        return resolve(Path(run_dir) / "checkpoints")
    except CheckpointError:
        return None


def load_config(ckpt: Path) -> RunConfig:
    path = ckpt / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no config.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise CheckpointError(f"corrupt config.yaml in {ckpt}") from None
    version = data.pop("config_version", 0)
    if version > CONFIG_VERSION:
        raise CheckpointError(f"checkpoint {ckpt} has config version {version}; this dualpath reads up to "
                              f"{CONFIG_VERSION}: upgrade dualpath")
    data = _upgrade(data, version)
    try:
        return from_dict(RunConfig, data)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {ckpt} config: {e}") from None


def _upgrade(data: dict, version: int) -> dict:
    """Bring an older config tree up to CONFIG_VERSION. Version 0 had no version field; same layout."""
    return data


def load_weights(ckpt: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(ckpt / WEIGHTS))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"corrupt weights in {ckpt / WEIGHTS}: {str(e).splitlines()[0]}") from None


def load_torch(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means a corrupt file
        raise CheckpointError(f"corrupt checkpoint file {path}: {str(e).splitlines()[0][:200]}") from None


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Build the model stored at `path` (run, checkpoints or step folder). Returns (model, config, folder)."""
    ckpt = resolve(path)
    cfg = load_config(ckpt)
    try:
        cfg.model.validate()
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {ckpt}: {e}") from None
    model = cfg.model.build()
    load_model_state(ckpt, model)
    return model.to(device).eval(), cfg, ckpt


def load_model_state(ckpt: Path, model: torch.nn.Module) -> None:
    """The weights of checkpoint `ckpt` into `model` (a tied LM head is restored from embed.weight)."""
    state = load_weights(ckpt)
    if "lm_head.weight" not in state and "embed.weight" in state:
        state["lm_head.weight"] = state["embed.weight"]
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"weights in {ckpt} do not fit its config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    for k, v in state.items():
        if v.shape != expected[k].shape and v.numel() == expected[k].numel():
            state[k] = v.reshape(expected[k].shape)  # older checkpoints kept the wide gain β as a scalar
        elif v.shape != expected[k].shape:
            raise CheckpointError(f"weights in {ckpt}: {k} has shape {tuple(v.shape)}, the config builds "
                                  f"{tuple(expected[k].shape)}")
    model.load_state_dict(state)
