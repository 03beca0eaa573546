"""Structured pruning maths: which input channels (or groups of them, e.g. attention heads) of a
linear layer to remove, and how to update the layer so its output changes as little as possible.

All functions take the *consumer* layer, the one that reads the channels: ``down_proj`` reads the
MLP's intermediate channels, ``o_proj`` reads the attention heads. Removing input channel j of the
consumer is what lets the producers (``gate_proj``/``up_proj``, ``q/k/v_proj``) drop output j.

weight: [out, in]. Groups: LongTensor [G, k], each row the k input channels one structure owns
(k = 1 for MLP channels, k = heads_per_kv_group * head_dim for a whole key/value group).
"""

from __future__ import annotations

import torch

from .sparsegpt import inverse_hessian_cholesky

IMPORTANCE = ("flap", "wanda-sp", "obs")
COMPENSATION = ("ls", "bias", "none")


class Moments:
    """Per-channel sums over tokens of x and of x x^T (float32), for inputs of any shape [..., in].

    mean: E[x] [in]; second: E[x x^T] [in, in]; variance: the per-channel fluctuation
    Var(x_j) = E[x_j^2] - E[x_j]^2 [in] (sample variance, divided by n - 1 as in FLAP).
    """

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(columns, dtype=torch.float32, device=device)
        self.outer = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        self.sum += x.sum(0)
        self.outer.addmm_(x.T, x)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.tokens, 1)

    @property
    def second(self) -> torch.Tensor:
        return self.outer / max(self.tokens, 1)

    @property
    def variance(self) -> torch.Tensor:
        n = max(self.tokens, 2)
        return ((self.outer.diagonal() - self.sum**2 / n) / (n - 1)).clamp_min(0)


def channel_groups(channels: int, size: int) -> torch.Tensor:
    """[channels // size, size]: consecutive channels form one group (a head, a KV group)."""
    return torch.arange(channels).reshape(-1, size)


def group_scores(weight: torch.Tensor, moments: Moments, groups: torch.Tensor, importance: str) -> torch.Tensor:
    """Importance of each group [G]: higher means keep. The score of a group is the sum of its
    channels' scores (FLAP, Section 3.1; Wanda-sp aggregates the same way).

    flap:     Var(X_j) * ||W_:,j||^2, the weighted input-feature variance (FLAP, Eq. 4): how much the
              output moves when channel j is replaced by its mean (which the bias then restores).
    wanda-sp: ||X_j||_2 * sum_i |W_ij|, Wanda's |W|*||X|| summed over the structure (An et al. 2024).
    """
    W = weight.float()
    if importance == "flap":
        score = moments.variance * W.pow(2).sum(0)
    elif importance == "wanda-sp":
        score = (moments.second.diagonal() * moments.tokens).sqrt() * W.abs().sum(0)
    else:
        raise ValueError(f"no per-channel score for importance {importance!r}")
    return score[groups].sum(1)


def obs_select(weight: torch.Tensor, hessian: torch.Tensor, groups: torch.Tensor, remove: int,
               damp: float = 0.01) -> torch.Tensor:
    """Greedy structured OBS (ZipLM, Kurtic et al. 2023, Eq. 5-7): remove, one at a time, the
    group G whose removal with the optimal update of the remaining columns costs least,

        cost(G) = tr(W_:,G [H^-1]_GG^-1 W_:,G^T),   W <- W - W_:,G [H^-1]_GG^-1 [H^-1]_G,:,
        H^-1 <- H^-1 - [H^-1]_:,G [H^-1]_GG^-1 [H^-1]_G,:.

    weight: [out, in]; hessian: [in, in] (any positive scale, e.g. E[x x^T]).
    Returns a bool keep mask over groups [G]. The final weights equal ``least_squares`` on the
    kept set, so selection and compensation stay separate steps.
    """
    W = weight.float().clone()
    U = inverse_hessian_cholesky(hessian.float(), damp)
    Hinv = U.T @ U  # (H + lambda I)^-1
    keep = torch.ones(groups.shape[0], dtype=torch.bool, device=groups.device)
    for _ in range(remove):
        best, best_cost, best_inv = -1, float("inf"), None
        for g in torch.nonzero(keep).flatten().tolist():
            idx = groups[g]
            inv = torch.linalg.inv(Hinv[idx][:, idx])
            WG = W[:, idx]
            cost = float(((WG @ inv) * WG).sum())
            if cost < best_cost:
                best, best_cost, best_inv = g, cost, inv
        idx = groups[best]
        W -= W[:, idx] @ best_inv @ Hinv[idx]
        Hinv -= Hinv[:, idx] @ best_inv @ Hinv[idx]
        keep[best] = False
    return keep


