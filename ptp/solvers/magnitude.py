"""Magnitude pruning: the baseline that ignores the data."""

from __future__ import annotations

import torch

from ..config import Sparsity
from .masks import mask_from_score


def magnitude(weight: torch.Tensor, sparsity: Sparsity) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the smallest |W|: across the whole layer when unstructured, per group when N:M.

    weight: [out, in]. Returns (pruned weight in weight's dtype, keep mask [out, in]).
    """
    keep = mask_from_score(weight.float().abs(), sparsity, per_row=False)
    return weight * keep, keep
