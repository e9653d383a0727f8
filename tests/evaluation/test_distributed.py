"""A 2-process gloo run (each rank half the images, then all_reduce) equals the single-process result."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pq_fixtures import CATEGORIES, random_cases

from remax.evaluation import ConfusionMatrix, PanopticQuality


def _worker(rank: int, world_size: int, init_file: str, cases, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        pq = PanopticQuality(CATEGORIES)
        cm = ConfusionMatrix(4, ignore_index=255)
        for gt, gt_segs, pred, pred_segs in cases[rank::world_size]:
            pq.update(gt, gt_segs, pred, pred_segs)
            cm.update(np.where(gt > 0, gt % 4, 255), pred % 5)
        pq.all_reduce()
        cm.all_reduce()
        torch.save({"pq": pq.state_dict(), "cm": cm.state_dict()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_all_reduce_equals_single_process(tmp_path):
    cases = random_cases(10, seed=5)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), cases, str(tmp_path)), nprocs=2, join=True)

    single = PanopticQuality(CATEGORIES)
    cm = ConfusionMatrix(4, ignore_index=255)
    for gt, gt_segs, pred, pred_segs in cases:
        single.update(gt, gt_segs, pred, pred_segs)
        cm.update(np.where(gt > 0, gt % 4, 255), pred % 5)
    expected = single.compute()
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        reduced = PanopticQuality(CATEGORIES)
        reduced.load_state_dict(state["pq"])
        assert reduced.num_images == 10
        assert np.array_equal(reduced.tp, single.tp)
        assert np.array_equal(reduced.fp, single.fp)
        assert np.array_equal(reduced.fn, single.fn)
        np.testing.assert_allclose(reduced.iou, single.iou, rtol=1e-12, atol=0)
        got = reduced.compute()
        for split in ("All", "Things", "Stuff"):
            for k in ("pq", "sq", "rq", "n"):
                assert abs(got[split][k] - expected[split][k]) <= 1e-12
        assert np.array_equal(state["cm"]["matrix"].numpy(), cm.matrix)
    assert single.tp.sum() > 0 and cm.matrix.sum() > 0


def test_all_reduce_without_process_group_is_a_no_op():
    pq = PanopticQuality(CATEGORIES)
    assert pq.all_reduce() is pq and pq.num_images == 0
