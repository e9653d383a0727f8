"""`remax models`: measured parameters and MACs (summarize_presets, format_model_table, the CLI JSON)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from remax.cli import main
from remax.models import build_model
from remax.models.summary import format_model_table, measure_macs, summarize_presets


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_measure_macs_hand_case() -> None:
    # 3×3 conv 3->8 on 9×11 (padding 1): 8·9·11·27 MACs; then 1×1 conv 8->4: 4·9·11·8 MACs. Biases are free.
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 4, 1))
    assert measure_macs(model, (9, 11)) == 8 * 9 * 11 * 27 + 4 * 9 * 11 * 8
    assert model.training and all(p.requires_grad for p in model.parameters())  # state restored


def test_meta_and_real_mac_counts_agree() -> None:
    torch.manual_seed(0)
    real = build_model("nano", input_size=(65, 65))
    with torch.device("meta"):
        meta = build_model("nano", input_size=(65, 65))
    assert measure_macs(meta, device="meta") == measure_macs(real)


def test_summarize_nano_counts_the_real_model() -> None:
    (row,) = summarize_presets(["nano"])
    torch.manual_seed(0)
    model = build_model("nano")
    assert row["name"] == "nano" and row["backbone"] == model.cfg.backbone
    assert row["input_size"] == list(model.cfg.input_size)
    assert row["pixel_decoder_layers"] == list(model.cfg.pixel_decoder_layers)
    assert row["transformer_decoder_layers"] == list(model.cfg.transformer_decoder_layers)
    assert row["num_queries"] == model.cfg.num_queries and row["num_classes"] == model.cfg.num_classes
    assert row["params"] == _params(model)
    assert row["params_train"] == _params(build_model("nano", with_training_heads=True)) > row["params"]
    assert row["macs"] == measure_macs(model)


def test_summarize_without_macs_and_unknown_presets() -> None:
    rows = summarize_presets(["remax_t", "nano"], count_macs=False)
    assert [r["name"] for r in rows] == ["remax_t", "nano"]
    assert all(r["macs"] is None for r in rows)
    assert abs(rows[0]["params"] / 18.6e6 - 1) < 0.03
    with pytest.raises(ValueError, match="unknown preset.*nope"):
        summarize_presets(["nope"], count_macs=False)


def test_format_model_table() -> None:
    rows = [dict(name="a", backbone="resnet50", input_size=[641, 641], pixel_decoder_layers=[1, 5, 1, 1],
                 transformer_decoder_layers=[2, 2, 2], num_queries=128, num_classes=133, params=56_580_120,
                 params_train=81_498_513, macs=292_049_679_808),
            dict(name="nano", backbone="mobilenetv3_small_050", input_size=[257, 257],
                 pixel_decoder_layers=[1, 1, 1, 1], transformer_decoder_layers=[1, 1, 1], num_queries=32,
                 num_classes=9, params=919_592, params_train=1_918_212, macs=None)]
    lines = format_model_table(rows).splitlines()
    assert len(lines) == 4 and set(lines[1]) <= {"-", " "}
    assert lines[0].split()[:2] == ["preset", "backbone"]
    first, second = lines[2].split(), lines[3].split()
    assert first == ["a", "resnet50", "641×641", "[1,5,1,1]", "[2,2,2]", "128", "133", "56.58", "81.50", "292.05"]
    assert second[-3:] == ["0.92", "1.92", "-"]
    # Right-aligned numbers: every row ends at the same column.
    assert len(lines[2]) == len(lines[3]) == len(lines[0])


def test_cli_models_json(capsys) -> None:
    assert main(["models", "--preset", "nano", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert isinstance(rows, list) and len(rows) == 1
    row = rows[0]
    assert {"name", "params", "macs", "input_size"} <= set(row)
    assert row["name"] == "nano" and row["input_size"] == [257, 257]
    assert row["params"] == _params(build_model("nano"))
    assert isinstance(row["macs"], int) and row["macs"] > 0


def test_cli_models_table(capsys) -> None:
    assert main(["models", "--preset", "nano", "--preset", "remax_t", "--no-macs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[2:]] == ["nano", "remax_t"]
