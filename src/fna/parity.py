"""How far an exported model's outputs are from PyTorch's: one number per input, read against a
tolerance that means a fraction of each output's scale (see :mod:`fna.export`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Parity:
    """How the exported model's outputs on one input differ from PyTorch's."""

    diff: float  # compared with the tolerance
    unmatched: int  # detections without a counterpart (always 0 for segmentation)
    summary: str
    shape: tuple[int, ...] = ()  # the input's

    def ok(self, tolerance: float) -> bool:
        return self.diff <= tolerance and self.unmatched == 0


def compare_segmentation(ref: np.ndarray, got: np.ndarray) -> Parity:
    """Max absolute logit difference relative to the largest |logit| (at least 1); argmax agreement too."""
    if ref.shape != got.shape:
        return Parity(float("inf"), 0, f"logits shape {got.shape}, PyTorch {ref.shape}")
    diff, scale = float(np.abs(ref - got).max()), max(1.0, float(np.abs(ref).max()))
    agree = float((ref.argmax(1) == got.argmax(1)).mean())
    return Parity(diff / scale, 0, f"logits max |Δ| {diff:.2e} = {diff / scale:.2e} of the largest |logit| "
                                   f"{scale:.2f}, argmax agreement {agree:.4%}")


def compare_detections(ref: list[np.ndarray], got: list[np.ndarray], side: int, tolerance: float) -> Parity:
    """Match detections (same label, score within ``tolerance``, closest box), then the worst differences.

    ``ref``/``got`` are ``[boxes, scores, labels]``; box differences are divided by ``side`` (the image's
    longer side) so one tolerance serves scores and boxes. Greedy in PyTorch's score order.
    """
    (rb, rs, rl), (gb, gs, gl) = ref, got
    used = np.zeros(len(gs), dtype=bool)
    box_diff = score_diff = 0.0
    unmatched = 0
    for i in np.argsort(-rs, kind="stable"):
        cand = np.flatnonzero(~used & (gl == rl[i]) & (np.abs(gs - rs[i]) <= tolerance))
        if len(cand) == 0:
            unmatched += 1
            continue
        corner = np.abs(gb[cand] - rb[i]).max(axis=1)
        j = cand[corner.argmin()]
        used[j] = True
        box_diff = max(box_diff, float(corner.min()))
        score_diff = max(score_diff, float(abs(gs[j] - rs[i])))
    unmatched += int((~used).sum())
    diff = max(score_diff, box_diff / side)
    text = (f"{len(rs)} detections (exported {len(gs)}), scores max |Δ| {score_diff:.2e}, boxes max |Δ| "
            f"{box_diff:.2e} px = {box_diff / side:.2e} of the image side")
    if unmatched:
        text += f", {unmatched} without a counterpart (same label, score within the tolerance)"
    return Parity(diff, unmatched, text)
