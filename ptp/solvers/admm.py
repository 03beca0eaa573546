"""ADMM pruning with gradual mask selection (Boža 2024, "Fast and Effective Weight Update for
Pruned Large Language Models", arXiv:2401.02938).

SparseGPT fixes each weight's fate once, column by column, and compensates only the columns to
its right. Here the mask and the weights are found together: ADMM alternates an exact
least-squares step over all columns at once with a projection onto the sparsity pattern, while
the pattern tightens gradually from dense to the target; a final conjugate-gradient solve gives
the optimal weights for the chosen mask.
"""

from __future__ import annotations

import torch

from ..config import Sparsity
from .masks import mask_from_score
from .sparsegpt import float_copies


def _normalised(weight: torch.Tensor, hessian: torch.Tensor, damp: float):
    """Scale inputs to unit second moment: H -> D^-1 H D^-1, W -> W D with D = sqrt(diag H).

    The objective is unchanged, |W D| is Wanda's score |W_ij| * ||X_j||, and one penalty rho
    suits every layer. Dead inputs (diag H = 0) get weight 0 and a unit diagonal.
    """
    W, H, dead = float_copies(weight, hessian)
    H.diagonal().add_(damp * H.diagonal().mean())
    scale = H.diagonal().sqrt()
    return W * scale, H / scale.unsqueeze(0) / scale.unsqueeze(1), scale, dead


def masked_least_squares(V: torch.Tensor, target: torch.Tensor, H: torch.Tensor, keep: torch.Tensor,
                         iters: int) -> torch.Tensor:
    """Minimise tr(V H V^T) - 2 tr(V target^T) over V with zeros outside ``keep``, from V.

    Each row is an independent positive-definite system restricted to its kept entries; conjugate
    gradients run on all rows at once (per-row step sizes), masking the residual each step.
    V, target, keep: [out, in]; H: [in, in], unit diagonal (so Jacobi preconditioning is implicit).
    """
    V = V * keep
    R = (target - V @ H) * keep
    P = R.clone()
    rr = (R * R).sum(1, keepdim=True)
    for _ in range(iters):
        HP = (P @ H) * keep
        alpha = rr / (P * HP).sum(1, keepdim=True).clamp_min(1e-30)
        V += alpha * P
        R -= alpha * HP
        rr_new = (R * R).sum(1, keepdim=True)
        P = R + (rr_new / rr.clamp_min(1e-30)) * P
        rr = rr_new
    return V


def admm(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: Sparsity,
    iterations: int = 30,
    ramp: int = 15,
    rho: float = 0.1,
    growth: float = 1.2,
    damp: float = 0.01,
    cg_iters: int = 50,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` minimising ||WX - W'X||^2 jointly over mask and weights.

    weight: [out, in]; hessian: [in, in] float32, proportional to X X^T.
    ADMM on  min_V ½ tr((V - W) H (V - W)^T)  s.t.  V = Z, Z sparse  (paper, Section 3), with
    the scaled dual U:
        V <- (W H + rho (Z - U)) (H + rho I)^-1,   Z <- project(V + U),   U <- U + V - Z.
    The penalty rho starts small, so the weights first move freely, and grows by ``growth`` per
    iteration until V and Z agree. For the first ``ramp`` iterations the projection keeps a
    shrinking share of |V + U| (in normalised units, so the score is Wanda's) on the cubic
    schedule s_t = s (1 - (1 - t/ramp)^3), per output row for unstructured sparsity; N:M patterns
    are re-chosen at full sparsity every ramp iteration. The mask is then frozen, and finally the
    kept weights are solved exactly (``masked_least_squares``).
    Returns (pruned weight in weight's dtype, keep mask [out, in]).
    """
    W, H, scale, dead = _normalised(weight, hessian, damp)
    target = W @ H
    # (H + rho I)^-1 = Q diag(1 / (lambda + rho)) Q^T: one eigendecomposition serves every rho.
    eigenvalues, Q = torch.linalg.eigh(H)
    Z, U = W.clone(), torch.zeros_like(W)
    keep = torch.ones_like(W, dtype=torch.bool)
    for t in range(iterations):
        V = (((target + rho * (Z - U)) @ Q) / (eigenvalues + rho)) @ Q.T
        if t < ramp:
            step = sparsity if sparsity.is_nm else Sparsity(sparsity.ratio * (1 - (1 - (t + 1) / ramp) ** 3))
            keep = mask_from_score((V + U).abs(), step, per_row=True)
        Z = (V + U) * keep
        U += V - Z
        rho *= growth
        U /= growth  # U is the dual divided by rho
    V = masked_least_squares(Z, target, H, keep, cg_iters)
    V[:, dead] = 0  # solved to ~1e-17, not to 0
    return (V / scale * keep).to(weight.dtype), keep