def obs_select_channels(weight: torch.Tensor, hessian: torch.Tensor, remove: int, damp: float = 0.01) -> torch.Tensor:
    """``obs_select`` for single channels (k = 1), vectorised: cost_j = ||W_:,j||^2 / [H^-1]_jj.

    Returns a bool keep mask over channels [in].
    """
    W = weight.float().clone()
    U = inverse_hessian_cholesky(hessian.float(), damp)
    Hinv = U.T @ U
    keep = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)
    for _ in range(remove):
        cost = W.pow(2).sum(0) / Hinv.diagonal()
        cost[~keep] = float("inf")
        j = int(cost.argmin())
        row = Hinv[j] / Hinv[j, j]
        W -= W[:, j : j + 1] * row
        Hinv -= Hinv[:, j : j + 1] * row
        keep[j] = False
        Hinv[j, j] = 1  # removed: keep the diagonal positive so the division above stays finite
    return keep


def least_squares(weight: torch.Tensor, second: torch.Tensor, keep: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The kept columns that best reproduce the full layer: argmin ||W X - W'_S X_S||^2 over W'_S,

        W'_S = W_S + W_R H_RS (H_SS + lambda I)^-1,   lambda = damp * mean(diag H_SS),

    the OBS update for a set of removed columns R (ZipLM Eq. 6; SlimGPT). H = E[x x^T] is not
    centred, so the removed channels' mean contribution is reconstructed too; pass a ``second``
    augmented with a constant input (see ``with_bias_input``) to solve for a bias as well.

    weight: [out, in]; second: [in, in]; keep: bool [in]. Returns W'_S [out, keep.sum()] float32.
    """
    W, H = weight.float(), second.float()
    S, R = keep, ~keep
    HSS = H[S][:, S]
    HSS = HSS + damp * HSS.diagonal().mean() * torch.eye(HSS.shape[0], dtype=H.dtype, device=H.device)
    chol = torch.linalg.cholesky(HSS)
    # (W_R H_RS) HSS^-1 = solve(HSS, H_SR W_R^T)^T, HSS symmetric.
    correction = torch.cholesky_solve(H[S][:, R] @ W[:, R].T, chol).T
    return W[:, S] + correction


def with_bias_input(second: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """E[x~ x~^T] for x~ = [x, 1]: the layer's bias becomes one more, always-kept input column.

    second: [in, in]; mean: [in]. Returns [in + 1, in + 1].
    """
    top = torch.cat([second, mean[:, None]], 1)
    bottom = torch.cat([mean, mean.new_ones(1)])[None]
    return torch.cat([top, bottom], 0)


def bias_compensation(weight: torch.Tensor, mean: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """FLAP's baseline bias (Eq. 7): the removed channels' mean contribution, W_:,R E[x_R] [out]."""
    return weight.float()[:, ~keep] @ mean.float()[~keep]


def output_error(weight: torch.Tensor, second: torch.Tensor, new_weight: torch.Tensor) -> float:
    """||W x - W' x||^2 / ||W x||^2 over the calibration tokens, from E[x x^T] alone.

    weight, new_weight: [out, in] (removed columns zero in ``new_weight``); second: [in, in].
    """
    delta = weight.float() - new_weight.float()
    den = float(((weight.float() @ second) * weight.float()).sum())
    return float(((delta @ second) * delta).sum()) / den if den > 0 else 0.0


def expert_energy_order(energy: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Experts from least to most important [E]: by the energy of their weighted output on the
    calibration tokens, E_e = sum_t ||w_te f_e(x_t)||^2 over the tokens t routed to e (the squared
    error the block output takes, before the router renormalises, if e is removed). It grows with
    routing frequency and with output size; ties (experts never routed) break by token count.

    energy: [E] float; tokens: [E] routed-token counts.
    """
    by_tokens = torch.argsort(tokens.double(), stable=True)
    return by_tokens[torch.argsort(energy.double()[by_tokens], stable=True)]
