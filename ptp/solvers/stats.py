"""Calibration statistics of a linear layer's inputs, accumulated batch by batch.

This is the only code that reshapes layer inputs: every accumulator takes activations of any
leading shape [..., in] and treats each position as one token.

Each batch's contribution is computed in float32 and added into a float64 sum; the scaling
(2/n, the square root) is applied once, when the statistic is read, and the result rounded to
float32. A float64 sum of float32 terms is exact unless they span about 2^29 in magnitude, so
the sum does not depend on the order the batches are added in: processes that each sum their own
batches, then add their sums, hold bit for bit what one process holds (``ptp.scale``).
"""

from __future__ import annotations

import math

import torch


class Hessian:
    """H = 2 X X^T / n over the tokens seen so far ([in, in], read as float32).

    H is symmetric, so only its upper triangle is accumulated, a panel of ``PANEL`` rows at a
    time (rows a:b times columns a:): about 40% fewer flops than the full product at 1536 inputs
    on a 2-core CPU, where this product is a third of SparseGPT's time. Each panel's product is a
    float32 GEMM added into the float64 ``upper`` (the GEMM itself in float64 would be several
    times slower). ``hessian`` mirrors it.
    ``max_tokens`` stops accumulating after that many tokens: enough to *measure* the
    reconstruction error of a mask chosen without H (Wanda, magnitude) at a fraction of the cost.
    """

    PANEL = 256

    def __init__(self, columns: int, device: torch.device | str = "cpu", max_tokens: int | None = None):
        self.upper = torch.zeros(columns, columns, dtype=torch.float64, device=device)  # sum X^T X, rows a:b, columns a:
        self.tokens = 0
        self.max_tokens = max_tokens

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if self.max_tokens is not None:
            x = x[: max(self.max_tokens - self.tokens, 0)]
        if x.shape[0] == 0:
            return
        x = x.float()
        self.tokens += x.shape[0]
        for a in range(0, x.shape[1], self.PANEL):
            b = a + self.PANEL
            self.upper[a:b, a:] += x[:, a:b].T @ x[:, a:]

    @property
    def hessian(self) -> torch.Tensor:
        """The full symmetric H in float32, a new tensor on every access (zeros before any token)."""
        upper = (self.upper * (2 / max(self.tokens, 1))).float().triu()
        return upper + upper.triu(1).T


class InputNorms:
    """Sum of squares of each input feature over all tokens (float64); ``norm`` is ||X_j||_2 ([in], float32).

    The squares are taken and summed in float64: the tensor is only [tokens, in], so this costs
    little, and the float32 result no longer depends on how a reduction over the tokens is split.
    """

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.sq_sum = torch.zeros(columns, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        self.tokens += x.shape[0]
        self.sq_sum += x.square().sum(0)

    @property
    def norm(self) -> torch.Tensor:
        return self.sq_sum.sqrt().float()


def relative_error(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """||W X - W' X||^2 / ||W X||^2, computed from H ∝ X X^T without the activations.

    weight, pruned: [out, in]; hessian: [in, in]. tr(D H D^T) = ||D X||^2 up to H's scale, which cancels.
    """
    weight, pruned = weight.float(), pruned.float()
    delta = weight - pruned
    num = ((delta @ hessian) * delta).sum()
    den = ((weight @ hessian) * weight).sum()
    return float(num / den) if den > 0 else 0.0
