"""Parallelism beside the trainer (torchtitan's parallelize.py): device choice, DDP or FSDP2 around the
single-device model, torch.compile, gradient-sync control and the collective state dicts.

The model knows nothing of this module; the trainer calls it. The only model structure it uses is
`model.layers`, the unit FSDP2 shards one by one.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import RunConfig
from .errors import ConfigError, DualPathError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device_type: str) -> Dist:
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return Dist()
    import torch.distributed as dist

    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(name: str, d: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DualPathError("train.device=cuda but no CUDA device is available")
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def wrap_model(model: nn.Module, cfg: RunConfig, device: torch.device, d: Dist, compile: bool = False) -> nn.Module:
    """DDP or FSDP2 around the single-device model, then torch.compile."""
    if d.enabled and cfg.train.fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard
        for layer in model.layers:  # the sharding unit: one layer (torchtitan's per-block wrapping)
            fully_shard(layer)
        fully_shard(model)
    elif d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=_has_unused_params(model, device))
    if compile:
        model = torch.compile(model)
    return model


# train.compile=auto compiles a run whose eager training would take at least this long at a nominal rate:
# compiling costs about a minute on CPU and saves 5-15% of each step (docs/BENCHMARKS.md), so shorter runs
# (tests, the demo) lose time to it. Nominal sustained rates (FLOP/s; per thread on CPU: half of the one-thread
# fp32 GEMM peak measured here), not a measured one, so a resumed run with the same threads decides the same.
COMPILE_AUTO_SECONDS = 1800
NOMINAL_RATE = {"cpu": 4.5e10, "cuda": 3e14}


def compiler_missing(device: torch.device) -> str | None:
    """Why torch.compile's default backend cannot build kernels for `device` here (None: it can)."""
    try:
        if device.type == "cuda":
            from torch.utils._triton import has_triton

            return None if has_triton() else "Triton is not installed"
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except (ImportError, AttributeError):  # another torch version: let torch.compile decide
        return None
    except Exception as e:  # inductor's InvalidCxxCompiler
        return f"no working C++ compiler ({type(e).__name__})"
    return None


def use_compile(setting: bool | str, train_flops: float, device: torch.device) -> tuple[bool, str]:
    """(compile or not, why) for train.compile=setting and train_flops true training FLOPs per process.
    ConfigError when compiling is asked for explicitly and cannot work here. Every process of a torchrun job
    decides for itself: its nodes need the same toolchain."""
    if setting is True:
        if missing := compiler_missing(device):
            raise ConfigError(f"train.compile=true, but torch.compile cannot build kernels here: {missing}; "
                              "set train.compile=false or auto")
        return True, "train.compile=true"
    if setting is False:
        return False, "train.compile=false"
    rate = NOMINAL_RATE["cuda"] if device.type == "cuda" else NOMINAL_RATE["cpu"] * torch.get_num_threads()
    minutes = train_flops / rate / 60
    if minutes < COMPILE_AUTO_SECONDS / 60:
        return False, f"auto: about {math.floor(minutes)} min of eager training, under {COMPILE_AUTO_SECONDS // 60} min"
    if missing := compiler_missing(device):  # only here: the check imports much of inductor (about 1.5 s)
        return False, f"auto: {missing}"
    return True, f"auto: about {math.floor(minutes)} min of eager training"


def _has_unused_params(model: nn.Module, device: torch.device) -> bool:
    """One tiny forward/backward tells DDP whether some parameters never get a gradient (e.g. K=1 routers)."""
    idx = torch.zeros(1, 4, dtype=torch.long, device=device)
    rng = torch.get_rng_state()  # a routing policy may draw random numbers; the run must not notice
    model(idx, idx).loss.backward()
    torch.set_rng_state(rng)
    unused = any(p.requires_grad and p.grad is None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    return unused


def sync_context(model: nn.Module, last_micro: bool, d: Dist):
    """Skip gradient sync on non-final micro-steps."""
    if not d.enabled:
        return contextlib.nullcontext()
    inner = getattr(model, "_orig_mod", model)
    if hasattr(inner, "no_sync") and not last_micro:
        return inner.no_sync()
    if hasattr(inner, "set_requires_gradient_sync"):  # FSDP2
        inner.set_requires_gradient_sync(last_micro)
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def sharded(cfg: RunConfig) -> bool:
    return cfg.train.fsdp and torch.distributed.is_available() and torch.distributed.is_initialized()


def full_state_dict(model: nn.Module, cfg: RunConfig) -> dict:
    """The whole model's weights on CPU (a collective under FSDP2: every rank must call it)."""
    if sharded(cfg):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict()


def optimizer_state_dict(model: nn.Module, optimizer, cfg: RunConfig) -> dict:
    if sharded(cfg):  # keyed by parameter names, gathered from the shards
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(unwrap(model), optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state_dict(model: nn.Module, optimizer, state: dict, cfg: RunConfig) -> None:
    if sharded(cfg):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(unwrap(model), optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
