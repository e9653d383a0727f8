"""The built-in synthetic panoptic data set, written to disk in COCO-panoptic format.

Scenes have 4 stuff classes (sky, grass, water, sand: irregular regions told apart by texture and tint) and 5
thing classes told apart by shape only (circle, square, triangle, star, ring: every instance has a random colour,
rotation and size from about 10 px to a third of the image, up to 12 per image, occluding each other). Some images
hold a crowd region (a tight cluster of one shape annotated as one crowd segment); thin "wires" and unlabelled
clutter make about 2 % void pixels; lighting gradients, blur and noise are applied last.

Each image is drawn from its own NumPy generator seeded by ``(seed, split, index)``, so the files are
byte-identical for a seed (given the same Pillow / zlib / libjpeg) and any image can be regenerated alone.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from remax.data.io import label_stats, write_json, write_panoptic_png

__all__ = ["THING_CLASSES", "STUFF_CLASSES", "synthetic_categories", "render_scene", "write_synthetic_dataset",
           "ensure_synthetic_dataset"]

log = logging.getLogger(__name__)

THING_CLASSES = ("circle", "square", "triangle", "star", "ring")
STUFF_CLASSES = ("sky", "grass", "water", "sand")
_SPLITS = ("train", "val")
_MAX_THINGS = 12
_MIN_THING_PIXELS = 12  # visible fragments smaller than this become void (too small to segment at stride 4)
_JPEG_QUALITY = 92

# Display colours of the categories (the rendered things have random colours).
_CATEGORY_COLOURS = [(220, 20, 60), (255, 140, 0), (60, 180, 75), (145, 30, 180), (0, 130, 200),
                     (135, 206, 235), (34, 139, 34), (0, 90, 160), (237, 201, 175)]


def synthetic_categories() -> list[dict[str, Any]]:
    """COCO-panoptic categories: ids 1–5 the things, 6–9 the stuff classes."""
    names = list(THING_CLASSES) + list(STUFF_CLASSES)
    return [{"id": k + 1, "name": n, "supercategory": "shape" if k < len(THING_CLASSES) else "region",
             "isthing": int(k < len(THING_CLASSES)), "color": list(_CATEGORY_COLOURS[k])} for k, n in enumerate(names)]


def _upsample(coarse: np.ndarray, size: int, resample: int = Image.Resampling.BICUBIC) -> np.ndarray:
    """Upsample a float32 grid to ``size×size`` (or ``(size, height)`` for anisotropic grids)."""
    return np.asarray(Image.fromarray(coarse.astype(np.float32), mode="F").resize((size, size), resample))


def _stuff_layout(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[int]]:
    """Per-pixel stuff class (0..3) and the classes present.

    Each present class gets a smooth random field with two octaves (4×4 and 11×11 grids) plus a vertical prior (sky
    high, water and sand low), and every pixel takes the class of the largest field: irregular, landscape-like
    regions.
    """
    n = int(rng.integers(1, len(STUFF_CLASSES) + 1))
    present = np.sort(rng.choice(len(STUFF_CLASSES), size=n, replace=False)).tolist()
    t = (np.arange(size, dtype=np.float32) / size)[:, None]
    prior = {0: 1.6 * (0.35 - t), 1: 0.0 * t, 2: 1.0 * (t - 0.55), 3: 1.0 * (t - 0.6)}
    best = np.full((size, size), -np.inf, dtype=np.float32)
    label = np.zeros((size, size), dtype=np.int64)
    for c in present:
        coarse = rng.standard_normal((4, 4)).astype(np.float32)
        grid = np.asarray(Image.fromarray(coarse, mode="F").resize((11, 11), Image.Resampling.BICUBIC))
        grid = grid + 0.45 * rng.standard_normal((11, 11)).astype(np.float32)
        f = _upsample(grid, size) + prior[c]
        better = f > best
        np.copyto(best, f, where=better)
        label[better] = c
    return label, present


def _stuff_texture(rng: np.random.Generator, c: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Base colour (3,) and ``size×size`` brightness texture of stuff class ``c``.

    sky: smooth vertical gradient; grass: vertical blade streaks; water: horizontal ripples; sand: fine speckle.
    """
    y = np.arange(size, dtype=np.float32)[:, None] / size
    x = np.arange(size, dtype=np.float32)[None, :] / size
    if c == 0:  # sky
        base = np.array([rng.uniform(80, 150), rng.uniform(140, 200), rng.uniform(205, 255)], np.float32)
        shade = np.broadcast_to((y - 0.5) * np.float32(rng.uniform(30, 70)), (size, size))
    elif c == 1:  # grass
        base = np.array([rng.uniform(40, 100), rng.uniform(110, 175), rng.uniform(25, 75)], np.float32)
        streaks = rng.standard_normal((max(2, size // 8), size)).astype(np.float32)
        shade = 26 * np.asarray(Image.fromarray(streaks, mode="F").resize((size, size), Image.Resampling.BILINEAR))
    elif c == 2:  # water
        base = np.array([rng.uniform(15, 70), rng.uniform(80, 140), rng.uniform(140, 205)], np.float32)
        wavelength = rng.uniform(5, 9) / 256.0
        phase = rng.uniform(0, 2 * math.pi)
        wobble = 0.9 * np.sin(2 * math.pi * x / rng.uniform(0.15, 0.3) + rng.uniform(0, 2 * math.pi))
        shade = 24 * np.sin(2 * math.pi * y / wavelength + phase + wobble)
    else:  # sand
        base = np.array([rng.uniform(185, 235), rng.uniform(155, 200), rng.uniform(105, 150)], np.float32)
        shade = 22 * rng.standard_normal((size, size), dtype=np.float32) \
            + 10 * _upsample(rng.standard_normal((6, 6)), size)
    return base, shade.astype(np.float32, copy=False)


def _shape_mask(kind: int, diameter: float, angle: float) -> np.ndarray:
    """Binary mask of one shape with circumscribed diameter ``diameter`` rotated by ``angle`` (bbox-sized)."""
    side = int(math.ceil(diameter)) + 2
    c = side / 2.0
    r = diameter / 2.0
    im = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(im)
    if kind == 0:  # circle
        draw.ellipse([c - r, c - r, c + r, c + r], fill=255)
    elif kind == 4:  # ring
        draw.ellipse([c - r, c - r, c + r, c + r], fill=255)
        ri = 0.5 * r
        draw.ellipse([c - ri, c - ri, c + ri, c + ri], fill=0)
    else:
        if kind == 1:  # square
            radii, count = [r], 4
        elif kind == 2:  # triangle
            radii, count = [r], 3
        else:  # star: 5 points, inner radius 0.42 r
            radii, count = [r, 0.42 * r], 10
        pts = []
        for k in range(count):
            a = angle + 2 * math.pi * k / count
            rr = radii[k % len(radii)]
            pts.append((c + rr * math.cos(a), c + rr * math.sin(a)))
        draw.polygon(pts, fill=255)
    return np.asarray(im) > 127


def _place(mask: np.ndarray, cy: float, cx: float, size: int) -> tuple[np.ndarray, tuple[slice, slice]] | None:
    """Clip a bbox-sized mask centred at (cy, cx) to the canvas: (clipped mask, canvas slices) or None."""
    h, w = mask.shape
    y0, x0 = int(round(cy - h / 2)), int(round(cx - w / 2))
    ya, xa = max(0, y0), max(0, x0)
    yb, xb = min(size, y0 + h), min(size, x0 + w)
    if ya >= yb or xa >= xb:
        return None
    return mask[ya - y0:yb - y0, xa - x0:xb - x0], (slice(ya, yb), slice(xa, xb))


def _thing_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour, re-drawn a few times if it is too close to the stuff under the shape."""
    colour = rng.uniform(0, 255, 3).astype(np.float32)
    for _ in range(4):
        if np.abs(colour - background).sum() > 90:
            break
        colour = rng.uniform(0, 255, 3).astype(np.float32)
    return colour


def _paint(image: np.ndarray, mask: np.ndarray, where: tuple[slice, slice], colour: np.ndarray,
           rng: np.random.Generator) -> None:
    """Fill a shape with its colour plus a faint linear shading (so it is not perfectly flat)."""
    h, w = mask.shape
    a = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(a) * np.arange(w, dtype=np.float32)[None, :] + np.sin(a) * np.arange(h, dtype=np.float32)[:, None])
    ramp = 18 * ramp / max(h, w, 1)
    region = image[where]
    region[mask] = colour[None, :] + ramp[mask][:, None]


def render_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """One scene: uint8 ``size×size×3`` image, int64 segment-id map (0 = void) and its ``segments_info``."""
    # Stuff: base colour per class plus a per-pixel brightness texture.
    stuff, present = _stuff_layout(rng, size)
    n_things = len(THING_CLASSES)
    base_lut = np.zeros((len(STUFF_CLASSES), 3), np.float32)
    shade = np.zeros((size, size), np.float32)
    bases = {}
    for c in present:
        bases[c], tex = _stuff_texture(rng, c, size)
        base_lut[c] = bases[c]
        np.copyto(shade, tex, where=stuff == c)
    image = base_lut[stuff]
    image += shade[:, :, None]
    # Segments as small labels (0 = void, 1..4 = stuff classes, then crowd and things): cheap to paint and count.
    table: list[tuple[int, int]] = [(0, 0)] + [(n_things + c + 1, 0) for c in range(len(STUFF_CLASSES))]
    lab = (stuff + 1).astype(np.uint8)

    def new_label(cat: int, crowd: int) -> int:
        table.append((cat, crowd))
        return len(table) - 1

    min_d = min(10.0, size / 3.0)
    max_d = size / 3.0
    # A crowd region: a tight cluster of one small shape, annotated as one segment.
    if rng.random() < 0.3:
        kind = int(rng.integers(0, n_things))
        cy, cx = rng.uniform(0.15 * size, 0.85 * size, 2)
        d = max(6.0, min(12.0, size / 10.0))
        sid = new_label(kind + 1, 1)
        for _ in range(int(rng.integers(5, 10))):
            dy, dx = rng.normal(0.0, 0.9 * d, 2)
            placed = _place(_shape_mask(kind, d * rng.uniform(0.8, 1.2), rng.uniform(0, 2 * math.pi)),
                            cy + dy, cx + dx, size)
            if placed is None:
                continue
            m, where = placed
            _paint(image, m, where, _thing_colour(rng, bases[int(stuff[int(cy), int(cx)])]), rng)
            lab[where][m] = sid
    # Things, drawn back to front.
    for _ in range(int(rng.integers(0, _MAX_THINGS + 1))):
        kind = int(rng.integers(0, n_things))
        d = float(math.exp(rng.uniform(math.log(min_d), math.log(max_d))))
        cy, cx = rng.uniform(0, size, 2)
        placed = _place(_shape_mask(kind, d, rng.uniform(0, 2 * math.pi)), cy, cx, size)
        if placed is None:
            continue
        m, where = placed
        colour = _thing_colour(rng, bases[int(stuff[min(int(cy), size - 1), min(int(cx), size - 1)])])
        _paint(image, m, where, colour, rng)
        lab[where][m] = new_label(kind + 1, 0)
    # Void: unlabelled clutter (an irregular blob) and thin wires across the scene.
    void = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(void)
    if rng.random() < 0.5:
        cy, cx = rng.uniform(0, size, 2)
        r = size / 10.0
        k = int(rng.integers(6, 10))
        angles = np.sort(rng.uniform(0, 2 * math.pi, k))
        radii = r * rng.uniform(0.4, 1.0, k)
        draw.polygon([(cx + q * math.cos(a), cy + q * math.sin(a)) for a, q in zip(angles, radii)], fill=1)
        clutter = np.asarray(void) > 0
        image[clutter] = rng.uniform(0, 255, 3).astype(np.float32)
    wire_draw = []
    for _ in range(int(rng.integers(1, 4))):
        p0 = rng.uniform(0, size, 2)
        p2 = rng.uniform(0, size, 2)
        p0[int(rng.integers(0, 2))] = 0.0  # start on the top or left border
        p1 = (p0 + p2) / 2 + rng.normal(0, size / 6, 2)
        ts = np.linspace(0, 1, 24)[:, None]
        curve = (1 - ts) ** 2 * p0 + 2 * (1 - ts) * ts * p1 + ts**2 * p2
        width = int(max(1, round(size / 128 * rng.uniform(1.0, 2.0))))
        pts = [(float(px), float(py)) for px, py in curve]
        draw.line(pts, fill=1, width=width)
        wire_draw.append((pts, width, tuple(int(v) for v in rng.uniform(10, 70, 3))))
    void_mask = np.asarray(void) > 0
    # Lighting gradient, wires, blur, noise.
    a = rng.uniform(0, 2 * math.pi)
    strength = rng.uniform(0.0, 0.5)
    coords = (np.cos(a) * np.arange(size, dtype=np.float32)[None, :]
              + np.sin(a) * np.arange(size, dtype=np.float32)[:, None]) / size
    light = 1.0 + strength * (coords - coords.mean())
    image *= light[:, :, None]
    img_pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="RGB")
    wires = ImageDraw.Draw(img_pil)
    for pts, width, colour in wire_draw:
        wires.line(pts, fill=colour, width=width)
    # Blur: a 3×3 kernel whose centre weight sets the strength (PIL's Gaussian is several times slower).
    centre = float(rng.uniform(1.0, 8.0))
    img_pil = img_pil.filter(ImageFilter.Kernel((3, 3), [1, 2, 1, 2, 2 * centre, 2, 1, 2, 1]))
    noisy = np.asarray(img_pil, dtype=np.float32)
    noisy += rng.standard_normal((size, size, 3), dtype=np.float32) * np.float32(rng.uniform(2.0, 7.0))
    out_image = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)

    lab[void_mask] = 0
    counts, boxes = label_stats(lab, len(table))
    # Segment ids: category · 1000 + running number per category (stuff: category · 1000 + 1).
    lut = np.zeros(len(table), np.int64)
    running = dict.fromkeys(range(1, n_things + len(STUFF_CLASSES) + 1), 0)
    segments = []
    for k in range(1, len(table)):
        cat, crowd = table[k]
        if counts[k] == 0 or (cat <= n_things and not crowd and counts[k] < _MIN_THING_PIXELS):
            continue  # absent, or a sliver too small to segment: void
        running[cat] += 1
        lut[k] = cat * 1000 + running[cat]
        segments.append({"id": int(lut[k]), "category_id": cat, "area": int(counts[k]),
                         "bbox": [int(b) for b in boxes[k]], "iscrowd": crowd})
    segments.sort(key=lambda s: s["id"])
    ids = lut[lab]
    return out_image, ids, segments


def _image_seed(seed: int, split: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, split, index]))


def write_synthetic_dataset(root: str | os.PathLike[str], num_train: int, num_val: int, size: int = 256,
                            seed: int = 0, image_format: str = "jpg",
                            progress: Callable[[int], Any] | None = None) -> Path:
    """Write the synthetic data set to ``root`` in COCO layout (splits ``train`` and ``val``); returns ``root``.

    ``progress(1)`` is called after every image. Equal arguments give byte-identical files.
    """
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    root = Path(root)
    categories = synthetic_categories()
    for split_index, (split, count) in enumerate(zip(_SPLITS, (num_train, num_val))):
        image_dir = root / split
        png_dir = root / "annotations" / f"panoptic_{split}"
        image_dir.mkdir(parents=True, exist_ok=True)
        png_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            image, ids, segments = render_scene(_image_seed(seed, split_index, i), size)
            name = f"{i:06d}"
            file_name = f"{name}.{image_format}"
            pil = Image.fromarray(image, mode="RGB")
            if image_format == "jpg":
                pil.save(image_dir / file_name, format="JPEG", quality=_JPEG_QUALITY)
            else:
                pil.save(image_dir / file_name, format="PNG", compress_level=1)
            write_panoptic_png(png_dir / f"{name}.png", ids)
            images.append({"id": i, "file_name": file_name, "height": size, "width": size})
            annotations.append({"image_id": i, "file_name": f"{name}.png", "segments_info": segments})
            if progress is not None:
                progress(1)
        write_json(root / "annotations" / f"panoptic_{split}.json",
                   {"info": {"description": "remax synthetic panoptic data set", "seed": seed, "size": size},
                    "images": images, "annotations": annotations, "categories": categories})
    log.info("wrote %d train and %d val synthetic images to %s", num_train, num_val, root)
    return root


def ensure_synthetic_dataset(data_cfg: Any, progress: Callable[[int], Any] | None = None) -> Path:
    """Write ``data_cfg``'s synthetic data set to ``data_cfg.root`` (default ``data/synthetic``) unless present.

    The set is written to a temporary sibling folder and renamed into place, so an interrupted run never leaves
    half a data set behind. Sets ``data_cfg.root`` when it was empty.
    """
    if not data_cfg.root:
        data_cfg.root = "data/synthetic"
    root = Path(data_cfg.root)
    ann = root / "annotations"
    if (ann / "panoptic_train.json").is_file() and (ann / "panoptic_val.json").is_file():
        log.info("using the synthetic data set already at %s (delete it to regenerate with other data.synth_*)",
                 root)
        return root
    if root.exists() and any(root.iterdir()):
        from remax.data.coco_panoptic import DatasetError

        raise DatasetError(f"{root} exists but holds no synthetic data set (no annotations/panoptic_train.json and "
                           f"panoptic_val.json); remove it or set data.root to another folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    log.info("writing the synthetic data set (%d train, %d val, %d px) to %s", data_cfg.synth_train,
             data_cfg.synth_val, data_cfg.synth_size, root)
    try:
        write_synthetic_dataset(tmp, data_cfg.synth_train, data_cfg.synth_val, size=data_cfg.synth_size,
                                seed=data_cfg.synth_seed, progress=progress)
        if root.exists():
            root.rmdir()  # empty (checked above)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
