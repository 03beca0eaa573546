"""Calibration statistics of a linear layer's inputs, accumulated batch by batch in float32.

This is the only code that reshapes layer inputs: every accumulator takes activations of any
leading shape [..., in] and treats each position as one token.
"""

from __future__ import annotations

import math

import torch


class Hessian:
    """Running mean H = 2 X X^T / n over the tokens seen so far ([in, in], float32).

    ``max_tokens`` stops accumulating after that many tokens: enough to *measure* the
    reconstruction error of a mask chosen without H (Wanda, magnitude) at a fraction of the cost.
    """

    def __init__(self, columns: int, device: torch.device | str = "cpu", max_tokens: int | None = None):
        self.hessian = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.tokens = 0
        self.max_tokens = max_tokens

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if self.max_tokens is not None:
            x = x[: max(self.max_tokens - self.tokens, 0)]
        n = x.shape[0]
        if n == 0:
            return
        # Rescale the old mean, then add the new tokens scaled so the sum stays a mean.
        self.hessian *= self.tokens / (self.tokens + n)
        self.tokens += n
        x = x.float() * math.sqrt(2 / self.tokens)
        self.hessian.addmm_(x.T, x)


class InputNorms:
    """Sum of squares of each input feature over all tokens; ``norm`` is ||X_j||_2 ([in])."""

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.sq_sum = torch.zeros(columns, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        self.sq_sum += (x * x).sum(0)

    @property
    def norm(self) -> torch.Tensor:
        return self.sq_sum.sqrt()


def relative_error(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """||W X - W' X||^2 / ||W X||^2, computed from H ∝ X X^T without the activations.

    weight, pruned: [out, in]; hessian: [in, in]. tr(D H D^T) = ||D X||^2 up to H's scale, which cancels.
    """
    weight, pruned = weight.float(), pruned.float()
    delta = weight - pruned
    num = ((delta @ hessian) * delta).sum()
    den = ((weight @ hessian) * weight).sum()
    return float(num / den) if den > 0 else 0.0
