"""A local web page for a model: drop a photo, see its panoptic segmentation (``remax demo``).

Built with Gradio (the optional ``demo`` extra). The page states the model and its source, takes an uploaded or an
example image, and shows the overlay in a panoptic, semantic or instance view, the table of panoptic segments
(class, thing/stuff, score, area) and sliders for the merge's class and pixel thresholds; moving one re-runs the
post-processing with a modified ``cfg.eval``. It serves on 127.0.0.1 unless told otherwise and runs on the CPU by
default.

>>> from remax.inference import Predictor
>>> from remax.demo import build_demo, default_examples
>>> page = build_demo(Predictor.from_checkpoint("model_folder"), default_examples(), source="model_folder")
>>> page.launch()                                                      # or remax.demo.launch_demo(...)

The logic behind the page is :class:`SegmentationDemo` (plain Python, usable without a browser).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from remax.inference.predictor import PredictionResult, Predictor, load_image
from remax.inference.visualize import overlay_panoptic

__all__ = ["VIEWS", "TABLE_HEADERS", "DemoOutput", "SegmentationDemo", "build_demo", "launch_demo",
           "default_examples", "require_gradio"]

log = logging.getLogger(__name__)

VIEWS = ("panoptic", "semantic", "instance")
TABLE_HEADERS = ["id", "class", "kind", "score", "area (px)", "area (%)"]
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def require_gradio():
    """Import gradio, or raise :class:`~remax._extras.MissingExtraError` naming the ``demo`` extra."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry calls from a local demo
    from remax._extras import require

    return require("gradio", "demo", "the web demo (remax demo)")


def default_examples() -> list[Path]:
    """The example images shipped in ``remax/assets/examples``: two COCO photos and three synthetic scenes."""
    folder = Path(str(resources.files("remax") / "assets" / "examples"))
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)


@dataclass
class DemoOutput:
    """What the page shows for one image: the picture, a one-line summary and the segment table's rows."""

    picture: Image.Image | None
    summary: str
    rows: list[list[Any]]
    result: PredictionResult | None = None


