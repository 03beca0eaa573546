"""Checks of what callers hand the engine, so that a mistake fails loudly instead of pruning the
wrong thing: the config's type, the calibration tokens, and layer patterns that match nothing."""

from __future__ import annotations

import difflib
from dataclasses import fields

import torch

from .config import ConfigError, PruneConfig


def as_config(config) -> PruneConfig:
    """A ``PruneConfig``, or a dict of its fields (``{"method": "wanda"}``) turned into one."""
    if isinstance(config, PruneConfig):
        return config
    if isinstance(config, dict):
        known = {f.name for f in fields(PruneConfig)}
        unknown = sorted(str(k) for k in config if k not in known)
        if unknown:
            raise ConfigError(f"unknown PruneConfig field(s) {', '.join(unknown)}; fields: {', '.join(sorted(known))}")
        return PruneConfig(**config)
    raise TypeError(f"config must be a ptp.PruneConfig (or a dict of its fields), not {type(config).__name__}")


def check_token_dtype(tokens: torch.Tensor) -> None:
    """Token ids are integers: a float tensor is a mistake (``.long()`` would silently floor it)."""
    if tokens.dtype == torch.bool or tokens.is_floating_point() or tokens.is_complex():
        raise ConfigError(f"calibration tokens must be an integer tensor of token ids, not {tokens.dtype}")


def check_token_ids(model: torch.nn.Module, tokens: torch.Tensor) -> None:
    """Every id indexes the model's input embeddings (else: a raw IndexError deep in the forward)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or (vocab is not None and high >= vocab):
        raise ConfigError(f"calibration token ids must lie in [0, {vocab}) (the model's vocabulary); "
                          f"got ids from {low} to {high}")


def check_patterns(patterns, names: list[str], what: str) -> None:
    """Refuse a layer pattern (``--skip``, a profile key) that matches none of ``names``: a typo
    would otherwise prune exactly what the user meant to keep. The message offers close names."""
    from .engine import skipped

    for pattern in patterns:
        if any(skipped(name, (pattern,)) for name in names):
            continue
        close = difflib.get_close_matches(pattern, sorted(_segment_runs(names)), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; layers look like {names[0]}" if names else ""
        raise ConfigError(f"{what} {pattern!r} matches no prunable layer{hint}")


def _segment_runs(names: list[str]) -> set[str]:
    """Every run of whole dotted segments of every name: what a pattern can match."""
    runs = set()
    for name in names:
        parts = name.split(".")
        for i in range(len(parts)):
            for j in range(i + 1, len(parts) + 1):
                runs.add(".".join(parts[i:j]))
    return runs
