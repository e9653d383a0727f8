"""Post-processing before / after: the full-resolution merge (every query upsampled to the image, softmax over
all of them, :func:`panoptic_postprocess`) against the Predictor's low-resolution merge, on the same network
outputs. Reports latency (median over images and repeats), peak memory above the outputs (process RSS), and whether
the id maps and segments are identical.

    python benchmarks/postprocess_speed.py --checkpoint C --images DIR --size 640 [--threads 2] [--limit 20]
        [--set eval.stuff_threshold=0.1 ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from remax.engine.benchmark import BenchSettings, MemoryProbe, _release_freed_memory, bench_images
from remax.export import load_for_export
from remax.inference.postprocess import panoptic_postprocess
from remax.inference.predictor import Predictor, mask_logits_to_image


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--limit", type=int, default=10, help="images")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. eval.stuff_threshold=0.1 (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    side = ((args.size - 1 + 31) // 32) * 32 + 1
    model, cfg, categories = load_for_export(args.checkpoint, [f"model.input_size=[{side},{side}]", *args.overrides])
    predictor = Predictor(model, cfg, categories, semantic=False, instances=False)
    s = BenchSettings(batch=args.limit, images=args.images)
    images = [im.permute(2, 0, 1).contiguous() for im in bench_images(s, args.size)]
    outputs = []
    with torch.inference_mode():
        for img in images:
            out, sizes = predictor.forward_batch([img])
            outputs.append((out["pred_logits"][0], out["pred_masks"][0], sizes[0], tuple(img.shape[1:])))

    def old(o):
        logits, masks, valid, original = o
        full = mask_logits_to_image(masks, predictor.input_size, valid, original)
        return panoptic_postprocess(logits.float(), full, predictor.is_thing, cfg.eval)

    def new(o):
        logits, masks, valid, original = o
        return predictor.postprocess_batch(logits[None], masks[None], [valid], [original])[0]

    report = {}
    with torch.inference_mode():
        for name, fn in (("before (full resolution)", old), ("after (low resolution)", new)):
            fn(outputs[0])
            times, peaks = [], []
            for o in outputs:
                for _ in range(args.repeats):
                    probe = MemoryProbe(torch.device("cpu"))
                    probe.start()
                    t0 = time.perf_counter()
                    fn(o)
                    times.append((time.perf_counter() - t0) * 1000)
                    peaks.append(probe.stop()[0])
                    _release_freed_memory()
            report[name] = (statistics.median(times), max(peaks))
        identical = 0
        segments = 0
        for o in outputs:
            a, b = old(o), new(o)
            segments += len(a.segments_info)
            same = torch.equal(a.id_map, b.id_map) and [(s["category_id"], s["area"]) for s in a.segments_info] == \
                [(s["label"], s["area"]) for s in b.segments_info]  # the Predictor maps labels to data-set ids
            identical += int(same)
    print(f"checkpoint {args.checkpoint} {' '.join(args.overrides)}; {len(outputs)} images from {args.images} at "
          f"{args.size}²; {args.threads} threads; {segments / len(outputs):.1f} segments per image")
    for name, (ms, mb) in report.items():
        print(f"{name:<26} median {ms:8.1f} ms   peak +{mb:6.0f} MiB")
    print(f"identical id maps and segments: {identical}/{len(outputs)}")
    return 0 if identical == len(outputs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
