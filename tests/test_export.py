"""Export round trips on a small trained checkpoint: ONNX (ONNX Runtime, CPU) and torch.export against the eager
network, logits within the stated tolerance and panoptic id maps identical on the synthetic validation images and
the two real COCO photos (ONNX Runtime: up to float32 ties, each checked); `remax predict --onnx` writes the same
files as `remax predict --checkpoint`."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from remax.checkpoint import CheckpointError
from remax.cli import main
from remax.data.synthetic import _image_seed, render_scene
from remax.export import ATOL, OPSET, RTOL, ExportError, export_checkpoint, load_for_export
from remax.inference.predictor import Predictor, load_image, mask_logits_to_image

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed (make test installs it)")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (make test installs it)")

FIXTURES = Path(__file__).parent / "fixtures"
TRAINED = FIXTURES / "nano_synthetic.pt"  # nano trained 600 steps on the synthetic set (fixtures/README.md)
COCO = FIXTURES / "coco_panoptic_sample" / "val2017"


def synthetic_val_images(count: int = 6) -> list[torch.Tensor]:
    """The first validation images of the built-in synthetic set (split 1, seed 0), as rendered before JPEG."""
    return [torch.from_numpy(render_scene(_image_seed(0, 1, i), 256)[0]).permute(2, 0, 1).contiguous()
            for i in range(count)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("export")
    onnx_report = export_checkpoint(TRAINED, "onnx", out / "nano.onnx", dynamic_batch=True)
    program_report = export_checkpoint(TRAINED, "torch-export", out / "nano.pt2", dynamic_batch=True)
    assert onnx_report.checked and program_report.checked
    return {"onnx": onnx_report.path, "program": program_report.path,
            "onnx_diff": onnx_report.max_abs_diff, "program_diff": program_report.max_abs_diff}


def test_onnx_graph_is_standard_opset_without_custom_ops(exported):
    model = onnx.load(str(exported["onnx"]))
    onnx.checker.check_model(model)
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets.get("", opsets.get("ai.onnx")) == OPSET
    domains = {n.domain for n in model.graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard op domains {domains}"
    ops = {n.op_type for n in model.graph.node}
    assert {"ArgMax", "Resize"} <= ops or {"ReduceMax", "Resize"} <= ops  # k-means assignment, upsampling
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["remax.config"])["model"]["input_size"] == [257, 257]
    assert len(json.loads(meta["remax.categories"])) == json.loads(meta["remax.config"])["model"]["num_classes"]


def test_parity_of_logits_within_tolerance(exported):
    # The export's own check compared both outputs; here the whole batch path (dynamic batch of 3) is compared.
    model, cfg, _ = load_for_export(TRAINED)
    runtime = Predictor.from_onnx(exported["onnx"]).model
    program = Predictor.from_exported(exported["program"]).model
    from remax.preprocessing import preprocess

    x, _ = preprocess(synthetic_val_images(3), tuple(cfg.model.input_size))
    with torch.inference_mode():
        eager = model(x)
    for name, out in (("onnx", runtime(x)), ("torch-export", program(x))):
        for key in ("pred_logits", "pred_masks"):
            torch.testing.assert_close(out[key], eager[key], rtol=RTOL, atol=ATOL, msg=f"{name} {key}")
    assert max(exported["onnx_diff"].values()) < ATOL


def _decision_margins(predictor: Predictor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel of the eager outputs: how far the nearest query's mask probability lies from the pixel threshold
    (the panoptic id map's decision), and the gap between the two best classes (the semantic map's argmax)."""
    outputs, sizes = predictor.forward_batch([img])
    masks = mask_logits_to_image(outputs["pred_masks"][0], predictor.input_size, sizes[0], tuple(img.shape[1:]))
    probs = masks.softmax(dim=0)
    threshold = predictor.cfg.eval.pixel_confidence_threshold
    to_threshold = (probs - threshold).abs().amin(dim=0)
    semantic = torch.einsum("nk,nhw->khw", outputs["pred_logits"][0].softmax(dim=-1)[:, :-1], probs)
    top2 = semantic.topk(2, dim=0).values
    return to_threshold, top2[0] - top2[1]


