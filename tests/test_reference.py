"""ptp prunes exactly what the papers' loops prune (``scripts/reference_prune.py``, the baseline
that ``scripts/bench_prune.py`` times ptp against), on tiny Llama and Qwen2 models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import ptp

from .test_engine import block_linears
from .tiny import tiny_model, tokens

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from reference_prune import prune_reference  # noqa: E402


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("method, spec", [("wanda", "0.5"), ("wanda", "2:4"), ("sparsegpt", "2:4"), ("sparsegpt", "4:8")])
def test_ptp_matches_the_papers_loops(family, method, spec):
    calib = tokens(8, 48)
    ours, theirs = tiny_model(family), tiny_model(family)
    ptp.prune(ours, calib, ptp.PruneConfig(method=method, sparsity=spec, batch_size=4))
    prune_reference(theirs, calib, method, spec)
    a, b = block_linears(ours), block_linears(theirs)
    assert sorted(a) == sorted(b)
    if method == "wanda":  # no weight update, nothing order-sensitive: bit-identical masks and weights
        assert all(torch.equal(a[n].weight, b[n].weight) for n in a)
        return
    # SparseGPT: ptp sums the Hessian in batches and in panels (the reference per sample, whole)
    # and later blocks see the float noise of earlier ones, so a few near-tied N:M choices may
    # flip (seen: 10 of 4096 in one ill-conditioned Qwen2 o_proj). The models must still agree
    # far more closely than either agrees with the dense model.
    for name in a:
        assert int(((a[name].weight == 0) != (b[name].weight == 0)).sum()) <= a[name].weight.numel() // 200, name
    with torch.no_grad():
        ours_out, theirs_out, dense_out = (m(calib).logits for m in (ours, theirs, tiny_model(family)))
    assert (ours_out - theirs_out).norm() < 0.05 * (theirs_out - dense_out).norm()
