"""Tests of ``remax bench`` (remax.engine.benchmark): well-formed results, the protocol, the peer, memory probe.

No assertion is made on how fast anything is; only on how the figures relate to each other.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from remax.cli import main
from remax.engine import benchmark as bm
from remax.engine.benchmark import BenchError, BenchSettings, Measurement, run_benchmark


def test_percentile_matches_hand_computed_values():
    assert bm.percentile([4.0, 1.0, 3.0, 2.0], 90) == pytest.approx(3.7)  # 1 + 0.9 * 3 = 3.7th position
    assert bm.percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert bm.percentile([7.0], 90) == 7.0
    with pytest.raises(ValueError):
        bm.percentile([], 50)


def test_measurement_derived_figures():
    m = Measurement(subject="x", stage="model", batch=4, latencies_ms=[10.0, 30.0, 20.0], first_call_s=0.1,
                    peak_memory_mb=1.0, peak_memory_total_mb=2.0)
    assert m.median_ms == 20.0
    assert m.p90_ms == pytest.approx(28.0)  # position 1.8 between 20 and 30
    assert m.images_per_s == pytest.approx(4 / 0.020)
    d = m.to_dict()
    assert d["images_per_s"] == pytest.approx(200.0) and d["latencies_ms"] == [10.0, 30.0, 20.0]


@pytest.mark.parametrize("size, side", [(640, 641), (641, 641), (642, 673), (64, 65), (65, 65), (1281, 1281)])
def test_model_input_side_is_next_k32_plus_1(size, side):
    assert bm.model_input_side(size) == side


def test_time_stage_call_counts():
    calls = []
    m = bm.time_stage(lambda: calls.append(1), subject="f", stage="model", batch=1, warmup=2, iters=3,
                      device=torch.device("cpu"))
    assert len(calls) == 1 + 2 + 3  # first call + warm-up + timed
    assert len(m.latencies_ms) == 3 and all(t >= 0 for t in m.latencies_ms)


def test_memory_probe_sees_a_64_mib_allocation():
    probe = bm.MemoryProbe(torch.device("cpu"))
    if not probe.can_reset_rss:
        pytest.skip("/proc/self/clear_refs is not writable here; the fallback is only a lower bound")
    probe.start()
    x = torch.ones(16 * 2**20)  # 64 MiB, every page touched
    delta, total = probe.stop()
    assert float(x[-1]) == 1.0
    assert 60 <= delta <= total
    del x
    probe.start()
    delta_small, _ = probe.stop()
    assert delta_small < 30  # the freed tensor is not counted again


def test_random_targets_are_valid():
    targets = bm.random_panoptic_targets(2, (65, 97), num_classes=9, seed=0)
    for t in targets:
        assert t.id_map.shape == (65, 97) and t.id_map.dtype == torch.int64
        ids = set(t.id_map.unique().tolist())
        assert 0 in ids and ids - {0} <= set(range(1, t.num_segments + 1))
        assert ((t.classes >= 0) & (t.classes < 9)).all()
        assert torch.equal(t.is_thing, t.classes < 5)  # first half of 9 classes are things
        assert not t.is_crowd.any()


def _check_measurement(m: Measurement, iters: int, batch: int) -> None:
    assert len(m.latencies_ms) == iters
    assert all(t > 0 for t in m.latencies_ms)
    assert m.p90_ms >= m.median_ms > 0
    assert m.images_per_s == pytest.approx(batch * 1000.0 / m.median_ms)
    assert m.first_call_s > 0
    assert 0 <= m.peak_memory_mb <= m.peak_memory_total_mb
    assert m.peak_memory_total_mb > 0


def test_bench_nano_inference_and_training():
    result = run_benchmark(BenchSettings(preset="nano", size=33, batch=2, warmup=1, iters=2, threads=1,
                                         train=True))
    p = result.protocol
    assert p.device == "cpu" and p.device_name and p.torch_version == torch.__version__
    assert p.threads == 1 and p.precision == "fp32" and not p.compile and not p.channels_last
    assert p.image_size == (33, 33) and p.model_input_size == (33, 33) and p.batch == 2
    assert (p.warmup, p.iters) == (1, 2)
    assert "post-processing" in p.end_to_end_stage and "resize" in p.end_to_end_stage
    assert "no post-processing" in p.model_stage
    assert p.memory_method
    assert [(m.subject, m.stage) for m in result.measurements] == [
        ("nano", "model"), ("nano", "end_to_end"), ("nano", "train_step")]
    for m in result.measurements:
        _check_measurement(m, iters=2, batch=2)
    assert result.get("nano", "end_to_end").segments_per_image >= 0
    assert result.get("nano", "model").segments_per_image is None
    assert result.params_m["nano"] > 0
    assert result.ratios == {}
    # The dictionary form is JSON-serialisable and carries the derived figures.
    d = json.loads(json.dumps(result.to_dict()))
    assert d["measurements"][0]["median_ms"] == pytest.approx(result.measurements[0].median_ms)
    assert d["protocol"]["threads"] == 1


def test_bench_restores_thread_count():
    before = torch.get_num_threads()
    run_benchmark(BenchSettings(preset="nano", size=33, warmup=0, iters=1, threads=max(1, before % 2 + 1)))
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("kwargs, message", [
    (dict(precision="fp8"), "precision"),
    (dict(preset="no_such_preset"), "unknown preset"),
    (dict(batch=0), "batch"),
    (dict(iters=0), "iters"),
    (dict(peer="detr"), "unknown peer"),
    (dict(size=8), "too small"),
    (dict(runtime="tensorrt"), "unknown runtime"),
    (dict(merge_load="heavy"), "merge-load"),
    (dict(runtime="onnxruntime", merge_load="trained"), "without --compile or --merge-load"),  # before timing
    (dict(checkpoint="/no/such/file.pt"), "not found"),
])
def test_bad_settings_raise_clear_errors(kwargs, message):
    settings = BenchSettings(**{"preset": "nano", "size": 33, "warmup": 0, "iters": 1, **kwargs})
    with pytest.raises(BenchError, match=message):
        run_benchmark(settings)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a machine without CUDA")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(BenchError, match="CUDA"):
        run_benchmark(BenchSettings(preset="nano", device="cuda", size=33, iters=1))


def test_cli_prints_protocol_then_figures(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    rc = main(["bench", "--preset", "nano", "--size", "33", "--warmup", "0", "--iters", "2", "--threads", "1",
               "--json", str(out_json)])
    assert rc == 0
    text = capsys.readouterr().out
    assert text.startswith("protocol")
    for field in ("device", "torch", "threads", "precision", "compile", "channels_last", "image size", "batch",
                  "resize included", "post-processing included", "peak memory"):
        assert f"  {field} " in text, field
    assert text.index("protocol") < text.index("median ms")
    assert "nano                   model" in text and "nano                   end_to_end" in text
    data = json.loads(out_json.read_text())
    assert data["preset"] == "nano" and data["protocol"]["image_size"] == [33, 33]
    model = data["measurements"][0]
    assert model["images_per_s"] == pytest.approx(1000.0 / model["median_ms"])


def test_cli_bad_option_is_one_line_error(capsys):
    rc = main(["bench", "--preset", "nano", "--size", "8", "--iters", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("remax: error:") and "too small" in err and err.count("\n") == 1


def test_missing_transformers_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(BenchError, match="pip install transformers"):
        bm.build_mask2former_r50(image_size=64)


def test_peer_mask2former_runs_offline_and_ratio_is_consistent(monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_benchmark(BenchSettings(preset="nano", size=64, warmup=0, iters=1, threads=1,
                                         peer="mask2former-r50"))
    assert result.peer == "mask2former-r50"
    assert result.protocol.model_input_size == (65, 65)  # remax pads 64 to 65; the peer gets 64×64
    peer_e2e = result.get("mask2former-r50", "end_to_end")
    for m in (result.get("mask2former-r50", "model"), peer_e2e):
        _check_measurement(m, iters=1, batch=1)
    assert peer_e2e.segments_per_image is not None
    assert 40 < result.params_m["mask2former-r50"] < 50  # ResNet-50 + pixel decoder + transformer decoder
    for stage in ("model", "end_to_end"):
        ours, theirs = result.get("nano", stage), result.get("mask2former-r50", stage)
        assert result.ratios[stage] == pytest.approx(ours.images_per_s / theirs.images_per_s)
        assert math.isfinite(result.ratios[stage])


def test_bench_trained_checkpoint_beside_onnxruntime_on_real_pictures(tmp_path):
    """--checkpoint times real weights (segments kept are reported), --runtime onnxruntime adds the exported
    network in the same run, and --images uses pictures instead of synthetic blocks."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (make test installs it)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inference"))
    from inference_helpers import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "nano.pt")
    photos = Path(__file__).resolve().parents[1] / "fixtures" / "coco_panoptic_sample" / "val2017"
    result = run_benchmark(BenchSettings(preset="nano", size=65, warmup=0, iters=1, threads=1, checkpoint=str(ckpt),
                                         runtime="onnxruntime", images=str(photos)))
    assert [(m.subject, m.stage, m.runtime) for m in result.measurements] == [
        ("nano", "model", "eager"), ("nano", "end_to_end", "eager"),
        ("nano[onnxruntime]", "model", "onnxruntime"), ("nano[onnxruntime]", "end_to_end", "onnxruntime")]
    eager, ort = result.get("nano", "end_to_end"), result.get("nano[onnxruntime]", "end_to_end")
    assert eager.segments_per_image > 0 and ort.segments_per_image == eager.segments_per_image
    assert set(result.runtime_ratios) == {"model", "end_to_end"}
    assert result.runtime_ratios["model"] == pytest.approx(
        result.get("nano[onnxruntime]", "model").images_per_s / result.get("nano", "model").images_per_s)
    assert str(ckpt) in result.protocol.weights and str(photos) in result.protocol.images


def test_trained_merge_load_makes_random_weights_keep_segments():
    plain = run_benchmark(BenchSettings(preset="nano", size=65, warmup=0, iters=1, threads=1))
    loaded = run_benchmark(BenchSettings(preset="nano", size=65, warmup=0, iters=1, threads=1, merge_load="trained"))
    assert plain.get("nano", "end_to_end").segments_per_image == 0  # random class heads pass no threshold
    assert loaded.get("nano", "end_to_end").segments_per_image >= 1
    assert "confident queries" in loaded.protocol.merge_load
