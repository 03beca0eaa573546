"""Calibration data: token windows drawn from a text source.

Every source ends the same way: one long token stream ``[1, T]`` from which
``random_windows`` draws ``nsamples`` windows of ``seqlen`` tokens.
"""

from __future__ import annotations

import random

import torch

from .config import ConfigError


def random_windows(token_ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Draw ``nsamples`` windows of ``seqlen`` tokens from one token stream.

    token_ids: LongTensor [1, T] (or [T]): the whole source tokenized as one stream.
    Returns LongTensor [nsamples, seqlen].

    Start offsets are uniform in [0, T - seqlen) from ``random.Random(seed)``, the
    draw the SparseGPT and Wanda reference code makes (``random.seed(seed)`` then
    ``random.randint(0, T - seqlen - 1)`` per sample), so the same seed gives the
    same windows as those scripts.

    >>> random_windows(torch.arange(10)[None], nsamples=2, seqlen=3, seed=0).shape
    torch.Size([2, 3])
    """
    ids = token_ids.reshape(-1)
    ntok = ids.numel()
    if nsamples < 1 or seqlen < 1:
        raise ConfigError(f"nsamples and seqlen must be positive, got {nsamples} and {seqlen}")
    if ntok < seqlen + 1:
        raise ConfigError(
            f"calibration source too short: it has {ntok} tokens, "
            f"needs at least {seqlen + 1} for windows of {seqlen} tokens"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, ntok - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts]).long()
