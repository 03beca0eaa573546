"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot"): OBS weight reconstruction with blocked lazy updates."""

from __future__ import annotations

import logging

import torch

from ..config import Sparsity

logger = logging.getLogger(__name__)


def inverse_hessian_cholesky(hessian: torch.Tensor, damp: float, max_tries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor U of (H + lambda*I)^-1, with lambda = damp * mean(diag H).

    hessian: [in, in] float32. U's rows give the OBS quantities the solver needs: row i of U
    scaled by U_ii is row i of the inverse Hessian of the not-yet-pruned columns i..in-1
    (paper, Section 3.2, "Fast Approximate Reconstruction").
    If a factorisation fails (H not positive definite in float32), damp grows tenfold and the
    retry is logged: silently skipping the weight update would quietly ruin the layer.
    """
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    mean_diag = hessian.diagonal().mean()
    for attempt in range(max_tries):
        chol, info = torch.linalg.cholesky_ex(hessian + damp * mean_diag * eye)
        if info == 0:
            chol, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if info == 0:
                return chol
        logger.warning("Cholesky failed with damp=%g; retrying with damp=%g", damp, damp * 10)
        damp *= 10
    raise torch.linalg.LinAlgError(f"Hessian is not positive definite even with damp={damp / 10:g}")


def float_copies(weight: torch.Tensor, hessian: torch.Tensor):
    """Contiguous float32 copies of W [out, in] (Conv1D passes a transposed view) and H [in, in],
    with inputs that never fired (diag H = 0) zeroed in W and given a unit diagonal in H, so H
    stays invertible. Returns (W, H, dead mask [in])."""
    W = weight.detach().float().clone(memory_format=torch.contiguous_format)
    H = hessian.float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H, dead


def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: Sparsity,
    blocksize: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` and update the kept weights to minimise ||WX - W'X||^2 (OBS).

    weight:  [out, in], any float dtype; the solve runs in float32.
    hessian: [in, in] float32, H = 2 X X^T / n over the calibration inputs X [in, n].
    Unstructured masks are chosen adaptively per block of ``blocksize`` columns from
    w^2 / [H^-1]_jj^2 (the OBS saliency); N:M masks per group of M columns as the solver reaches
    it. Input columns that never fired (diag H = 0) are zeroed.
    Returns (pruned weight in weight's dtype, keep mask [out, in]).
    """
    W, H, _ = float_copies(weight, hessian)
    rows, cols = W.shape
    Hinv = inverse_hessian_cholesky(H, damp)
    del H

    prune = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Hinv1 = Hinv[i1:i2, i1:i2]
        diag = Hinv1.diagonal()
        Err1 = torch.zeros_like(W1)
        prune1 = torch.zeros_like(W1, dtype=torch.bool)
        if not sparsity.is_nm:
            saliency = W1**2 / diag.unsqueeze(0) ** 2
            k = int(saliency.numel() * sparsity.ratio)
            if k:
                prune1.view(-1)[torch.topk(saliency.reshape(-1), k, largest=False, sorted=False).indices] = True
        # err_i = (w_i - q_i) / d_i is w_i * scale_i, with scale_i = 1/d_i where pruned, else 0
        # (N:M: all 0 until each group is chosen below).
        scale = prune1 / diag.unsqueeze(0)

        for i in range(i2 - i1):
            if sparsity.is_nm and i % sparsity.m == 0:
                # The saliency must use the weights as updated so far, so groups are chosen late.
                j = slice(i, i + sparsity.m)
                group = W1[:, j] ** 2 / diag[j].unsqueeze(0) ** 2
                drop = torch.topk(group, sparsity.m - sparsity.n, dim=1, largest=False, sorted=False).indices
                prune1.scatter_(1, drop + i, True)
                scale[:, j] = prune1[:, j] / diag[j].unsqueeze(0)
            err = torch.mul(W1[:, i], scale[:, i], out=Err1[:, i])
            # OBS update of this and the remaining columns of the block (paper, Eq. 3 / Algorithm 1):
            # column i itself becomes w - err * d, i.e. 0 where pruned (up to rounding; masked below).
            W1[:, i:].addmm_(err.unsqueeze(1), Hinv1[i : i + 1, i:], alpha=-1)  # a k=1 GEMM: 3x faster than addr_ here

        W[:, i1:i2] = W1
        prune[:, i1:i2] = prune1
        # Lazy batch update: apply this block's accumulated error to all later columns at once.
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    keep = ~prune
    return (W * keep).to(weight.dtype), keep