def test_id_maps_identical_on_synthetic_val_and_coco_photos(exported):
    """torch.export: bitwise. ONNX Runtime: the same segments, and a pixel may differ only where eager's own
    decision is a float32 tie: a mask probability within DELTA of the pixel threshold or two classes within
    DELTA (DELTA = the logit tolerance, a bound on how far such a difference moves a probability)."""
    delta = ATOL
    eager = Predictor.from_checkpoint(TRAINED, instances=False)
    via_onnx = Predictor.from_onnx(exported["onnx"], instances=False)
    via_program = Predictor.from_exported(exported["program"], instances=False)
    images = synthetic_val_images() + [load_image(p) for p in sorted(COCO.glob("*.jpg"))]
    kept = differing = 0
    for img in images:
        ref = eager.predict(img)
        kept += len(ref.segments_info)
        got = via_program.predict(img)  # the same kernels as eager: bitwise equal outputs
        assert torch.equal(got.id_map, ref.id_map) and got.segments_info == ref.segments_info
        assert torch.equal(got.semantic, ref.semantic)
        got = via_onnx.predict(img)
        assert [s["category_id"] for s in got.segments_info] == [s["category_id"] for s in ref.segments_info]
        moved_id, moved_semantic = got.id_map != ref.id_map, got.semantic != ref.semantic
        differing += int(moved_id.sum()) + int(moved_semantic.sum())
        if moved_id.any() or moved_semantic.any():
            to_threshold, class_gap = _decision_margins(eager, img)
            assert bool((to_threshold[moved_id] < delta).all()), "a pixel moved that is not at the threshold"
            assert bool((class_gap[moved_semantic] < delta).all()), "a semantic pixel moved that is not a tie"
    assert kept >= 2 * len(images), "the trained fixture must keep segments for this to test anything"
    assert differing <= 1e-5 * sum(img.shape[1] * img.shape[2] for img in images)


def test_onnx_runtime_is_as_close_to_float64_as_eager(exported):
    """On the zero-padded COCO photos ONNX Runtime's stock ReduceMean over H×W drifted 30× beyond eager's own
    float32 error (docs/deployment.md); the export writes spatial means axis by axis. Both runtimes against the
    float64 network: ONNX Runtime within a few times eager's error."""
    import copy

    from remax.preprocessing import preprocess

    model, cfg, _ = load_for_export(TRAINED)
    exact = copy.deepcopy(model).double()
    runtime = Predictor.from_onnx(exported["onnx"]).model
    photos = [load_image(p) for p in sorted(COCO.glob("*.jpg"))]
    x, _ = preprocess(photos, tuple(cfg.model.input_size))
    with torch.inference_mode():
        truth, eager, onnx_out = exact(x.double()), model(x), runtime(x)
    for key in ("pred_logits", "pred_masks"):
        eager_err = float((eager[key].double() - truth[key]).abs().max())
        onnx_err = float((onnx_out[key].double() - truth[key]).abs().max())
        assert onnx_err <= 4 * eager_err, f"{key}: ONNX Runtime {onnx_err:.2g} vs eager {eager_err:.2g} from fp64"


