"""The training loop on a toy model: exact resume, accumulation, signals, non-finite loss, records.

A tiny conv net with batch norm keeps these fast; the real stack is exercised in test_train_cli.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from remax.checkpoint import load_checkpoint
from remax.config import Config
from remax.engine.trainer import NonFiniteLossError, Trainer, TrainParts


class _Data:
    """Random images whose target is a fixed function of the image; augmentation noise from the global RNG."""

    def __init__(self, n: int = 6) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 8, 8, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i] + 0.1 * torch.randn(3, 8, 8)  # seeded per position by the trainer
        return x, x.mean(0, keepdim=True).tanh()


def _collate(items):
    return torch.stack([x for x, _ in items]), [y for _, y in items]


class _Net(nn.Module):
    def __init__(self, bn: bool = True) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4) if bn else nn.Identity(),
                                      nn.ReLU())
        self.head = nn.Conv2d(4, 1, 1)
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        return {"pred": self.head(self.drop(self.backbone(x)))}


def _criterion(outputs, targets):
    target = torch.stack(targets)
    mse = ((outputs["pred"] - target) ** 2).mean()
    l1 = (outputs["pred"] - target).abs().mean()
    return mse + 0.1 * l1, {"mse": mse.item(), "l1": l1.item()}


def _cfg(steps: int = 6, **train) -> Config:
    cfg = Config(preset="toy")
    t = cfg.train
    t.max_steps, t.batch_size, t.base_batch_size, t.lr, t.warmup_steps = steps, 2, 2, 0.01, 2
    t.checkpoint_every, t.log_every, t.eval_every, t.device, t.keep_checkpoints = 3, 1, 0, "cpu", 2
    cfg.data.num_workers = 0
    for k, v in train.items():
        setattr(t, k, v)
    return cfg


def _parts(criterion=_criterion, bn: bool = True, evaluate=None) -> TrainParts:
    torch.manual_seed(0)
    return TrainParts(model=_Net(bn), criterion=criterion, train_dataset=_Data(), collate_fn=_collate,
                      evaluate=evaluate)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_resume_from_periodic_checkpoint_is_bitwise_exact(tmp_path: Path) -> None:
    evals = []
    result = Trainer(_cfg(), tmp_path / "a", _parts(evaluate=lambda m, s: evals.append(s) or {}),
                     progress=False).run()
    assert result["status"] == "completed" and result["step"] == 6 and evals == [6]
    ckpts = sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("step_*.pt"))
    assert ckpts == ["step_000003.pt", "step_000006.pt"]
    # Resume a second run from the step-3 checkpoint of the first.
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "checkpoints" / "step_000003.pt", tmp_path / "b" / "checkpoints" / "last.pt")
    resumed = Trainer(_cfg(), tmp_path / "b", _parts(), resume=True, progress=False).run()
    assert resumed["start_step"] == 3 and resumed["step"] == 6
    a, b = _weights(tmp_path / "a/checkpoints/last.pt"), _weights(tmp_path / "b/checkpoints/last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # A different seed gives different weights (the comparison above is not vacuous).
    other = Trainer(_cfg(seed=1), tmp_path / "c", _parts(), progress=False).run()
    c = _weights(Path(other["checkpoint"]))
    assert not torch.equal(a["head.weight"], c["head.weight"])
    sa = load_checkpoint(tmp_path / "a/checkpoints/last.pt")
    assert sa["step"] == 6 and sa["scheduler"] == {"step_count": 6} and sa["config"]["train"]["max_steps"] == 6
    assert {"python", "numpy", "torch"} <= set(sa["rng"])


def test_gradient_accumulation_matches_full_batch(tmp_path: Path) -> None:
    # Without batch norm and dropout the loss is a mean over images, so 2 x 2 accumulation equals batch 4.
    def crit(outputs, targets):
        return _criterion(outputs, targets)

    full = Trainer(_cfg(steps=3, batch_size=4, base_batch_size=4), tmp_path / "full",
                   _parts(crit, bn=False), progress=False)
    full.model.drop.p = 0.0
    full.run()
    acc = Trainer(_cfg(steps=3, batch_size=4, base_batch_size=4, grad_accum_steps=2), tmp_path / "acc",
                  _parts(crit, bn=False), progress=False)
    acc.model.drop.p = 0.0
    acc.run()
    a, b = _weights(tmp_path / "full/checkpoints/last.pt"), _weights(tmp_path / "acc/checkpoints/last.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(a["head.weight"], _Net(False).head.weight.detach())


def test_metrics_and_curves_written(tmp_path: Path) -> None:
    evaluate = lambda m, s: {"pq": {"All": {"pq": 0.125, "sq": 0.7, "rq": 0.17, "n": 3},  # noqa: E731
                                    "Things": {"pq": 0.1, "sq": 1, "rq": 1, "n": 2},
                                    "Stuff": {"pq": 0.15, "sq": 1, "rq": 1, "n": 1}}, "miou": 0.4}
    Trainer(_cfg(steps=4, eval_every=2), tmp_path, _parts(evaluate=evaluate), progress=False).run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all({"loss", "lr", "images_per_s", "loss/mse", "loss/l1"} <= set(r) for r in train)
    r = train[0]
    assert r["loss"] == pytest.approx(r["loss/mse"] + 0.1 * r["loss/l1"], rel=1e-5)
    evals = [r for r in records if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4] and evals[0]["pq"] == 12.5 and evals[0]["pq_stuff"] == 15.0
    assert evals[0]["miou"] == pytest.approx(40.0)
    assert (tmp_path / "loss.png").stat().st_size > 1000 and (tmp_path / "pq.png").stat().st_size > 1000
    assert Config.from_yaml((tmp_path / "config.yaml").read_text()).train.max_steps == 4


def test_non_finite_loss_names_step_and_term(tmp_path: Path) -> None:
    calls = {"n": 0}

    def crit(outputs, targets):
        calls["n"] += 1
        loss, parts = _criterion(outputs, targets)
        if calls["n"] == 3:
            bad = loss * float("nan")
            return bad, {**parts, "mse": float("nan")}
        return loss, parts

    with pytest.raises(NonFiniteLossError, match=r"step 3 .*mse"):
        Trainer(_cfg(), tmp_path, _parts(crit), progress=False).run()


def test_sigterm_saves_and_stops(tmp_path: Path) -> None:
    calls = {"n": 0}

    def crit(outputs, targets):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return _criterion(outputs, targets)

    previous = signal.getsignal(signal.SIGTERM)
    result = Trainer(_cfg(steps=50, checkpoint_every=0), tmp_path, _parts(crit), progress=False).run()
    assert result["status"] == "interrupted" and result["signal"] == "SIGTERM" and result["step"] == 2
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored


def test_fp16_on_cpu_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        Trainer(_cfg(amp="fp16"), tmp_path, _parts(), progress=False)


def test_bf16_autocast_trains(tmp_path: Path) -> None:
    result = Trainer(_cfg(steps=2, amp="bf16"), tmp_path, _parts(), progress=False).run()
    assert result["status"] == "completed" and result["last_log"]["loss"] > 0


def test_global_batch_must_divide(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="divisible"):
        Trainer(_cfg(batch_size=3, grad_accum_steps=2), tmp_path, _parts(), progress=False)
