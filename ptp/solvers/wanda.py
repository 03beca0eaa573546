"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models")."""

from __future__ import annotations

import torch

from ..config import Sparsity
from .masks import mask_from_score


def wanda(weight: torch.Tensor, input_norm: torch.Tensor, sparsity: Sparsity) -> tuple[torch.Tensor, torch.Tensor]:
    """Score S_ij = |W_ij| * ||X_j||_2 (paper, Eq. 1) and keep the highest scores.

    weight: [out, in]. input_norm: [in], the L2 norm of each input feature over all calibration
    tokens (not its square: the square over-weights outlier features).
    Unstructured sparsity compares weights within each output row, as the paper does; N:M within
    each group of M inputs. Returns (pruned weight in weight's dtype, keep mask [out, in]).
    """
    score = weight.float().abs() * input_norm.float().unsqueeze(0)
    keep = mask_from_score(score, sparsity, per_row=True)
    return weight * keep, keep
