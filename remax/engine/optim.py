"""Optimiser parameter groups and learning-rate schedules (SPEC §7, kmax-reference §5).

Weight decay follows the reference rules: none on normalisation layers, on any bias, on the k-means cluster
centres, on the axial relative-position tables and on layer scales. Backbone parameters train at
``lr × backbone_lr_multiplier``. The schedule is a linear warm-up multiplied by either a step decay (ReMaX:
×0.1 at 85 % and 95 % of training) or a poly decay (kMaX-DeepLab: power 0.9), both on the global step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from remax.config import TrainConfig

log = logging.getLogger(__name__)

# Module types whose affine parameters never get weight decay.
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1/2/3d, SyncBatchNorm, InstanceNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)
# Name fragments of parameters that never get weight decay.
_NO_DECAY_NAME_PARTS = ("cluster_centers", "rpe")
_NO_DECAY_LEAF_NAMES = ("bias", "gamma", "layer_scale")


@dataclass
class ParamInfo:
    """Why a parameter lands in its group (used by tests and ``describe_param_groups``)."""

    name: str
    weight_decay: bool
    backbone: bool


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or type(module).__name__.lower().endswith(("norm", "norm2d", "normact2d"))


def classify_parameters(model: nn.Module) -> list[ParamInfo]:
    """Decide weight decay and backbone membership for every trainable parameter of ``model``."""
    infos: list[ParamInfo] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        norm = _is_norm(module)
        for leaf, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{leaf}" if module_name else leaf
            name = name.removeprefix("module.")  # DDP wrapper
            no_decay = (
                norm
                or leaf in _NO_DECAY_LEAF_NAMES
                or leaf.endswith("_bias")
                or any(part in name for part in _NO_DECAY_NAME_PARTS)
            )
            backbone = name.startswith("backbone.") or ".backbone." in name
            infos.append(ParamInfo(name=name, weight_decay=not no_decay, backbone=backbone))
    return infos


def scaled_lr(cfg: TrainConfig) -> float:
    """The peak learning rate: ``lr`` is given at ``base_batch_size`` and scaled linearly to ``batch_size``."""
    return cfg.lr * cfg.batch_size / cfg.base_batch_size


def build_param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups: (decay / no decay) × (backbone / rest); empty groups are left out.

    Each group carries ``base_lr`` (its peak learning rate) and a ``name``; the schedule sets ``lr`` from
    ``base_lr``.
    """
    params = dict((n.removeprefix("module."), p) for n, p in model.named_parameters())
    peak = scaled_lr(cfg)
    groups: dict[tuple[bool, bool], dict[str, Any]] = {}
    for info in classify_parameters(model):
        key = (info.backbone, info.weight_decay)
        if key not in groups:
            lr = peak * (cfg.backbone_lr_multiplier if info.backbone else 1.0)
            groups[key] = {
                "name": f"{'backbone' if info.backbone else 'head'}_{'decay' if info.weight_decay else 'no_decay'}",
                "params": [],
                "param_names": [],
                "lr": lr,
                "base_lr": lr,
                "weight_decay": cfg.weight_decay if info.weight_decay else 0.0,
            }
        groups[key]["params"].append(params[info.name])
        groups[key]["param_names"].append(info.name)
    order = [(True, True), (True, False), (False, True), (False, False)]
    return [groups[k] for k in order if k in groups]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (or SGD, for experiments) over :func:`build_param_groups`."""
    groups = build_param_groups(model, cfg)
    for g in groups:
        log.debug("param group %s: %d tensors, lr %.3g, wd %.3g", g["name"], len(g["params"]), g["lr"],
                  g["weight_decay"])
    # Names are kept out of the optimiser so its state dict stays small and name-free.
    for g in groups:
        g.pop("param_names")
    name = cfg.optimizer.lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=scaled_lr(cfg), betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=scaled_lr(cfg), momentum=0.9, weight_decay=cfg.weight_decay)
    raise ValueError(f"train.optimizer: unknown optimizer {cfg.optimizer!r}; choose adamw or sgd")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak learning rate for the update made at ``step`` (0-based).

    Warm-up ramps linearly from ``warmup_factor`` to 1 over ``warmup_steps`` and multiplies the main schedule,
    which is computed on the global step (as in the reference, so poly has a small jump at the end of warm-up).
    """
    total = max(cfg.max_steps, 1)
    if cfg.schedule == "step":
        factor = 1.0
        for milestone in cfg.step_milestones:
            if step >= int(round(milestone * total)):
                factor *= 0.1
    elif cfg.schedule == "poly":
        factor = max(0.0, 1.0 - step / total) ** cfg.poly_power
    elif cfg.schedule == "constant":
        factor = 1.0
    elif cfg.schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    else:
        raise ValueError(f"train.schedule: unknown schedule {cfg.schedule!r}; choose step, poly, cosine or constant")
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        alpha = step / cfg.warmup_steps
        factor *= cfg.warmup_factor * (1.0 - alpha) + alpha
    return factor


class WarmupSchedule:
    """Sets every group's ``lr`` to ``base_lr × lr_factor(step)``; its state is just the step count.

    A plain object rather than a ``torch.optim.lr_scheduler`` so that its state dict holds only an int and loads
    under ``weights_only=True``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
        self.optimizer = optimizer
        self.cfg = cfg
        self.step_count = 0
        self._apply()

    def _apply(self) -> None:
        factor = lr_factor(self.step_count, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor

    def step(self) -> None:
        """Advance to the next optimiser step."""
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, int]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step_count = int(state["step_count"])
        self._apply()


def describe_param_groups(model: nn.Module, cfg: TrainConfig) -> str:
    """A short table of the groups (for logs and ``--verbose``)."""
    lines = []
    for g in build_param_groups(model, cfg):
        n = sum(p.numel() for p in g["params"])
        lines.append(f"{g['name']:<20} tensors {len(g['params']):>4}  params {n:>10,}  lr {g['lr']:.3g}  "
                     f"wd {g['weight_decay']:.3g}")
    return "\n".join(lines)