class SegmentationDemo:
    """The demo's logic: one :class:`~remax.inference.Predictor`, re-made with other thresholds when asked.

    Only the Predictor's public API is used (``Predictor(model, cfg, categories, device=...)``, ``predict``), so
    a new threshold setting costs one cheap Predictor around the same model; the last few results are kept, so
    switching views does not run the network again.
    """

    def __init__(self, predictor: Predictor, source: str = "", cache_size: int = 4) -> None:
        self.predictor = predictor
        self.source = source
        self._predictors: OrderedDict[tuple[float, float, float], Predictor] = OrderedDict()
        self._results: OrderedDict[tuple, tuple[PredictionResult, float]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    # ---------------------------------------------------------------------------------------------- settings

    @property
    def thresholds(self) -> tuple[float, float, float]:
        """The checkpoint's (thing, stuff, pixel) thresholds: the sliders' starting values."""
        e = self.predictor.cfg.eval
        return float(e.thing_threshold), float(e.stuff_threshold), float(e.pixel_confidence_threshold)

    def model_line(self) -> str:
        """One Markdown line naming the model (preset, classes, input size), its source and the device."""
        cfg, cats = self.predictor.cfg, self.predictor.categories
        things = sum(1 for c in cats if c.isthing)
        h, w = cfg.model.input_size
        device = getattr(self.predictor, "device", "cpu")
        return (f"**Model** `{cfg.preset}` ({cfg.model.backbone} backbone, {len(cats)} classes: {things} things, "
                f"{len(cats) - things} stuff; input {h}×{w}) · **source** `{self.source or 'unknown'}` · "
                f"**device** {device}")

    def predictor_for(self, thing_threshold: float, stuff_threshold: float,
                      pixel_threshold: float) -> Predictor:
        """A Predictor around the same model whose ``cfg.eval`` has these thresholds (cached)."""
        key = (round(float(thing_threshold), 4), round(float(stuff_threshold), 4), round(float(pixel_threshold), 4))
        with self._lock:
            if key in self._predictors:
                self._predictors.move_to_end(key)
                return self._predictors[key]
        base = self.predictor
        evalcfg = dataclasses.replace(base.cfg.eval, thing_threshold=key[0], stuff_threshold=key[1],
                                      pixel_confidence_threshold=key[2])
        cfg = dataclasses.replace(base.cfg, eval=evalcfg)
        made = Predictor(base.model, cfg, base.categories, device=getattr(base, "device", "cpu"))
        with self._lock:
            self._predictors[key] = made
            while len(self._predictors) > self._cache_size:
                self._predictors.popitem(last=False)
        return made

    # ---------------------------------------------------------------------------------------------- running

    def predict(self, image: str | os.PathLike, thing_threshold: float, stuff_threshold: float,
                pixel_threshold: float) -> tuple[PredictionResult, float]:
        """The Predictor's result for an image file under these thresholds and the seconds it took (the last
        few results are cached, with the time of their first run)."""
        path = Path(image)
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size, round(float(thing_threshold), 4),
               round(float(stuff_threshold), 4), round(float(pixel_threshold), 4))
        with self._lock:
            if key in self._results:
                self._results.move_to_end(key)
                return self._results[key]
        start = time.perf_counter()
        result = self.predictor_for(thing_threshold, stuff_threshold, pixel_threshold).predict(path)
        entry = (result, time.perf_counter() - start)
        with self._lock:
            self._results[key] = entry
            while len(self._results) > self._cache_size:
                self._results.popitem(last=False)
        return entry

    def segment(self, image: str | os.PathLike | None, view: str = "panoptic",
                thing_threshold: float | None = None, stuff_threshold: float | None = None,
                pixel_threshold: float | None = None) -> DemoOutput:
        """Run one image and render the chosen view; ``None`` thresholds keep the checkpoint's."""
        if image is None:
            return DemoOutput(None, "Upload an image or pick an example.", [])
        if view not in VIEWS:
            raise ValueError(f"unknown view {view!r}; choose one of {', '.join(VIEWS)}")
        defaults = self.thresholds
        thing = defaults[0] if thing_threshold is None else float(thing_threshold)
        stuff = defaults[1] if stuff_threshold is None else float(stuff_threshold)
        pixel = defaults[2] if pixel_threshold is None else float(pixel_threshold)
        result, seconds = self.predict(image, thing, stuff, pixel)
        picture_in = load_image(image)
        cats = self.predictor.categories
        if view == "panoptic":
            picture = overlay_panoptic(picture_in, result.id_map, result.segments_info, cats)
            detail = ""
        elif view == "semantic":
            ids, segs = _semantic_segments(result, cats)
            picture = overlay_panoptic(picture_in, ids, segs, cats)
            detail = f" · semantic view: {len(segs)} classes present"
        else:
            ids, segs = _instance_segments(result, thing)
            picture = overlay_panoptic(picture_in, ids, segs, cats)
            detail = f" · instance view: {len(segs)} instances with score ≥ {thing:g}"
        rows = segment_rows(result, cats)
        n_things = sum(1 for s in result.segments_info if s["isthing"])
        n = len(result.segments_info)
        summary = (f"**{n} segments** ({n_things} things, {n - n_things} stuff) · {result.width}×{result.height} px"
                   f" · {seconds * 1000:.0f} ms{detail}")
        log.info("demo: %s -> %d segments (%s view, thresholds %.2f/%.2f/%.2f) in %.2f s", Path(image).name, n,
                 view, thing, stuff, pixel, seconds)
        return DemoOutput(picture, summary, rows, result)

    # ---------------------------------------------------------------------------------------------- the page

    def build(self, examples: Sequence[str | os.PathLike] = ()):
        """The Gradio page (``gr.Blocks``) around :meth:`segment`."""
        gr = require_gradio()
        import pandas as pd

        thing0, stuff0, pixel0 = self.thresholds

        def run(image, view, thing, stuff, pixel):
            out = self.segment(image, view, thing, stuff, pixel)
            return out.picture, out.summary, pd.DataFrame(out.rows, columns=TABLE_HEADERS)

        with gr.Blocks(title="remax demo", analytics_enabled=False) as page:
            gr.Markdown("## remax: panoptic segmentation with kMaX-DeepLab / ReMaX")
            gr.Markdown(self.model_line(), elem_id="remax-model")
            with gr.Row():
                with gr.Column(scale=1):
                    image = gr.Image(type="filepath", label="image", sources=["upload", "clipboard"],
                                     elem_id="remax-input")
                    view = gr.Radio(list(VIEWS), value="panoptic", label="view", elem_id="remax-view")
                    thing = gr.Slider(0.0, 1.0, value=thing0, step=0.01, label="thing class threshold",
                                      info="eval.thing_threshold", elem_id="remax-thing-threshold")
                    stuff = gr.Slider(0.0, 1.0, value=stuff0, step=0.01, label="stuff class threshold",
                                      info="eval.stuff_threshold", elem_id="remax-stuff-threshold")
                    pixel = gr.Slider(0.0, 1.0, value=pixel0, step=0.01, label="pixel confidence threshold",
                                      info="eval.pixel_confidence_threshold", elem_id="remax-pixel-threshold")
                    if examples:
                        gr.Examples(examples=[[str(p)] for p in examples], inputs=[image], label="examples",
                                    examples_per_page=10)
                with gr.Column(scale=2):
                    picture = gr.Image(type="pil", format="png", label="result", interactive=False,
                                       elem_id="remax-output")
                    summary = gr.Markdown("Upload an image or pick an example.", elem_id="remax-summary")
                    table = gr.Dataframe(headers=TABLE_HEADERS, label="panoptic segments", interactive=False,
                                         elem_id="remax-segments")
            inputs = [image, view, thing, stuff, pixel]
            outputs = [picture, summary, table]
            image.change(run, inputs, outputs)
            view.change(run, inputs, outputs)
            for slider in (thing, stuff, pixel):
                slider.release(run, inputs, outputs)
        page.remax_demo = self  # the logic behind the page, for tests and embedding
        return page


