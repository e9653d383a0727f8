"""DDP with 2 gloo processes on the CPU: averaged gradients, reduced metrics, only rank 0 writing.

Two ranks with ``W = 2`` micro-batches of one global batch must follow the same trajectory as one process that
accumulates the same two micro-batches (the trainer seeds data and model randomness per global micro-batch, so
even dropout masks agree). SGD is used where the gradient scale matters: AdamW is nearly invariant to it and
would not notice gradients that are summed over ranks instead of averaged.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from engine_helpers import TINY, env, make_synthetic
from remax.checkpoint import load_checkpoint
from remax.config import Config
from remax.engine import distributed as dist_utils
from remax.engine.trainer import Trainer, TrainParts

WORLD = 2
STEPS = 4


class _Data:
    """Random 8×8 images whose target is a fixed function of the image, plus per-position noise."""

    def __init__(self, n: int = 10) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 8, 8, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i] + 0.1 * torch.randn(3, 8, 8)
        return x, x.mean(0, keepdim=True).tanh()


def _collate(items):
    return torch.stack([x for x, _ in items]), [y for _, y in items]


class _Net(nn.Module):
    def __init__(self, bn: bool, dropout: float) -> None:
        # No conv bias before batch norm: its gradient is rounding noise, which AdamW would blow up to ±lr.
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=not bn), nn.BatchNorm2d(6) if bn else nn.Identity(),
                                      nn.ReLU())
        self.drop = nn.Dropout(dropout)
        self.head = nn.Conv2d(6, 1, 1)

    def forward(self, x):
        return {"pred": self.head(self.drop(self.backbone(x)))}


class _Criterion:
    """Mean squared error over the micro-batch; remembers every loss it computed (per rank)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def __call__(self, outputs, targets):
        target = torch.stack(targets)
        loss = ((outputs["pred"] - target) ** 2).mean()
        l1 = (outputs["pred"] - target).abs().mean()
        self.losses.append(loss.item())
        return loss, {"mse": loss.item(), "l1": l1.item()}


# name -> (net options, train options); each scenario runs on 2 ranks and on 1 rank with 2 accumulation steps.
SCENARIOS: dict[str, tuple[dict, dict]] = {
    "sgd_dropout": (dict(bn=False, dropout=0.3), dict(optimizer="sgd", lr=0.05, weight_decay=1e-3)),
    "adamw_bn": (dict(bn=True, dropout=0.0), dict(optimizer="adamw", lr=0.01)),
}


def _cfg(**train) -> Config:
    cfg = Config(preset="toy")
    t = cfg.train
    t.max_steps, t.batch_size, t.base_batch_size, t.warmup_steps = STEPS, 4, 4, 2
    t.checkpoint_every, t.log_every, t.eval_every, t.device, t.keep_checkpoints = 2, 1, 2, "cpu", 2
    cfg.data.num_workers = 0
    for k, v in train.items():
        setattr(t, k, v)
    return cfg


def _parts(net: dict, criterion: _Criterion, evaluate=None) -> TrainParts:
    torch.manual_seed(0)  # identical initial weights on every rank and in the reference run
    return TrainParts(model=_Net(**net), criterion=criterion, train_dataset=_Data(), collate_fn=_collate,
                      evaluate=evaluate)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, root: str) -> None:
    """One rank: join the group the way ``torchrun`` describes it, run every scenario, report to ``root``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    out = Path(root)
    try:
        for name, (net, train) in SCENARIOS.items():
            criterion = _Criterion()
            eval_calls: list[int] = []

            def evaluate(model, step, calls=eval_calls):
                calls.append(step)
                return {"miou": 0.5}

            # Rank 1 gets a folder of its own: it must stay absent.
            run_dir = out / name / ("run" if rank == 0 else "run_rank1")
            trainer = Trainer(_cfg(**train), run_dir, _parts(net, criterion, evaluate), progress=False)
            result = trainer.run()
            torch.save({"world": trainer.world, "losses": criterion.losses, "eval_calls": eval_calls,
                        "eval": result["eval"], "status": result["status"],
                        "model": {k: v.clone() for k, v in trainer.unwrapped.state_dict().items()}},
                       out / f"{name}_rank{rank}.pt")
        # One image per rank and per forward pass: batch norm without SyncBatchNorm (CPU) must be refused.
        try:
            Trainer(_cfg(batch_size=2, base_batch_size=2), out / "refused", _parts(dict(bn=True, dropout=0.0),
                                                                                 _Criterion()), progress=False)
            refused = ""
        except ValueError as exc:
            refused = str(exc)
        torch.save({"refused": refused}, out / f"refused_rank{rank}.pt")
    finally:
        dist_utils.cleanup()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(root)), nprocs=WORLD, join=True)
    return root


def _reference(name: str, tmp_path: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The same scenario in this process: one rank, the two micro-batches accumulated."""
    net, train = SCENARIOS[name]
    assert not dist.is_initialized()
    trainer = Trainer(_cfg(grad_accum_steps=WORLD, **train), tmp_path / name, _parts(net, _Criterion()),
                      progress=False)
    trainer.run()
    assert trainer.world == 1 and trainer.micro_batch == 2
    records = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return trainer.unwrapped.state_dict(), records


