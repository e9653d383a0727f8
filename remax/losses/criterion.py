"""The full training objective: kMaX-DeepLab losses with deep supervision, plus the ReMaX relaxations.

``L = Σ_{o ∈ final, aux_0..} [w_cls·L_cls(o) + w_dice·L_dice(o) + w_id·L_maskID(o) + w_ins·L_insdis(o)]
      + w_sem·L_sem + Σ_{relaxed stage i} w_remask·L_sem(stage i)``

The Hungarian matching is computed once on the final (unrelaxed) output and shared, together with its PQ-style
weights, by every auxiliary output (kMaX-DeepLab's deep supervision). A relaxed stage's mask terms use ``m̃``: the
model's own ``pred_masks`` when ReMask runs in the decoder (``remax.remask_in_decoder``, the default; the raw
logits then come as ``pred_masks_raw`` for ReClass), or ``m̃`` formed here from the stage's semantic logits in the
loss-only reading. Everything runs in fp32 with autocast disabled. The mask terms see the logits at their own
stride-4 grid, or upsampled bilinearly when ``loss.mask_loss_stride`` is finer; instance discrimination and the
semantic terms always use their heads' own resolution.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from remax.config import LossConfig, RemaxConfig
from remax.losses import mask_id as mask_id_mod
from remax.losses import relaxations
from remax.losses.instance_discrimination import gumbel_topk_pixels, instance_discrimination_loss
from remax.losses.mask_id import mask_id_loss
from remax.losses.matcher import Matching, hungarian_match
from remax.losses.pq_style import PQWeights, one_hot_class_targets, pq_loss_weights, pq_style_loss
from remax.losses.relaxations import reclass_targets, remask
from remax.losses.semantic import semantic_loss
from remax.losses.targets import DenseTargets, build_dense_targets, supervision_size
from remax.structures import PanopticTarget

logger = logging.getLogger(__name__)


class SetCriterion:
    """``SetCriterion(loss_cfg, remax_cfg, num_classes)(outputs, targets) -> (total, breakdown)``.

    ``breakdown`` maps every *weighted* term to a float, so that the terms sum to ``loss_total``:
    ``loss_pq_class/final``, ``loss_pq_dice/aux0``, ``loss_mask_id/…``, ``loss_instance_discrimination/…``,
    ``loss_semantic``, ``loss_remask_semantic/0``, …
    """

    def __init__(
        self,
        loss_cfg: LossConfig,
        remax_cfg: RemaxConfig,
        num_classes: int,
        generator: torch.Generator | None = None,
    ) -> None:
        self.loss_cfg = loss_cfg
        self.remax_cfg = remax_cfg
        self.num_classes = num_classes
        self.generator = generator
        on = remax_cfg.enabled
        self.mask_id_activation = remax_cfg.mask_id_activation if on else loss_cfg.mask_id_activation
        self.use_remask = on and remax_cfg.remask and remax_cfg.remask_stages > 0
        self.use_reclass = on and remax_cfg.reclass
        if self.mask_id_activation not in mask_id_mod.ACTIVATIONS:
            raise ValueError(f"mask_id_activation must be one of {mask_id_mod.ACTIVATIONS}, "
                             f"got {self.mask_id_activation!r}")
        if loss_cfg.mask_id_sigmoid_reduction not in mask_id_mod.SIGMOID_REDUCTIONS:
            raise ValueError(f"loss.mask_id_sigmoid_reduction must be one of {mask_id_mod.SIGMOID_REDUCTIONS}, "
                             f"got {loss_cfg.mask_id_sigmoid_reduction!r}")
        for name in ("remask_activation", "reclass_activation"):
            if getattr(remax_cfg, name) not in relaxations.ACTIVATIONS:
                raise ValueError(f"remax.{name} must be one of {relaxations.ACTIVATIONS}, "
                                 f"got {getattr(remax_cfg, name)!r}")
        self._warned = False

    def __call__(self, outputs: dict[str, Any], targets: list[PanopticTarget]) -> tuple[Tensor, dict[str, float]]:
        device = outputs["pred_masks"].device
        with torch.autocast(device_type=device.type, enabled=False):
            terms = self.loss_terms(outputs, targets)
        total = torch.stack(list(terms.values())).sum() if terms else outputs["pred_masks"].new_zeros(()).float()
        values = torch.stack([total.detach()] + [t.detach() for t in terms.values()]).tolist() if terms else [0.0]
        breakdown = dict(zip(terms.keys(), values[1:]))
        breakdown["loss_total"] = values[0]
        return total, breakdown

    # ----------------------------------------------------------------------------------------------------------

    def _relaxed_stages(self, heads: list[tuple[str, dict[str, Any]]], sem_stage_logits: list[Tensor]) -> int:
        """How many leading auxiliary outputs are relaxed: by the model (ReMask in the decoder, their outputs
        carry ``pred_masks_raw``) or here (the loss-only reading)."""
        rcfg = self.remax_cfg
        n_aux = len(heads) - 1
        by_model = 0
        while by_model < n_aux and "pred_masks_raw" in heads[by_model + 1][1]:
            by_model += 1
        in_decoder = self.use_remask and rcfg.remask_in_decoder
        if by_model and not in_decoder:
            raise ValueError("the model applied ReMask in its decoder, but this objective does not ask for it "
                             "(remax.enabled, remax.remask and remax.remask_in_decoder must all be true); build "
                             "the model with ReMaskOptions.from_config(cfg.remax)")
        if not self.use_remask:
            return 0
        wanted = min(rcfg.remask_stages, n_aux)
        if in_decoder:
            if by_model < wanted and not self._warned:
                logger.warning("ReMask in the decoder asks for %d relaxed stages but the model relaxed %d; build "
                               "it with ReMaskOptions.from_config(cfg.remax) and its training heads", wanted,
                               by_model)
                self._warned = True
            return by_model
        if not rcfg.remask_use_gt and len(sem_stage_logits) < wanted:
            if not self._warned:
                logger.warning("ReMask asks for %d relaxed stages but the model gives %d per-stage semantic "
                               "heads; relaxing %d", wanted, len(sem_stage_logits), len(sem_stage_logits))
                self._warned = True
            return len(sem_stage_logits)
        return wanted

    def loss_terms(self, outputs: dict[str, Any], targets: list[PanopticTarget]) -> dict[str, Tensor]:
        """Every weighted loss term as a 0-d fp32 tensor (call under ``autocast(enabled=False)``)."""
        cfg, rcfg, K = self.loss_cfg, self.remax_cfg, self.num_classes
        pred_masks = outputs["pred_masks"]
        B, N, h, w = pred_masks.shape
        if len(targets) != B:
            raise ValueError(f"got {len(targets)} targets for a batch of {B} predictions")
        if outputs["pred_logits"].shape[-1] != K + 1:
            raise ValueError(f"pred_logits have {outputs['pred_logits'].shape[-1]} classes, expected "
                             f"num_classes + 1 = {K + 1} (void last)")
        dense = build_dense_targets(targets, (h, w), K, device=pred_masks.device)
        dense_by_size: dict[tuple[int, int], DenseTargets] = {(h, w): dense}

        def dense_at(size: tuple[int, int]) -> DenseTargets:
            if size not in dense_by_size:
                dense_by_size[size] = build_dense_targets(targets, size, K, device=pred_masks.device)
            return dense_by_size[size]

        # Mask terms: at the logits' grid (kMaX), or on logits upsampled to a finer loss stride.
        sup_size, align = (h, w), True
        if B:
            sup_size, align = supervision_size(tuple(targets[0].id_map.shape), (h, w), cfg.mask_loss_stride)
        sup = dense_at(sup_size)

        def at_loss_grid(x: Tensor) -> Tensor:
            """B×C×h×w logits -> B×C×P at the supervision size."""
            if sup_size != (h, w):
                x = F.interpolate(x, size=sup_size, mode="bilinear", align_corners=align)
            return x.flatten(2)

        heads: list[tuple[str, dict[str, Any]]] = [("final", outputs)]
        if cfg.deep_supervision:
            heads += [(f"aux{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []) or [])]

        sem_stage_logits = list(outputs.get("remask_semantic_logits", []) or [])
        n_relaxed = self._relaxed_stages(heads, sem_stage_logits)
        in_decoder = self.use_remask and rcfg.remask_in_decoder

        terms: dict[str, Tensor] = {}
        insdis_on = cfg.instance_discrimination_weight > 0
        samples = None
        if insdis_on:
            samples = gumbel_topk_pixels(dense, cfg.instance_discrimination_sample_k,
                                         cfg.instance_discrimination_sample_temperature, self.generator)
        gt_semantic = sup.semantic() if (n_relaxed and rcfg.remask_use_gt and not in_decoder) else None

        final_matching: Matching | None = None
        final_weights: PQWeights | None = None
        for idx, (name, out) in enumerate(heads):
            logits = out["pred_logits"].float()
            if tuple(out["pred_masks"].shape) != (B, N, h, w):
                raise ValueError(f"{name}: pred_masks of shape {tuple(out['pred_masks'].shape)}, expected "
                                 f"{(B, N, h, w)} (auxiliary outputs must be upsampled to the final mask size)")
            masks = at_loss_grid(out["pred_masks"].float())  # B×N×P
            raw_masks = masks
            stage = idx - 1  # aux_outputs[i] is decoder stage i
            if 0 <= stage < n_relaxed:
                if in_decoder:  # the model relaxed the stage: its pred_masks are m̃
                    raw_masks = at_loss_grid(out["pred_masks_raw"].float())
                else:
                    sem = None
                    if gt_semantic is None:
                        sem = sem_stage_logits[stage].float()
                        if tuple(sem.shape[-2:]) != (h, w):
                            raise ValueError(f"remask_semantic_logits[{stage}] has size {tuple(sem.shape[-2:])}, "
                                             f"expected the mask size {(h, w)}")
                        sem = at_loss_grid(sem)
                    masks = remask(raw_masks, logits, sem, rcfg.remask_activation, rcfg.remask_stop_gradient,
                                   rcfg.remask_detach_class, gt_semantic)
            log_probs = torch.log_softmax(masks, dim=1)
            probs = log_probs.exp()
            # The reference matches the final output only and reuses its assignment *and* its PQ-style weights
            # (matched Dice, void overlap, matched class probability) for every auxiliary output.
            if final_matching is None or not cfg.share_final_matching:
                matching = hungarian_match(logits, probs, sup)
                weights = pq_loss_weights(logits, probs, sup, matching, cfg.pq_alpha)
                if final_matching is None:
                    final_matching, final_weights = matching, weights
            else:
                matching, weights = final_matching, final_weights

            class_targets = one_hot_class_targets(matching, sup, K + 1)
            if self.use_reclass:
                class_targets = reclass_targets(class_targets, raw_masks, sup, matching, rcfg.reclass_eta,
                                                rcfg.reclass_activation, rcfg.reclass_unmatched,
                                                rcfg.reclass_normalize)
            if cfg.pq_class_weight > 0 or cfg.pq_dice_weight > 0:
                cls_loss, dice_loss = pq_style_loss(logits, probs, sup, matching, cfg.pq_alpha, class_targets,
                                                    weights)
                if cfg.pq_class_weight > 0:
                    terms[f"loss_pq_class/{name}"] = cfg.pq_class_weight * cls_loss
                if cfg.pq_dice_weight > 0:
                    terms[f"loss_pq_dice/{name}"] = cfg.pq_dice_weight * dice_loss
            if cfg.mask_id_weight > 0:
                terms[f"loss_mask_id/{name}"] = cfg.mask_id_weight * mask_id_loss(
                    masks, sup, matching, self.mask_id_activation, cfg.mask_id_sigmoid_reduction, log_probs)
            if insdis_on:
                if out.get("pixel_embeddings") is None:
                    raise ValueError(f"{name}: outputs lack 'pixel_embeddings' needed by instance discrimination; "
                                     "build the model with with_training_heads=True (train mode) or set "
                                     "loss.instance_discrimination_weight=0")
                terms[f"loss_instance_discrimination/{name}"] = cfg.instance_discrimination_weight * (
                    instance_discrimination_loss(out["pixel_embeddings"], dense,
                                                 temperature=cfg.instance_discrimination_temperature,
                                                 samples=samples))

        sem_logits = outputs.get("semantic_logits")
        if sem_logits is not None and cfg.semantic_weight > 0:
            terms["loss_semantic"] = cfg.semantic_weight * semantic_loss(
                sem_logits, dense_at(tuple(sem_logits.shape[-2:])), cfg.semantic_sample_k,
                cfg.semantic_sample_temperature, self.generator)
        if n_relaxed and not rcfg.remask_use_gt and rcfg.remask_semantic_weight > 0:
            for i in range(n_relaxed):
                terms[f"loss_remask_semantic/{i}"] = rcfg.remask_semantic_weight * semantic_loss(
                    sem_stage_logits[i], dense, cfg.semantic_sample_k, cfg.semantic_sample_temperature,
                    self.generator)
        return terms