def segment_rows(result: PredictionResult, categories: Sequence) -> list[list[Any]]:
    """One table row per panoptic segment, in the Predictor's order: id, class, thing/stuff, score, area, %."""
    total = max(1, result.height * result.width) if result.height else max(1, result.id_map.numel())
    rows = []
    for s in result.segments_info:
        rows.append([int(s["id"]), categories[int(s["label"])].name, "thing" if s["isthing"] else "stuff",
                     round(float(s["score"]), 3), int(s["area"]), round(100.0 * int(s["area"]) / total, 2)])
    return rows


def _semantic_segments(result: PredictionResult, categories: Sequence) -> tuple[torch.Tensor, list[dict]]:
    """The semantic map as an id map (class + 1, so that nothing is void) and one segment per present class."""
    if result.semantic is None:
        return torch.zeros_like(result.id_map), []
    labels = torch.unique(result.semantic).tolist()
    segs = [{"id": int(k) + 1, "category_id": categories[int(k)].id, "isthing": False} for k in labels]
    return result.semantic + 1, segs


def _instance_segments(result: PredictionResult, threshold: float) -> tuple[torch.Tensor, list[dict]]:
    """Instances scoring at least ``threshold`` painted lowest score first (the best on top), as an id map."""
    inst = result.instances
    ids = torch.zeros((result.height, result.width), dtype=torch.int64) if result.height else \
        torch.zeros_like(result.id_map)
    if inst is None or inst.scores.numel() == 0:
        return ids, []
    cats = result.instance_category_ids
    segs = []
    for i in torch.argsort(inst.scores).tolist():
        mask = inst.masks[i]
        if float(inst.scores[i]) < threshold or not bool(mask.any()):
            continue
        segs.append({"id": len(segs) + 1, "category_id": int(cats[i]), "isthing": True})
        ids[mask] = len(segs)
    present = set(torch.unique(ids).tolist())
    return ids, [s for s in segs if s["id"] in present]


def build_demo(predictor: Predictor, examples: Sequence[str | os.PathLike] | None = None, source: str = ""):
    """The demo page (a ``gr.Blocks``) for a Predictor; ``examples`` default to :func:`default_examples`.
    ``source`` (a checkpoint path or hub id) is stated on the page. ``page.remax_demo`` is its
    :class:`SegmentationDemo`."""
    if examples is None:
        examples = default_examples()
    return SegmentationDemo(predictor, source).build(examples)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def launch_demo(predictor: Predictor, examples: Sequence[str | os.PathLike] | None = None, source: str = "",
                host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True,
                on_ready: Any = None):
    """Serve the demo page on ``host:port`` (``port=0``: a free port); returns the ``gr.Blocks`` (its
    ``local_url`` says where it serves). ``block=True`` serves until interrupted (Ctrl-C closes it cleanly);
    ``on_ready(url)`` is called once it serves. ``share=True`` asks Gradio for a public link (online only).
    """
    page = build_demo(predictor, examples, source)
    if examples is None:
        examples = default_examples()
    if port == 0:
        port = free_port(host)
    allowed = sorted({str(Path(p).resolve().parent) for p in examples})
    page.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True,
                allowed_paths=allowed, ssr_mode=False, show_error=True)
    url = page.share_url or page.local_url
    log.info("remax demo serving on %s", url)
    if on_ready is not None:
        on_ready(url)
    if block:
        try:
            while page.is_running:
                time.sleep(0.2)
        except KeyboardInterrupt:
            log.info("remax demo: interrupted, closing the server")
        finally:
            page.close()
    return page

