"""Solvers against hand-computed and brute-force references.

Each reference is built so that the plausible wrong formula fails: ||x|| vs ||x||^2, per-row vs
layer-wide ranking, SparseGPT without its OBS update or with the wrong inverse-Hessian entry.
"""

import logging

import pytest
import torch

from ptp.config import ConfigError, Sparsity, parse_sparsity
from ptp.solvers import (
    Hessian,
    InputNorms,
    magnitude,
    nm_mask,
    relative_error,
    sparsegpt,
    unstructured_mask,
    wanda,
)

HALF = parse_sparsity("0.5")
TWO_FOUR = parse_sparsity("2:4")


# --------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    "spec,expected",
    [("0.5", Sparsity(0.5)), ("50%", Sparsity(0.5)), (0.6, Sparsity(0.6)), ("0", Sparsity(0.0)),
     ("2:4", Sparsity(0.5, 2, 4)), ("4:8", Sparsity(0.5, 4, 8)), (" 1 : 4 ", Sparsity(0.75, 1, 4))],
)
def test_parse_sparsity(spec, expected):
    assert parse_sparsity(spec) == expected


@pytest.mark.parametrize("spec", ["1", "1.0", "100%", "-0.1", "4:4", "5:4", "0:4", "2:", "half", "2:4:8", ""])
def test_parse_sparsity_rejects(spec):
    with pytest.raises(ConfigError):
        parse_sparsity(spec)


# --------------------------------------------------------------------------- masks


def test_unstructured_mask_layer_wide_vs_per_row():
    score = torch.tensor([[1.0, 2.0], [10.0, 20.0]])
    # Layer-wide: the two smallest are both in row 0.
    assert unstructured_mask(score, 0.5).tolist() == [[False, False], [True, True]]
    # Per row: the smaller of each row.
    assert unstructured_mask(score, 0.5, per_row=True).tolist() == [[False, True], [False, True]]


def test_unstructured_mask_exact_count_per_row():
    torch.manual_seed(0)
    score = torch.rand(7, 33)
    for ratio in (0.0, 0.3, 0.5, 0.9):
        keep = unstructured_mask(score, ratio, per_row=True)
        dropped = (~keep).sum(1)
        # The layer's total is exact; rows differ by at most one, the first rows taking the extra.
        assert int(dropped.sum()) == int(ratio * 7 * 33)
        assert set(dropped.tolist()) <= {int(ratio * 33), int(ratio * 33) + 1}
        assert dropped.tolist() == sorted(dropped.tolist(), reverse=True)
        # The removed ones are the lowest of their row.
        for row, k in zip(score, keep):
            if (~k).any():
                assert row[~k].max() <= row[k].min()


def test_nm_mask_every_group_valid_and_highest():
    torch.manual_seed(0)
    score = torch.rand(5, 16)
    for n, m in ((2, 4), (4, 8), (1, 4)):
        keep = nm_mask(score, n, m).reshape(5, 16 // m, m)
        assert (keep.sum(-1) == n).all()
        groups = score.reshape(5, 16 // m, m)
        assert (groups.masked_fill(~keep, float("inf")).amin(-1) >= groups.masked_fill(keep, -1).amax(-1)).all()


# --------------------------------------------------------------------------- magnitude and Wanda


def test_magnitude_layer_wide_and_nm():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0], [5.0, -6.0, 7.0, -8.0]])
    pruned, keep = magnitude(w, HALF)
    assert pruned.tolist() == [[0, 0, 0, 0], [5, -6, 7, -8]]
    pruned, keep = magnitude(w, TWO_FOUR)
    assert pruned.tolist() == [[0, 0, 3, -4], [0, 0, 7, -8]]
    assert torch.equal(pruned, w * keep)


def test_wanda_uses_norm_not_squared_norm():
    # Feature 0 has ||x|| = 4 (||x||^2 = 16); feature 1 has ||x|| = 2 (||x||^2 = 4).
    x = torch.tensor([[4.0, 0.0], [0.0, 2.0]])
    norms = InputNorms(2)
    norms.add(x)
    assert torch.allclose(norms.norm, torch.tensor([4.0, 2.0]))
    w = torch.tensor([[1.0, 3.0]])
    # |W|*||x||: 4 vs 6 -> remove feature 0.  (|W|*||x||^2 would be 16 vs 12 -> remove feature 1.)
    pruned, keep = wanda(w, norms.norm, HALF)
    assert pruned.tolist() == [[0.0, 3.0]]


def test_wanda_ranks_per_row_not_layer_wide():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    pruned, _ = wanda(w, torch.ones(4), HALF)
    assert (pruned == 0).sum(1).tolist() == [2, 2]
    assert pruned.tolist() == [[0, 0, 3, 4], [0, 0, 30, 40]]


