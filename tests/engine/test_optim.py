"""Parameter groups and learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from remax.config import TrainConfig, get_config
from remax.engine.optim import (WarmupSchedule, build_optimizer, build_param_groups, classify_parameters, lr_factor,
                                scaled_lr)


class _Toy(nn.Module):
    """Mimics the naming of the real model: backbone.*, cluster centres, rpe tables, layer scale."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1))
        self.decoder = nn.Module()
        self.decoder.cluster_centers = nn.Parameter(torch.zeros(8, 4))
        self.decoder.query_rpe = nn.Parameter(torch.zeros(9, 4))
        self.decoder.gamma = nn.Parameter(torch.ones(4))
        self.decoder.norm = nn.LayerNorm(4)
        self.decoder.gn = nn.GroupNorm(2, 4)
        self.decoder.proj = nn.Linear(4, 4)
        self.head = nn.Conv2d(4, 5, 1)


def test_classification_rules_on_toy() -> None:
    infos = {i.name: i for i in classify_parameters(_Toy())}
    decay = {n for n, i in infos.items() if i.weight_decay}
    assert decay == {"backbone.0.weight", "backbone.2.weight", "decoder.proj.weight", "head.weight"}
    backbone = {n for n, i in infos.items() if i.backbone}
    assert backbone == {"backbone.0.weight", "backbone.1.weight", "backbone.1.bias", "backbone.2.weight",
                        "backbone.2.bias"}


def test_groups_lr_and_wd() -> None:
    cfg = TrainConfig(lr=0.006, base_batch_size=64, batch_size=16, backbone_lr_multiplier=0.1, weight_decay=0.005)
    model = _Toy()
    groups = {g["name"]: g for g in build_param_groups(model, cfg)}
    assert set(groups) == {"backbone_decay", "backbone_no_decay", "head_decay", "head_no_decay"}
    peak = 0.006 * 16 / 64
    assert scaled_lr(cfg) == pytest.approx(peak)
    assert groups["backbone_decay"]["lr"] == pytest.approx(peak * 0.1)
    assert groups["head_decay"]["lr"] == pytest.approx(peak)
    assert groups["head_decay"]["weight_decay"] == 0.005
    assert groups["head_no_decay"]["weight_decay"] == 0.0
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0
    # Every parameter in exactly one group.
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())


def test_param_groups_on_nano_model() -> None:
    models = pytest.importorskip("remax.models")
    if not hasattr(models, "build_model"):
        pytest.skip("remax.models.build_model not available yet")
    cfg = get_config("nano")
    model = models.build_model(cfg.model, with_training_heads=True)
    infos = classify_parameters(model)
    names = {i.name: i for i in infos}
    assert len(names) == sum(1 for _ in model.parameters())
    from remax.models.layers import LayerNorm2d

    norm_params = set()
    for mname, module in model.named_modules():
        if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, LayerNorm2d)):
            norm_params |= {f"{mname}.{n}" for n, _ in module.named_parameters(recurse=False)}
    assert norm_params, "the nano model has normalisation layers"
    for name, info in names.items():
        no_decay_expected = (name in norm_params or name.endswith("bias") or "cluster_centers" in name
                             or "rpe" in name or name.endswith("gamma"))
        assert info.weight_decay == (not no_decay_expected), name
        assert info.backbone == name.startswith("backbone."), name
    assert any("cluster_centers" in n for n in names), "nano has cluster centres"
    assert any("rpe" in n for n in names), "nano has relative-position tables"
    assert any(i.backbone for i in infos) and any(not i.backbone for i in infos)
    # Conv/linear kernels get decay, in and out of the backbone.
    assert any(i.weight_decay and i.backbone for i in infos)
    assert any(i.weight_decay and not i.backbone for i in infos)
    opt = build_optimizer(model, cfg.train)
    by_name = {g["name"]: g for g in opt.param_groups}
    peak = scaled_lr(cfg.train)
    assert by_name["backbone_decay"]["base_lr"] == pytest.approx(peak * cfg.train.backbone_lr_multiplier)
    assert by_name["head_no_decay"]["weight_decay"] == 0.0


def _cfg(**kw) -> TrainConfig:
    base = dict(max_steps=1000, warmup_steps=0, schedule="step", step_milestones=(0.85, 0.95))
    base.update(kw)
    return TrainConfig(**base)


def test_step_schedule_milestones() -> None:
    cfg = _cfg()
    assert lr_factor(0, cfg) == 1.0
    assert lr_factor(849, cfg) == 1.0
    assert lr_factor(850, cfg) == pytest.approx(0.1)
    assert lr_factor(949, cfg) == pytest.approx(0.1)
    assert lr_factor(950, cfg) == pytest.approx(0.01)
    assert lr_factor(999, cfg) == pytest.approx(0.01)


def test_poly_schedule() -> None:
    cfg = _cfg(schedule="poly", poly_power=0.9)
    assert lr_factor(0, cfg) == 1.0
    assert lr_factor(500, cfg) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(900, cfg) == pytest.approx(0.1 ** 0.9)
    assert lr_factor(1000, cfg) == 0.0


def test_warmup_values() -> None:
    cfg = _cfg(schedule="poly", warmup_steps=100, warmup_factor=0.001)
    # Linear from 0.001 to 1, multiplied by the poly factor of the global step.
    assert lr_factor(0, cfg) == pytest.approx(0.001)
    assert lr_factor(50, cfg) == pytest.approx((0.001 * 0.5 + 0.5) * (1 - 50 / 1000) ** 0.9)
    assert lr_factor(100, cfg) == pytest.approx((1 - 100 / 1000) ** 0.9)
    step_cfg = _cfg(warmup_steps=10, warmup_factor=0.0)
    assert [lr_factor(s, step_cfg) for s in (0, 5, 10)] == pytest.approx([0.0, 0.5, 1.0])


def test_schedule_object_sets_group_lrs_and_round_trips() -> None:
    cfg = _cfg(max_steps=20, warmup_steps=4, warmup_factor=0.0, lr=0.01, batch_size=8, base_batch_size=8)
    model = _Toy()
    opt = build_optimizer(model, cfg)
    sched = WarmupSchedule(opt, cfg)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[-1]["lr"])
        sched.step()
    expected = [0.01 * lr_factor(s, cfg) for s in range(20)]
    assert seen == pytest.approx(expected)
    assert seen[:5] == pytest.approx([0.0, 0.0025, 0.005, 0.0075, 0.01])
    assert seen[17] == pytest.approx(0.001) and seen[19] == pytest.approx(0.0001)  # 85 % of 20 = 17, 95 % = 19
    backbone = next(g for g in opt.param_groups if g["name"] == "backbone_decay")
    assert backbone["lr"] == pytest.approx(0.1 * opt.param_groups[-1]["lr"])
    other = WarmupSchedule(build_optimizer(_Toy(), cfg), cfg)
    other.load_state_dict(sched.state_dict())
    assert other.get_last_lr() == pytest.approx(sched.get_last_lr())


def test_recipes_from_presets() -> None:
    remax = get_config("remax_m")
    assert (remax.train.schedule, remax.train.lr, remax.train.weight_decay) == ("step", 0.006, 0.005)
    assert remax.train.step_milestones == (0.85, 0.95) and remax.train.base_batch_size == 64
    base = get_config("kmax_r50", baseline=True)
    assert (base.train.schedule, base.train.lr, base.train.weight_decay, base.train.poly_power) == \
        ("poly", 5e-4, 0.05, 0.9)
    assert not base.remax.enabled
    assert math.isclose(scaled_lr(remax.train), 0.006 * remax.train.batch_size / 64)
