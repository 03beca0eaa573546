"""OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for
Pruning LLMs to High Sparsity"): blocks with more outlier weights keep more of them."""

from __future__ import annotations

import torch


def outlier_share(scores: list[torch.Tensor], m: float) -> float:
    """Layerwise Outlier Distribution of one decoder block: the fraction of its Wanda scores
    |W_ij| * ||X_j|| that exceed ``m`` times their mean, over all the block's layers at once
    (paper, Section 3: the block's layers are pooled, not averaged).

    scores: one [out, in] tensor per layer of the block.
    """
    flat = torch.cat([s.float().reshape(-1) for s in scores])
    return float((flat > m * flat.mean()).float().mean())


def owl_sparsities(shares: list[float], target: float, lam: float) -> list[float]:
    """Per-block sparsity from the blocks' outlier shares (paper, Eq. 4 and its code).

    Shares are rescaled linearly to [0, 2 * lam] and centred, so the sparsities spread over
    [target - lam, target + lam], their mean is exactly ``target``, and the block with the most
    outliers is pruned least.
    """
    if not shares:
        return []
    low, high = min(shares), max(shares)
    if high == low:
        return [target] * len(shares)
    spread = [(s - low) / (high - low) * 2 * lam for s in shares]
    mean = sum(spread) / len(spread)
    sparsities = [target - (s - mean) for s in spread]
    if min(sparsities) < 0 or max(sparsities) >= 1:
        raise ValueError(f"OWL with lambda={lam} around {target} leaves [0, 1): lower lambda")
    return sparsities