def test_wanda_matches_brute_force_score():
    torch.manual_seed(1)
    w, x = torch.randn(6, 12), torch.randn(50, 12) * torch.linspace(0.1, 5, 12)
    norms = InputNorms(12)
    for chunk in x.split(7):
        norms.add(chunk)
    score = w.abs() * x.norm(dim=0)
    pruned, keep = wanda(w, norms.norm, parse_sparsity("2:4"))
    expected = torch.zeros_like(keep)
    for r in range(6):
        for g in range(0, 12, 4):
            expected[r, g + score[r, g : g + 4].argsort(descending=True)[:2]] = True
    assert torch.equal(keep, expected)


# --------------------------------------------------------------------------- statistics


def test_hessian_running_mean_equals_one_shot():
    torch.manual_seed(0)
    x = torch.randn(3, 10, 8)
    acc = Hessian(8)
    for sample in x:  # batches of different content, same result
        acc.add(sample)
    flat = x.reshape(-1, 8)
    assert acc.tokens == 30
    assert torch.allclose(acc.hessian, 2 * flat.T @ flat / 30, atol=1e-5)


def test_hessian_upper_panels_equal_the_full_product(monkeypatch):
    monkeypatch.setattr(Hessian, "PANEL", 3)  # panels of 3 rows over 8 columns: 3, 3 and a partial 2
    x = torch.randn(4, 10, 8, dtype=torch.float64).float()
    acc = Hessian(8)
    for sample in x:
        acc.add(sample)
    flat = x.reshape(-1, 8).double()
    assert torch.allclose(acc.hessian.double(), 2 * flat.T @ flat / 40, atol=1e-5)
    assert torch.equal(acc.hessian, acc.hessian.T)
    assert acc.upper.tril(-1)[3:, :3].abs().sum() == 0  # below the panels: never computed


def test_hessian_max_tokens():
    x = torch.randn(20, 4)
    acc = Hessian(4, max_tokens=12)
    acc.add(x[:8])
    acc.add(x[8:])
    assert acc.tokens == 12
    assert torch.allclose(acc.hessian, 2 * x[:12].T @ x[:12] / 12, atol=1e-5)


def test_relative_error_matches_direct():
    torch.manual_seed(0)
    w, x = torch.randn(5, 8), torch.randn(40, 8)
    pruned, _ = magnitude(w, HALF)
    acc = Hessian(8)
    acc.add(x)
    direct = ((x @ (w - pruned).T) ** 2).sum() / ((x @ w.T) ** 2).sum()
    assert relative_error(w, pruned, acc.hessian) == pytest.approx(float(direct), rel=1e-4)


# --------------------------------------------------------------------------- SparseGPT


def obs_reference(w: torch.Tensor, h: torch.Tensor, sparsity: Sparsity, damp: float) -> torch.Tensor:
    """Column-by-column OBS with explicit inverses of the remaining columns' Hessian.

    At column i the remaining columns are i..in-1; their inverse Hessian is inv(H[i:, i:]).
    A weight's OBS saliency is w^2 / [inv(H[j:, j:])]_00; pruning w_qi moves the rest of
    its row by -(w_qi / [Hinv]_00) * Hinv[0, :].
    """
    w = w.clone().double()
    h = h.double() + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    cols = w.shape[1]
    d = torch.stack([torch.linalg.inv(h[j:, j:])[0, 0] for j in range(cols)])
    prune = torch.zeros_like(w, dtype=torch.bool)
    for i in range(cols):
        hinv = torch.linalg.inv(h[i:, i:])
        if sparsity.is_nm:
            if i % sparsity.m == 0:
                sal = w[:, i : i + sparsity.m] ** 2 / d[i : i + sparsity.m]
                drop = sal.argsort(dim=1)[:, : sparsity.m - sparsity.n]
                prune[:, i : i + sparsity.m].scatter_(1, drop, True)
        else:  # block size 1: the adaptive mask of one column is its lowest |w|
            prune[w[:, i].abs().argsort()[: int(w.shape[0] * sparsity.ratio)], i] = True
        q = torch.where(prune[:, i], 0.0, w[:, i])
        w[:, i:] -= ((w[:, i] - q) / hinv[0, 0]).unsqueeze(1) * hinv[0].unsqueeze(0)
        w[:, i] = q
    return w.float()


def _problem(rows=6, cols=16, tokens=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=gen) @ torch.randn(cols, cols, generator=gen)  # correlated inputs
    acc = Hessian(cols)
    acc.add(x)
    return torch.randn(rows, cols, generator=gen), acc.hessian, x