def _params(net: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = {n for n, _ in _Net(**net).named_parameters()}
    return {k: v for k, v in state.items() if k in names}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_match_one_process_with_the_same_global_batch(ddp_runs: Path, tmp_path: Path, name: str) -> None:
    net, _ = SCENARIOS[name]
    r0, r1 = (torch.load(ddp_runs / f"{name}_rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert r0["world"] == r1["world"] == WORLD and r0["status"] == r1["status"] == "completed"
    ckpt = load_checkpoint(ddp_runs / name / "run" / "checkpoints" / "last.pt")
    assert ckpt["world_size"] == WORLD and ckpt["step"] == STEPS
    ref, _ = _reference(name, tmp_path)
    p_ddp, p_ref = _params(net, ckpt["model"]), _params(net, ref)
    assert p_ddp.keys() == p_ref.keys() and len(p_ddp) >= 3
    torch.manual_seed(0)
    init = _params(net, _Net(**net).state_dict())
    for k in p_ref:
        torch.testing.assert_close(p_ddp[k], p_ref[k], rtol=1e-5, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
        # Averaged gradients keep the replicas identical, and training moved them.
        assert torch.equal(r0["model"][k], r1["model"][k]), k
        assert not torch.allclose(p_ref[k], init[k], atol=1e-4), k


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_metrics_are_reduced_over_ranks(ddp_runs: Path, tmp_path: Path, name: str) -> None:
    r0, r1 = (torch.load(ddp_runs / f"{name}_rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert len(r0["losses"]) == len(r1["losses"]) == STEPS
    records = [json.loads(x) for x in (ddp_runs / name / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for r, a, b in zip(train, r0["losses"], r1["losses"]):
        assert r["loss"] == pytest.approx((a + b) / 2, rel=1e-9)
        assert abs(a - b) > 1e-4 * abs(a)  # the ranks saw different images, so the mean is not either one
    # The single-process reference logs the mean over its two accumulated micro-batches: the same numbers.
    _, ref_records = _reference(name, tmp_path)
    ref_train = [r for r in ref_records if r["kind"] == "train"]
    for r, q in zip(train, ref_train):
        for key in ("loss", "loss/mse", "loss/l1"):
            assert r[key] == pytest.approx(q[key], rel=1e-5), (r["step"], key)
    assert all(r["images_per_s"] > 0 for r in train)


def test_only_rank_zero_writes_and_evaluates(ddp_runs: Path) -> None:
    for name in SCENARIOS:
        r0, r1 = (torch.load(ddp_runs / f"{name}_rank{r}.pt", weights_only=True) for r in range(WORLD))
        assert r0["eval_calls"] == [2, 4] and r1["eval_calls"] == []
        assert r0["eval"] == {"miou": 0.5} and r1["eval"] is None
        assert not (ddp_runs / name / "run_rank1").exists()
        run = ddp_runs / name / "run"
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt", "step_000002.pt",
                                                                            "step_000004.pt"]
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [(r["kind"], r["step"]) for r in records if r["kind"] == "eval"] == [("eval", 2), ("eval", 4)]
        assert {"config.yaml", "loss.png", "pq.png"} <= {p.name for p in run.iterdir()}


def test_batch_norm_without_sync_needs_two_images_per_rank(ddp_runs: Path) -> None:
    for r in range(WORLD):
        msg = torch.load(ddp_runs / f"refused_rank{r}.pt", weights_only=True)["refused"]
        assert "gives 1 image per forward pass (2 ranks × 1 accumulation steps)" in msg
    assert not (ddp_runs / "refused").exists()


def test_sync_batchnorm_conversion_keeps_fused_activations() -> None:
    """The nano model computes the same function after the SyncBatchNorm conversion (no group: plain BN maths)."""
    from remax.config import get_config
    from remax.models import build_model

    cfg = get_config("nano")
    cfg.model.input_size = (65, 65)
    torch.manual_seed(0)
    model = build_model(cfg.model, with_training_heads=False).train()
    x = torch.randn(2, 3, 65, 65)
    with torch.no_grad():
        torch.manual_seed(1)
        before = model(x)
        synced = dist_utils.to_sync_batchnorm(model)
        torch.manual_seed(1)
        after = synced(x)
    kinds = {type(m).__name__ for m in synced.modules()}
    assert "SyncBatchNormAct" in kinds and "SyncBatchNorm" in kinds
    assert not any(type(m).__name__.startswith("BatchNorm") for m in synced.modules())
    for k in ("pred_logits", "pred_masks", "pixel_embeddings"):
        torch.testing.assert_close(after[k], before[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # torch's own converter drops those activations: the check above would catch that.
    torch.manual_seed(0)
    plain = nn.SyncBatchNorm.convert_sync_batchnorm(build_model(cfg.model, with_training_heads=False).train())
    with torch.no_grad():
        torch.manual_seed(1)
        dropped = plain(x)
    assert not torch.allclose(dropped["pred_masks"], before["pred_masks"], atol=1e-3)


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           "-m", "remax", *args]
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=300)


def test_torchrun_remax_train_smoke(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 -m remax train`` on the real stack: nano at 65×65, 2 steps, 2 images a rank."""
    data = make_synthetic(tmp_path / "synthetic")
    batch = ["--set", "train.batch_size=4", "--set", "train.base_batch_size=4", "--max-steps", "2"]
    out = tmp_path / "ddp"
    res = _torchrun("train", "--data", str(data), "--out", str(out), "--no-progress", *TINY, *batch, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.count("validation panoptic quality") == 1  # printed by rank 0 only
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["world_size"] == WORLD and state["step"] == 2
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("train", 2), ("eval", 2)]
    assert {"config.yaml", "loss.png", "pq.png", "val_overlays"} <= {p.name for p in out.iterdir()}

    # One process accumulating the same two micro-batches of 2 images reaches the same parameters and logs the
    # same (rank-averaged) losses; batch-norm running statistics are per rank on the CPU and are not compared.
    ref = tmp_path / "single"
    single = subprocess.run([sys.executable, "-m", "remax", "train", "--data", str(data), "--out", str(ref),
                             "--no-progress", *TINY, *batch, "--set", "train.grad_accum_steps=2"],
                            cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-4000:]
    ref_state = load_checkpoint(ref / "checkpoints" / "last.pt")
    assert ref_state["world_size"] == 1
    from remax.config import Config
    from remax.engine.trainer import seed_everything
    from remax.models import build_model

    seed_everything(0)  # the initial weights, as build_parts makes them
    model = build_model(Config.from_dict(state["config"]).model, with_training_heads=True)
    init = model.state_dict()
    params = {n for n, _ in model.named_parameters()}
    assert params and params <= set(state["model"])
    for k in sorted(params):
        torch.testing.assert_close(state["model"][k], ref_state["model"][k], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, k=k: f"{k}: {m}")
    moved = sum(not torch.equal(state["model"][k], init[k]) for k in params)
    assert moved > 0.9 * len(params)
    ref_records = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    for r, q in zip(records[:2], ref_records[:2]):
        assert r["loss"] == pytest.approx(q["loss"], rel=1e-4)
