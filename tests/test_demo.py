"""`remax demo`: the page's logic against the Predictor, and the real page served by `remax demo` and driven by
headless Chromium (upload the COCO photo, wait for the result, count the segments, keep a screenshot)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "inference"))
from inference_helpers import write_checkpoint  # noqa: E402

from remax._extras import MissingExtraError  # noqa: E402
from remax.cli import main  # noqa: E402
from remax.demo import (TABLE_HEADERS, VIEWS, SegmentationDemo, build_demo, default_examples,  # noqa: E402
                        require_gradio, segment_rows)
from remax.inference import Predictor  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
TRAINED = REPO / "tests" / "fixtures" / "nano_synthetic.pt"
CHROMIUM = Path("/usr/bin/chromium")
COCO_PHOTO = next(p for p in default_examples() if p.name == "coco_000000142238.jpg")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, one_thread) -> Path:
    """The small trained fixture when present (meaningful segments), else the sharpened random nano model."""
    if TRAINED.is_file():
        return TRAINED
    return write_checkpoint(tmp_path_factory.mktemp("demo") / "nano.pt")


@pytest.fixture(scope="module")
def predictor(checkpoint) -> Predictor:
    return Predictor.from_checkpoint(checkpoint)


def test_examples_ship_with_the_package():
    names = [p.name for p in default_examples()]
    assert sum(n.startswith("coco_") for n in names) == 2
    assert sum(n.startswith("synthetic_") for n in names) >= 2


def test_page_rows_are_the_predictors_segments(checkpoint, predictor):
    gr = pytest.importorskip("gradio", reason="the web demo needs the demo extra (gradio)")
    page = build_demo(predictor, source=str(checkpoint))
    assert isinstance(page, gr.Blocks)
    app = page.remax_demo
    assert isinstance(app, SegmentationDemo)
    fresh = Predictor.from_checkpoint(checkpoint)  # the same checkpoint, loaded on its own
    for image in (COCO_PHOTO, default_examples()[-1]):
        out = app.segment(str(image), "panoptic")
        expected = fresh.predict(image)
        assert out.rows == segment_rows(expected, fresh.categories)
        assert [r[0] for r in out.rows] == [s["id"] for s in expected.segments_info]
        assert [r[1] for r in out.rows] == [fresh.categories[s["label"]].name for s in expected.segments_info]
        assert [r[4] for r in out.rows] == [s["area"] for s in expected.segments_info]
        assert f"**{len(expected.segments_info)} segments**" in out.summary
        assert out.picture.size == (expected.width, expected.height)
    assert len(TABLE_HEADERS) == len(out.rows[0])


def test_views_and_thresholds_rerun_the_post_processing(checkpoint, predictor):
    app = SegmentationDemo(predictor, source=str(checkpoint))
    for view in VIEWS:
        out = app.segment(str(COCO_PHOTO), view)
        assert out.picture.size == (out.result.width, out.result.height)
    assert "instance view" in app.segment(str(COCO_PHOTO), "instance").summary
    assert "semantic view" in app.segment(str(COCO_PHOTO), "semantic").summary
    # Sliders -> a modified cfg.eval: the page equals a Predictor loaded with those settings.
    settings = {"eval.thing_threshold": 0.55, "eval.stuff_threshold": 0.35, "eval.pixel_confidence_threshold": 0.6}
    moved = app.segment(str(COCO_PHOTO), "panoptic", *settings.values())
    other = Predictor.from_checkpoint(checkpoint, overrides=[f"{k}={v}" for k, v in settings.items()])
    assert moved.rows == segment_rows(other.predict(COCO_PHOTO), other.categories)
    assert predictor.cfg.eval.thing_threshold != 0.55  # the page's own Predictor is left as it was
    assert app.segment(None).rows == []


def test_the_page_states_the_model_and_its_source(checkpoint, predictor):
    line = SegmentationDemo(predictor, source="org/name").model_line()
    cfg = predictor.cfg
    assert f"`{cfg.preset}`" in line and "`org/name`" in line and f"{cfg.model.num_classes} classes" in line
    assert "{}×{}".format(*cfg.model.input_size) in line and "cpu" in line


def test_without_gradio_the_demo_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(MissingExtraError) as info:
        require_gradio()
    assert "pip install 'remax[demo]'" in str(info.value)
    assert main(["demo", "--checkpoint", "does-not-matter.pt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "remax[demo]" in err[0], err


def test_demo_cli_errors_are_one_line(tmp_path, capsys):
    pytest.importorskip("gradio", reason="the web demo needs the demo extra (gradio)")
    assert main(["demo", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.pt" in err[0], err


# ---------------------------------------------------------------------------------------------- in a real browser


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        lines.put(line)
    lines.put(None)


def _start_demo(checkpoint: str, timeout: float = 90.0) -> tuple[subprocess.Popen, str, list[str]]:
    """`remax demo --port 0` in a subprocess (in the repository root); returns it, its URL and what it printed."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "remax", "demo", "--checkpoint", checkpoint, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        if line is None:
            break
        seen.append(line.rstrip())
        match = re.search(r"serving .* on (http://127\.0\.0\.1:\d+/?)", line)
        if match:
            return proc, match.group(1), seen
    proc.kill()
    proc.wait()
    raise AssertionError("remax demo did not start:\n" + "\n".join(seen[-20:]))


def _require_browser():
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is absent (Debian's chromium package; `make test` installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {message}")
        pytest.skip(message)
    return pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (requirements-test)")


def test_the_page_in_headless_chromium(checkpoint, predictor, tmp_path):
    pytest.importorskip("gradio", reason="the web demo needs the demo extra (gradio)")
    playwright = _require_browser()
    expected = predictor.predict(COCO_PHOTO)
    n = len(expected.segments_info)
    source = str(checkpoint.relative_to(REPO)) if checkpoint.is_relative_to(REPO) else str(checkpoint)
    proc, url, _ = _start_demo(source)
    shot = tmp_path / "demo_page.png"
    try:
        with playwright.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                         args=["--no-sandbox", "--disable-dev-shm-usage"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(url, wait_until="domcontentloaded")
                page.wait_for_selector("#remax-input input[type=file]", state="attached", timeout=30_000)
                model_line = page.inner_text("#remax-model")
                assert predictor.cfg.preset in model_line and source in model_line
                page.set_input_files("#remax-input input[type=file]", str(COCO_PHOTO))
                page.wait_for_function("() => /\\d+ segments/.test("
                                       "document.querySelector('#remax-summary')?.innerText || '')",
                                       timeout=60_000)
                page.wait_for_selector("#remax-output img", timeout=30_000)
                summary = page.inner_text("#remax-summary")
                shown = int(re.search(r"(\d+) segments", summary).group(1))
                assert shown == n, summary
                rows = page.locator("#remax-segments [role=row]:not(:has([role=columnheader]))")
                page.wait_for_function(f"() => document.querySelectorAll('#remax-segments [role=row]').length "
                                       f">= {min(n, 10) + 1}", timeout=10_000)
                assert rows.count() == n or (n > 10 and rows.count() >= 10), rows.count()
                page.screenshot(path=str(shot), full_page=True)
            finally:
                browser.close()
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the demo closes its server and exits 0
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    assert code == 0
    assert shot.stat().st_size > 10_000
    if os.environ.get("REMAX_DEMO_SCREENSHOT"):  # how docs/demo_page.png is made: 256 colours keep it small
        from PIL import Image

        with Image.open(shot) as im:
            im.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE).save(
                os.environ["REMAX_DEMO_SCREENSHOT"], optimize=True)
