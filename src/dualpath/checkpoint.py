"""Checkpoints: one folder per step, written atomically (temp folder, fsync, rename), read with weights_only.

    RUN/checkpoints/step_00000100/
        model.safetensors   weights (a tied LM head is stored once, as embed.weight)
        optimizer.pt        optimizer state            (torch.load(weights_only=True))
        trainer_state.pt    step, RNG states, data position, counters
        config.yaml         the whole config tree, with its version
        tokenizer.json      copied from the data folder, so eval and generate need nothing else
        data_meta.json
        manifest.json       size and sha256 of every other file, written last
    RUN/checkpoints/latest  the name of the newest complete checkpoint (replaced atomically)

A checkpoint verifies itself against its manifest: loading and resuming check it, and `--resume auto` takes
the newest checkpoint that verifies. Checkpoints older than manifests (none written) load unverified.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml

from .config import CONFIG_VERSION, RunConfig, from_dict, split_version, to_dict
from .errors import CheckpointError, ConfigError, first_line, warn
from .fileio import (atomic_open, atomic_write_json, atomic_write_text, copy_file, fsync_dir, fsync_file,
                     install_dir, sha256_file)

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"


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
                    files: dict[str, Path] | None = None, keep_last: int | None = 2) -> Path:
    """Write step folder RUN/checkpoints/step_N in a temp folder (every file fsynced, the manifest last),
    rename it into place (an old folder of that step is moved aside and deleted only after), then point
    `latest` at it and prune to keep_last (None: the caller prunes, see `prune`)."""
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # the temp folder is the atomic unit: safetensors writes into it directly, then fsync
    save_file(weights_for_saving(model_state, cfg), str(tmp / WEIGHTS), metadata={"format": "pt"})
    fsync_file(tmp / WEIGHTS)
    for name, obj in (("optimizer.pt", optimizer_state), ("trainer_state.pt", trainer_state)):
        if obj is not None:
            with atomic_open(tmp / name, "wb") as f:
                torch.save(obj, f)
    write_config(tmp / "config.yaml", cfg)
    for name, src in (files or {}).items():
        if src is not None and Path(src).is_file():
            copy_file(src, tmp / name)
    write_manifest(tmp, step)
    install_dir(tmp, final)
    atomic_write_text(root / "latest", final.name + "\n")
    if keep_last is not None:
        prune(run_dir, keep_last)
    return final


def write_manifest(folder: Path, step: int) -> None:
    """manifest.json: size and sha256 of every file of the folder (read back from disk), written last."""
    entries = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
               for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    atomic_write_json(folder / MANIFEST, {"step": step, "files": entries})
    fsync_dir(folder)


def verify(ckpt: Path) -> None:
    """CheckpointError naming the first file that does not match the manifest (missing, another size,
    another checksum) or an unreadable manifest. A folder with weights and no manifest is a checkpoint from
    before manifests: accepted unverified."""
    ckpt = Path(ckpt)
    path = ckpt / MANIFEST
    if not path.is_file():
        if (ckpt / WEIGHTS).is_file():
            return
        raise CheckpointError(f"checkpoint {ckpt} is incomplete (no {WEIGHTS})")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or WEIGHTS not in files:
            raise ValueError
    except (ValueError, KeyError, TypeError, OSError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {ckpt}: corrupt {MANIFEST}") from None
    for name, entry in files.items():
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {ckpt}: {name} is missing")
        try:
            size, digest = int(entry["bytes"]), str(entry["sha256"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"checkpoint {ckpt}: corrupt {MANIFEST}") from None
        if f.stat().st_size != size:
            raise CheckpointError(f"checkpoint {ckpt}: {name} is {f.stat().st_size} bytes, the manifest says "
                                  f"{size} (truncated or corrupt)")
        if sha256_file(f) != digest:
            raise CheckpointError(f"checkpoint {ckpt}: {name} does not match its checksum (corrupt)")


def step_folders(root: Path) -> list[Path]:
    """The step_* folders under RUN/checkpoints (or a checkpoints folder), oldest first."""
    root = Path(root)
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    return sorted(q for q in root.glob("step_*") if q.is_dir())


def find_resumable(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run that verifies, or None when it has none. Newer ones that fail are
    named in a one-line warning; if all fail, the newest one's problem is the error."""
    steps = step_folders(Path(run_dir) / "checkpoints")
    problems = []
    for ckpt in reversed(steps):
        try:
            verify(ckpt)
            load_config(ckpt)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            warn(f"skipping {len(problems)} newer checkpoint(s) that do not verify ({problems[0]}); "
                 f"resuming from {ckpt}")
        return ckpt
    if problems:
        raise CheckpointError(f"no checkpoint of {run_dir} verifies: {problems[0]}")
    return None


def prune(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest keep_last step folders of a run."""
    for old in step_folders(Path(run_dir) / "checkpoints")[:-keep_last]:
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
    except (yaml.YAMLError, UnicodeDecodeError):
        raise CheckpointError(f"corrupt config.yaml in {ckpt}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"corrupt config.yaml in {ckpt}")
    try:
        data, version = split_version(data, f"checkpoint {ckpt}")
        return from_dict(RunConfig, _upgrade(data, version))
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
        raise CheckpointError(f"corrupt weights in {ckpt / WEIGHTS}: {first_line(e)}") from None


def load_torch(path: Path):
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means a corrupt file
        raise CheckpointError(f"corrupt checkpoint file {path}: {first_line(e)}") from None


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Build the model stored at `path` (run, checkpoints or step folder). Returns (model, config, folder)."""
    ckpt = resolve(path)
    verify(ckpt)
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
