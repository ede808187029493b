"""The search's 50/50 split of the training set by image (SPEC §4)."""

from __future__ import annotations

import torch


def split_by_image(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Split ``range(n)`` into two disjoint halves at random, deterministically from ``seed``.

    The first half (``ceil(n/2)`` indices) feeds weight steps, the second architecture steps; each is
    sorted. Wrap with :class:`torch.utils.data.Subset`.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    half = (n + 1) // 2
    return sorted(order[:half]), sorted(order[half:])