def test_sparsegpt_blocksize_one_equals_column_by_column_obs():
    w, h, _ = _problem()
    pruned, keep = sparsegpt(w, h, HALF, blocksize=1, damp=0.01)
    expected = obs_reference(w, h, HALF, 0.01)
    assert torch.equal(pruned == 0, expected == 0)
    assert torch.allclose(pruned, expected, atol=1e-4)


@pytest.mark.parametrize("blocksize", [4, 8, 16])
def test_sparsegpt_nm_equals_obs_for_any_blocksize(blocksize):
    w, h, _ = _problem(seed=2)
    pruned, keep = sparsegpt(w, h, TWO_FOUR, blocksize=blocksize, damp=0.01)
    expected = obs_reference(w, h, TWO_FOUR, 0.01)
    assert torch.equal(keep, expected != 0)
    assert torch.allclose(pruned, expected, atol=1e-4)
    assert (keep.reshape(6, 4, 4).sum(-1) == 2).all()


def test_sparsegpt_error_below_wanda_and_magnitude():
    w, h, x = _problem(rows=32, cols=64, tokens=256, seed=3)
    x = x * torch.linspace(0.05, 5, 64)  # feature scales that differ, as in LLM activations
    h = 2 * x.T @ x / x.shape[0]
    norms = InputNorms(64)
    norms.add(x)
    for spec in (HALF, TWO_FOUR, parse_sparsity("0.7")):
        sg, keep = sparsegpt(w, h, spec)
        errors = {
            "sparsegpt": relative_error(w, sg, h),
            "wanda": relative_error(w, wanda(w, norms.norm, spec)[0], h),
            "magnitude": relative_error(w, magnitude(w, spec)[0], h),
        }
        assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors
        assert float((~keep).float().mean()) == pytest.approx(spec.ratio, abs=0.01)


def test_sparsegpt_exact_block_sparsity_and_dtype():
    w, h, _ = _problem(rows=10, cols=32)
    pruned, keep = sparsegpt(w.to(torch.bfloat16), h, parse_sparsity("0.6"), blocksize=8)
    assert pruned.dtype == torch.bfloat16
    for block in (~keep).split(8, dim=1):
        assert int(block.sum()) == int(0.6 * block.numel())
    assert torch.equal(pruned == 0, ~keep)


def test_sparsegpt_dead_columns():
    w, h, _ = _problem()
    h[3, :] = 0
    h[:, 3] = 0
    pruned, keep = sparsegpt(w, h, HALF, blocksize=4)
    assert torch.isfinite(pruned).all()
    assert (pruned[:, 3] == 0).all()


def test_sparsegpt_retries_cholesky_with_more_damping(caplog):
    h = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1: not positive definite
    w = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    with caplog.at_level(logging.WARNING):
        pruned, keep = sparsegpt(w, h, HALF, blocksize=2)
    assert "Cholesky failed" in caplog.text
    assert torch.isfinite(pruned).all()
    assert (~keep).sum() == 2
    # The update was applied: the kept weights moved, which a silent no-update fallback would not do.
    assert not torch.equal(pruned[keep], w[keep])


def test_solvers_are_deterministic():
    w, h, x = _problem(rows=16, cols=32, seed=5)
    for spec in (HALF, TWO_FOUR):
        a, b = sparsegpt(w, h, spec), sparsegpt(w, h, spec)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_nm_mask_breaks_ties_like_the_reference_code():
    # Dequantized checkpoints hold few distinct values, so groups with tied scores are common
    # (40% of 4-groups in SmolLM2's GGUF weights); the reference code drops the m-n lowest with
    # one topk(largest=False) per group of columns, and so must we, or results drift.
    gen = torch.Generator().manual_seed(0)
    score = torch.randint(0, 3, (64, 32), generator=gen).float()
    reference = torch.zeros_like(score, dtype=torch.bool)
    for i in range(0, 32, 4):
        reference.scatter_(1, i + torch.topk(score[:, i : i + 4], 2, dim=1, largest=False)[1], True)
    assert torch.equal(nm_mask(score, 2, 4), ~reference)


def test_per_row_ties_drop_the_lower_indices_first():
    """Wanda's code sorts each row stably: of equal scores the first columns go. Dequantized
    checkpoints are full of ties, so this decides whether masks match the reference bit for bit."""
    score = torch.tensor([[1.0] * 8, [2.0, 1.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0]]).repeat(4, 1)
    keep = unstructured_mask(score, 0.25, per_row=True)
    assert torch.equal(keep[0], torch.tensor([False, False, True, True, True, True, True, True]))
    assert torch.equal(keep[1], torch.tensor([True, False, False, True, True, True, True, True]))
