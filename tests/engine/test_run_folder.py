"""The run folder under faults: a second writer, stale locks, unwritable outputs, write failures, signals after
the step loop, and metrics rows that match the checkpoint. Real subprocesses wherever a process boundary matters."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine_helpers import TINY, env, make_synthetic, remax_cmd, run_remax
from remax.checkpoint import CheckpointWriteError, load_checkpoint, save_checkpoint
from remax.cli import main
from remax.config import get_config
from remax.engine.metrics import MetricsWriter, read_metrics
from remax.engine.run_folder import LOCK_NAME, RunLock, lock_holder


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    # 24 validation images: the final evaluation lasts long enough to be interrupted.
    return make_synthetic(tmp_path_factory.mktemp("data") / "synthetic", num_train=4, num_val=24)


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--no-progress", *TINY, *extra]


@pytest.fixture(scope="module")
def finished_run(synth: Path, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("finished")
    res = run_remax(*_args(synth, base / "run", "--max-steps", "2"), cwd=base)
    assert res.returncode == 0, res.stderr[-3000:]
    return base / "run"


def _errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("remax: error:")]


def _hold_lock(run: Path) -> subprocess.Popen:
    """Another process that holds ``run``'s lock until it is killed."""
    code = ("import sys, time\nfrom remax.engine.run_folder import RunLock\nRunLock(sys.argv[1]).acquire()\n"
            "print('locked', flush=True)\ntime.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], env=env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_naming_the_holder_and_a_killed_holder_leaves_no_lock(tmp_path: Path,
                                                                                        capsys) -> None:
    run = tmp_path / "runs" / "twin"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"placeholder")
    (run / "config.yaml").write_text(get_config("nano").to_yaml())
    holder = _hold_lock(run)
    try:
        assert lock_holder(run) == holder.pid
        # A second `remax train` process into the same folder.
        res = run_remax("train", "--data", str(tmp_path / "none"), "--out", str(run), "--max-steps", "1",
                        "--no-progress", cwd=tmp_path)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
        errors = _errors(res.stderr)
        assert len(errors) == 1 and f"in use by PID {holder.pid}" in errors[0], res.stderr[-3000:]
        # --resume, with and without --out: never attaches to a folder another process writes.
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            for extra in (["--resume"], ["--resume", "--out", str(run)]):
                assert main(["train", "--no-progress", *extra]) == 2
                err = capsys.readouterr().err.strip().splitlines()
                assert len(err) == 1 and f"PID {holder.pid}" in err[0], (extra, err)
        finally:
            os.chdir(cwd)
    finally:
        holder.kill()
        holder.wait(timeout=60)
    # The killed holder's lock file remains, with its PID, but the kernel released the lock.
    assert (run / LOCK_NAME).read_text().split()[0] == str(holder.pid)
    assert lock_holder(run) is None
    with RunLock(run):
        assert (run / LOCK_NAME).read_text().split()[0] == str(os.getpid())


def test_refused_run_leaves_no_folder_and_output_problems_are_one_line(tmp_path: Path, capsys) -> None:
    fresh = tmp_path / "fresh"
    assert main(["train", "--data", str(tmp_path / "none"), "--out", str(fresh), "--max-steps", "1",
                 "--no-progress"]) == 2
    assert "not found" in capsys.readouterr().err
    assert not fresh.exists()  # the data check failed: no empty run folder is left behind

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        ["train", "--data", str(tmp_path / "none"), "--out", str(a_file)],
        ["train", "--data", str(tmp_path / "none"), "--out", str(a_file / "sub")],
        ["predict", str(a_file), "--checkpoint", str(tmp_path / "none.pt"), "--out", str(a_file)],
        ["eval", "--gt", str(tmp_path), "--pred-json", str(a_file), "--json", str(tmp_path)],
    ]
    for args in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("remax: error:") and str(a_file if "eval" != args[0]
                                                                            else tmp_path) in err[0], (args, err)
        assert "is a file" in err[0] or "is a folder" in err[0], err


def test_read_only_output_folder_is_refused_before_work(tmp_path: Path, monkeypatch, capsys) -> None:
    ro = tmp_path / "ro"
    (ro / "out").mkdir(parents=True)
    ro.chmod(0o555)
    (ro / "out").chmod(0o555)
    if os.geteuid() == 0:  # root writes into read-only folders: fail the write the way the kernel would
        real = Path.write_bytes

        def read_only(self: Path, data: bytes) -> int:
            if ro in self.parents:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, data)

        monkeypatch.setattr(Path, "write_bytes", read_only)
    try:
        (tmp_path / "i.png").write_bytes(b"")
        for args in (["predict", str(tmp_path / "i.png"), "--checkpoint", str(tmp_path / "none.pt"),
                      "--out", str(ro / "out")],
                     ["train", "--data", str(tmp_path / "none"), "--out", str(ro / "out")]):
            assert main(args) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and str(ro / "out") in err[0] and "Permission denied" in err[0], err
    finally:
        (ro / "out").chmod(0o755)
        ro.chmod(0o755)


