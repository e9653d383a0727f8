"""Measured size of the model presets: parameters and multiply-accumulates (MACs), behind ``remax models``.

Nothing here is typed in: parameters are counted on the built modules and MACs are measured with
``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products, as fvcore and the papers count
them; MACs = FLOPs / 2) over one eval-mode forward pass at the preset's input size, batch 1. The models are
built on the ``meta`` device, so even ConvNeXt-L at 1281×1281 takes about a second and no real memory; if a
torch version cannot run the forward on ``meta``, a real fp32 CPU forward is used instead.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from remax.config import list_presets, model_config
from remax.models.kmax_deeplab import KMaXDeepLab

log = logging.getLogger(__name__)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())


def measure_macs(model: nn.Module, input_size: tuple[int, int] | None = None, *,
                 device: torch.device | str | None = None) -> int:
    """Multiply-accumulates of one eval-mode forward pass of ``model`` on a 1×3×H×W zero input (FLOPs / 2).

    ``input_size`` defaults to ``model.cfg.input_size`` (a :class:`KMaXDeepLab`); ``device`` defaults to the
    model's device. The model's train/eval mode and ``requires_grad`` flags are restored afterwards.
    """
    h, w = input_size or tuple(model.cfg.input_size)
    if device is None:
        device = next(model.parameters()).device
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval().requires_grad_(False)  # FlopCounterMode's module tracker needs no grad-requiring inputs
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            model(torch.zeros(1, 3, h, w, device=device))
        flops = counter.get_total_flops()
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return int(flops) // 2


def _build(preset: str, with_training_heads: bool, device: str) -> KMaXDeepLab:
    cfg = model_config(preset, backbone_pretrained=False)
    with torch.device(device):
        return KMaXDeepLab(cfg, with_training_heads=with_training_heads)


def _measure_macs(preset: str) -> int:
    try:
        return measure_macs(_build(preset, False, "meta"), device="meta")
    except (NotImplementedError, RuntimeError) as err:  # an op without a meta kernel in this torch version
        log.warning("meta-device MAC count of %s failed (%s); counting on a real CPU forward", preset, err)
        with torch.no_grad():
            return measure_macs(_build(preset, False, "cpu"), device="cpu")


def summarize_presets(presets: list[str] | None = None, count_macs: bool = True) -> list[dict[str, Any]]:
    """One row per preset: architecture, inference and training parameter counts, and measured MACs.

    ``params`` counts the inference model (no training-only heads), ``params_train`` the model built with the
    heads its config asks for; ``macs`` is ``None`` when ``count_macs`` is false.
    """
    names = list(presets) if presets else list_presets()
    unknown = [n for n in names if n not in list_presets()]
    if unknown:
        raise ValueError(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(list_presets())}")
    rows = []
    for name in names:
        model = _build(name, True, "meta")
        params_train = count_parameters(model)
        params = count_parameters(model.drop_training_heads())
        cfg = model.cfg
        rows.append({
            "name": name,
            "backbone": cfg.backbone,
            "input_size": [int(cfg.input_size[0]), int(cfg.input_size[1])],
            "pixel_decoder_layers": list(cfg.pixel_decoder_layers),
            "transformer_decoder_layers": list(cfg.transformer_decoder_layers),
            "num_queries": cfg.num_queries,
            "num_classes": cfg.num_classes,
            "params": params,
            "params_train": params_train,
            "macs": _measure_macs(name) if count_macs else None,
        })
    return rows


def format_model_table(rows: list[dict[str, Any]]) -> str:
    """An aligned text table of :func:`summarize_presets` rows (parameters in M, MACs in G)."""
    header = ["preset", "backbone", "input", "pixel dec.", "trans. dec.", "queries", "classes", "params (M)",
              "train params (M)", "MACs (G)"]
    lines = [header]
    for r in rows:
        lines.append([
            r["name"], r["backbone"], "×".join(str(s) for s in r["input_size"]),
            "[" + ",".join(str(n) for n in r["pixel_decoder_layers"]) + "]",
            "[" + ",".join(str(n) for n in r["transformer_decoder_layers"]) + "]",
            str(r["num_queries"]), str(r["num_classes"]), f"{r['params'] / 1e6:.2f}",
            f"{r['params_train'] / 1e6:.2f}", "-" if r["macs"] is None else f"{r['macs'] / 1e9:.2f}",
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    numeric = set(range(5, len(header)))
    out = []
    for k, line in enumerate(lines):
        cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
        out.append("  ".join(cells).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