def test_predict_onnx_cli_writes_the_same_files(exported, tmp_path):
    """`remax predict --onnx` / `--program` against `--checkpoint` on the COCO sample photos (and two synthetic
    images): the same JSON segments and PNGs (ONNX Runtime: up to float32 ties, as in the test above)."""
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for photo in sorted(COCO.glob("*.jpg")):
        (pictures / photo.name).write_bytes(photo.read_bytes())
    for i, img in enumerate(synthetic_val_images(2)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(pictures / f"synthetic_{i}.png")
    args = [str(pictures), "--no-progress", "--device", "cpu"]
    assert main(["predict", *args, "--checkpoint", str(TRAINED), "--out", str(tmp_path / "eager")]) == 0
    assert main(["predict", *args, "--program", str(exported["program"]), "--out", str(tmp_path / "program")]) == 0
    assert main(["predict", *args, "--onnx", str(exported["onnx"]), "--out", str(tmp_path / "onnx")]) == 0
    ref = json.loads((tmp_path / "eager" / "predictions.json").read_text())["annotations"]
    for name in ("program", "onnx"):
        got = json.loads((tmp_path / name / "predictions.json").read_text())["annotations"]
        assert [a["file_name"] for a in got] == [a["file_name"] for a in ref]
        for a, b in zip(ref, got):
            png_a = np.asarray(Image.open(tmp_path / "eager" / "predictions" / a["file_name"]))
            png_b = np.asarray(Image.open(tmp_path / name / "predictions" / b["file_name"]))
            if name == "program":
                assert a["segments_info"] == b["segments_info"]
                assert np.array_equal(png_a, png_b)
            else:  # float32 ties may move a pixel (see the test above, which checks each moved pixel is one)
                assert [s["category_id"] for s in a["segments_info"]] == [s["category_id"] for s in b["segments_info"]]
                assert (png_a != png_b).any(axis=-1).sum() <= 1e-5 * png_a.shape[0] * png_a.shape[1]


def test_bad_files_give_one_line_errors(tmp_path, capsys):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="not a readable ONNX model"):
        Predictor.from_onnx(junk)
    with pytest.raises(CheckpointError, match="not a readable torch.export program"):
        Predictor.from_exported(junk)
    assert main(["predict", str(junk), "--onnx", str(junk), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("remax: error:") and len(err.splitlines()) == 1
    with pytest.raises(ExportError, match="unknown export format"):
        export_checkpoint(TRAINED, "tflite", tmp_path / "x")
    archive = tmp_path / "other.pt2"  # a zip archive, but not a program: torch's own warning stays quiet
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("notes.txt", "hello")
    with pytest.raises(CheckpointError, match="not a readable torch.export program"):
        Predictor.from_exported(archive)
    assert capsys.readouterr().err == ""


def test_onnx_without_remax_metadata_is_refused(tmp_path):
    class Tiny(torch.nn.Module):
        def forward(self, images):
            return images.mean(dim=(2, 3)), images

    path = tmp_path / "foreign.onnx"
    torch.onnx.export(Tiny().eval(), (torch.zeros(1, 3, 8, 8),), str(path), dynamo=True, opset_version=OPSET,
                      input_names=["images"], output_names=["pred_logits", "pred_masks"])
    with pytest.raises(CheckpointError, match="not a remax export"):
        Predictor.from_onnx(path)


def test_export_cli_program_and_folder(tmp_path, capsys):
    assert main(["export", "--checkpoint", str(TRAINED), "--format", "torch-export", "--out",
                 str(tmp_path / "m.pt2")]) == 0
    out = capsys.readouterr().out
    assert "torch-export, input 257×257, batch 1" in out and "parity vs eager: pred_logits max |diff|" in out
    assert main(["export", "--checkpoint", str(TRAINED), "--format", "folder", "--out", str(tmp_path / "folder")]) == 0
    folder = Predictor.from_pretrained(tmp_path / "folder", instances=False)
    eager = Predictor.from_checkpoint(TRAINED, instances=False)
    img = synthetic_val_images(1)[0]
    assert torch.equal(folder.predict(img).id_map, eager.predict(img).id_map)
    assert main(["export", "--checkpoint", str(tmp_path / "nothing.pt"), "--format", "onnx", "--out",
                 str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("remax: error:") and "not found" in err and len(err.splitlines()) == 1


def test_sigterm_during_the_write_stops_cleanly(tmp_path, monkeypatch, capsys):
    """A killed export unwinds like Ctrl-C: exit 130, one line, no output file and no temporary file left."""
    import os
    import signal
    import time

    real_save = torch.export.save

    def killed_save(program, f, **kwargs):
        real_save(program, f, **kwargs)  # a partly written file is on disk when the signal comes
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("the signal did not stop the export")

    monkeypatch.setattr(torch.export, "save", killed_save)
    previous = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out" / "m.pt2"
    assert main(["export", "--checkpoint", str(TRAINED), "--format", "torch-export", "--out", str(out),
                 "--no-check"]) == 130
    assert capsys.readouterr().err.strip() == "remax: interrupted"
    assert list((tmp_path / "out").iterdir()) == [] and signal.getsignal(signal.SIGTERM) is previous


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    import errno

    def full_disk(proto, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", full_disk)
    out = tmp_path / "out" / "m.onnx"
    assert main(["export", "--checkpoint", str(TRAINED), "--format", "onnx", "--out", str(out), "--no-check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"remax: error: cannot write ONNX file {out}: no space left on the device"
    assert list((tmp_path / "out").iterdir()) == []