def test_failed_checkpoint_write_names_the_file_and_keeps_the_previous(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "step": 1})

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1472 vs 1360")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "step": 2})
    monkeypatch.undo()
    message = str(info.value)
    assert str(path) in message and "disk full" in message and "previous checkpoint" in message
    assert "\n" not in message and "enforce" not in message
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left


def test_checkpoint_mode_follows_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        assert (save_checkpoint(tmp_path / "a.pt", {"model": {}}).stat().st_mode & 0o777) == 0o644
        os.umask(0o027)
        assert (save_checkpoint(tmp_path / "b.pt", {"model": {}}).stat().st_mode & 0o777) == 0o640
    finally:
        os.umask(old)


def test_full_disk_during_training_is_one_line_and_keeps_the_last_checkpoint(finished_run: Path,
                                                                               tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    last = run / "checkpoints" / "last.pt"
    limit = last.stat().st_size // 2  # every small file fits, a checkpoint does not

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    res = subprocess.run(remax_cmd("train", "--resume", "--out", str(run), "--max-steps", "3", "--no-progress"),
                         cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300,
                         preexec_fn=limit_file_size)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = _errors(res.stderr)
    assert len(errors) == 1 and f"cannot write checkpoint {last}" in errors[0], res.stderr[-3000:]
    assert load_checkpoint(last)["step"] == 2
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_resuming_a_finished_run_removes_orphans_and_repeats_no_rows(finished_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    orphan = run / "checkpoints" / ".last.pt.k2j3h4ab.tmp"
    orphan.write_bytes(b"\0" * 4096)  # what a writer killed mid-checkpoint leaves
    before = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in before if r["kind"] == "eval"] == [2]
    res = run_remax("train", "--resume", "--out", str(run), "--no-progress", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not orphan.exists()
    after = read_metrics(run / "metrics.jsonl")
    assert [r for r in after if r["kind"] == "train"] == [r for r in before if r["kind"] == "train"]
    assert [r["step"] for r in after if r["kind"] == "eval"] == [2]
    # The end of a run prints the All / Things / Stuff summary; the per-class rows are in eval.json.
    assert "validation panoptic quality" in res.stdout and "circle" not in res.stdout
    assert "per_class" in json.loads((run / "eval.json").read_text())


def test_metrics_rows_follow_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"

    def write(rows: list[dict]) -> None:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    rows = [{"kind": "train", "step": s} for s in (1, 2, 3)] + [{"kind": "eval", "step": 3}]
    write(rows)
    MetricsWriter(tmp_path, resume_step=0).close()  # a fresh run into a folder whose run never checkpointed
    assert read_metrics(path) == []
    write(rows)
    MetricsWriter(tmp_path, resume_step=2).close()  # resumed from step 2: rows of steps 3 would repeat
    assert read_metrics(path) == rows[:2]
    write(rows)
    MetricsWriter(tmp_path, resume_step=3, drop_eval_at=3).close()  # a finished run redoes its evaluation
    assert read_metrics(path) == rows[:3]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_the_final_evaluation_stops_cleanly(synth: Path, tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "run"
    last = out / "checkpoints" / "last.pt"
    proc = subprocess.Popen(remax_cmd(*_args(synth, out, "--max-steps", "1", "--set", "train.checkpoint_every=0",
                                             "--set", "train.num_val_images=0")),
                            cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not last.exists():  # written once, after the only step: the evaluation follows
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.005)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    assert f"stopped by {sig.name} during the final" in stdout, stdout + stderr[-2000:]
    assert load_checkpoint(last)["step"] == 1
    assert lock_holder(out) is None


def test_signal_during_the_data_check_stops_with_a_message(tmp_path: Path, monkeypatch, capsys) -> None:
    import remax.engine

    def interrupted_check(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # as if the scheduler stopped the job during the data check
        time.sleep(5)
        raise AssertionError("the signal did not stop the data check")

    monkeypatch.setattr(remax.engine, "build_parts", interrupted_check)
    out = tmp_path / "run"
    previous = signal.getsignal(signal.SIGTERM)
    assert main(["train", "--data", str(tmp_path / "none"), "--out", str(out), "--no-progress"]) == 128 + 15
    assert "stopped by SIGTERM before training started" in capsys.readouterr().out
    assert not out.exists() and signal.getsignal(signal.SIGTERM) is previous


def test_run_config_stores_resolved_data_paths(tmp_path: Path, monkeypatch) -> None:
    from remax.cli import _train_config, build_parser

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["train", "--data", "datasets/mine", "--set", "data.val_json=v/val.json"])
    cfg = _train_config(args, tmp_path / "run")
    assert cfg.data.root == str(tmp_path / "datasets" / "mine")
    assert cfg.data.val_json == str(tmp_path / "v" / "val.json")
