"""Choosing which weights to keep from a score: unstructured (per layer or per row) and N:M.

Every function returns a boolean ``keep`` mask of the score's shape: True where the weight stays.
Ties are broken by index order, so the same scores always give the same mask.
"""

from __future__ import annotations

import torch

from ..config import Sparsity


def unstructured_mask(score: torch.Tensor, ratio: float, per_row: bool = False) -> torch.Tensor:
    """Keep all but the ``floor(ratio * count)`` lowest scores.

    score: [rows, cols]. ``per_row=False`` ranks the whole matrix at once (magnitude pruning);
    ``per_row=True`` ranks each output row separately (Wanda): every row loses
    ``floor(ratio * cols)`` weights and the first rows one more each, so that the layer's total is
    exactly ``floor(ratio * count)`` too (a per-row floor alone would miss 60% by up to 1/cols).
    """
    keep = torch.ones(score.shape, dtype=torch.bool, device=score.device)  # contiguous, unlike ones_like
    k = int(ratio * score.numel())
    if not k:
        return keep
    if per_row:
        rows = score.shape[0]
        per, extra = divmod(k, rows)
        if per:  # a stable sort, as Wanda's code: of tied scores the lower index goes first
            keep.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :per], False)
        if extra:  # the next-lowest score of each of the first ``extra`` rows
            rest = score[:extra].float().masked_fill(~keep[:extra], float("inf"))
            keep[:extra].scatter_(1, rest.argmin(1, keepdim=True), False)
        return keep
    keep.view(-1)[torch.topk(score.reshape(-1), k, largest=False, sorted=False).indices] = False
    return keep


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive columns.

    score: [rows, cols] with cols divisible by m. One ``topk`` over a [rows, cols/m, m] view
    picks the ``m - n`` lowest to drop, as the reference code does: with tied scores (common in
    dequantized checkpoints, whose weights take few distinct values) which of the tied weights
    go is decided by this choice, and magnitude 2:4 perplexity on SmolLM2 moves by a third with it.
    """
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"{cols} columns are not a multiple of M={m}")
    groups = score.reshape(rows, cols // m, m)
    keep = torch.ones(groups.shape, dtype=torch.bool, device=score.device)
    keep.scatter_(2, torch.topk(groups, m - n, dim=2, largest=False).indices, False)
    return keep.reshape(rows, cols)


def mask_from_score(score: torch.Tensor, sparsity: Sparsity, per_row: bool = False) -> torch.Tensor:
    """N:M groups when the spec is N:M, else unstructured (per layer, or per row)."""
    if sparsity.is_nm:
        return nm_mask(score, sparsity.n, sparsity.m)
    return unstructured_mask(score, sparsity.ratio, per_row=per_row)
