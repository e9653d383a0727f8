"""Process-group helpers for ``torchrun`` (env:// rendezvous; gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def init_distributed(device_type: str) -> bool:
    """Join the process group that ``torchrun`` describes in the environment; return whether one exists."""
    if is_dist():
        return True
    if not launched_by_torchrun():
        return False
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, init_method="env://", timeout=datetime.timedelta(minutes=30))
    log.info("joined process group: rank %d of %d (%s)", rank(), world_size(), backend)
    return True


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of floats over ranks (keys must match on every rank)."""
    if not is_dist() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= world_size()
    return dict(zip(keys, t.tolist()))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    if not is_dist():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def to_sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Every batch norm of ``model`` as a SyncBatchNorm (same parameters and buffers).

    timm's converter is used because torch's turns timm's fused ``BatchNormAct2d`` into a plain SyncBatchNorm
    and silently drops the activation that layer applies (the MobileNetV3 backbones are full of them).
    """
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()
