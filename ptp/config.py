"""One configuration object for the Python API and the CLI, and the sparsity spec parser."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

METHODS = ("magnitude", "wanda", "sparsegpt", "admm")


class ConfigError(ValueError):
    """Bad user input: the CLI prints the message on one line and exits with code 2."""


@dataclass(frozen=True)
class Sparsity:
    """What fraction of each layer's weights to remove, and in which pattern.

    Unstructured: ``n = m = 0`` and ``ratio`` in [0, 1).
    N:M: keep ``n`` of every ``m`` consecutive weights along the input dimension;
    ``ratio`` is then ``1 - n/m``.
    """

    ratio: float
    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.ratio:g}"


def parse_sparsity(spec: str | float | Sparsity) -> Sparsity:
    """Parse ``0.5``, ``"0.5"``, ``"50%"`` (unstructured) or ``"2:4"`` (N:M).

    >>> parse_sparsity("2:4")
    Sparsity(ratio=0.5, n=2, m=4)
    >>> parse_sparsity("60%").ratio
    0.6
    """
    if isinstance(spec, Sparsity):
        return spec
    text = str(spec).strip()
    nm = re.fullmatch(r"(\d+)\s*:\s*(\d+)", text)
    if nm:
        n, m = int(nm.group(1)), int(nm.group(2))
        if not 0 < n < m:
            raise ConfigError(f"N:M sparsity needs 0 < N < M, got {text!r}")
        return Sparsity(ratio=1 - n / m, n=n, m=m)
    try:
        ratio = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ConfigError(
            f"sparsity must be a fraction in [0, 1) such as 0.5 or 50%, or N:M such as 2:4; got {text!r}"
        ) from None
    if not 0 <= ratio < 1:
        raise ConfigError(f"sparsity must lie in [0, 1), got {text!r}")
    return Sparsity(ratio=ratio)


@dataclass
class PruneConfig:
    """Everything that decides what ``ptp.prune`` does. The CLI builds this same object.

    method:          "magnitude", "wanda", "sparsegpt" or "admm" (mask and weights found jointly;
                     the most accurate, a few times SparseGPT's solver time).
    sparsity:        "0.5", "50%", "2:4", "4:8" (or a ``Sparsity``).
    blocksize:       SparseGPT's lazy-update block width (columns).
    damp:            relative dampening of the Hessian (SparseGPT, ADMM): lambda = damp * mean(diag H).
    true_sequential: prune each group of layers sharing an input (q/k/v, o, gate/up, down) from
                     the outputs of the groups already pruned before it, in one lockstep pass
                     over the data; holds every batch's block activations at once.
    skip:            layers left dense: a name such as ``model.layers.0.mlp.down_proj``, a suffix
                     such as ``down_proj`` or ``layers.3`` (whole block), matched on dot boundaries.
    blocks:          dotted path of the decoder blocks' ModuleList (``model.layers``); found
                     automatically when None.
    batch_size:      calibration samples per forward pass through a block.
    device:          compute device for the block being pruned; CUDA when present, else CPU.
    profile:         non-uniform sparsity (unstructured only): "owl" (per block from the share
                     of outlier |W|*||X|| scores, mean exactly ``sparsity``), or a dict from layer
                     name pattern (matched like ``skip``; the longest match wins) to sparsity, for
                     the layers that should differ from ``sparsity``.
    owl_m, owl_lambda: OWL's outlier threshold (times the block's mean score) and the largest
                     deviation of a block's sparsity from the target.
    reconstruct:     after each block is pruned, tune its kept weights by Adam so that its output on
                     the pruned model's inputs matches the dense block's on the dense inputs (mask
                     frozen; see ``ptp.reconstruct``). ``recon_epochs`` passes over the windows,
                     ``recon_batch`` windows per step, learning rate ``recon_lr``; the last
                     ``recon_holdout`` windows are held out and decide, per block, whether the
                     tuned or the solver's weights are kept; ``recon_norms`` tunes norm scales too.
    """

    method: str = "sparsegpt"
    sparsity: Sparsity | str | float = "0.5"
    blocksize: int = 128
    damp: float = 0.01
    true_sequential: bool = False
    skip: tuple[str, ...] = ()
    blocks: str | None = None
    batch_size: int = 8
    device: str | None = None
    profile: str | dict | None = None
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    reconstruct: bool = False
    recon_epochs: int = 4
    recon_lr: float = 1e-3  # chosen on held-out calibration windows: scripts/probe_reconstruction.py
    recon_batch: int = 1  # one window per Adam step: more steps for the same work (README)
    recon_holdout: int = 4
    recon_norms: bool = False

    def __post_init__(self):
        self.sparsity = parse_sparsity(self.sparsity)
        self.method = str(self.method).lower()
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}, or structured "
                              "(removes channels and heads: --method structured, ptp.prune_structured)")
        if self.blocksize < 1:
            raise ConfigError(f"blocksize must be positive, got {self.blocksize}")
        if self.sparsity.is_nm and self.method == "sparsegpt" and self.blocksize % self.sparsity.m:
            raise ConfigError(f"blocksize {self.blocksize} must be a multiple of M={self.sparsity.m}")
        if self.damp <= 0:
            raise ConfigError(f"damp must be positive, got {self.damp}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}")
        self.skip = tuple(self.skip)
        self._check_profile()
        if self.recon_epochs < 0 or self.recon_lr <= 0 or self.recon_batch < 1 or self.recon_holdout < 1:
            raise ConfigError("reconstruction needs recon_epochs >= 0, recon_lr > 0, recon_batch >= 1 and "
                              f"recon_holdout >= 1; got {self.recon_epochs}, {self.recon_lr}, {self.recon_batch}, "
                              f"{self.recon_holdout}")
        if self.reconstruct and self.true_sequential:
            raise ConfigError("reconstruct and true_sequential cannot be combined: true-sequential overwrites "
                              "the block's inputs while it prunes, and reconstruction needs them")

    @property
    def tunes_blocks(self) -> bool:
        """Block reconstruction will run (0 epochs is the plain solver, bit for bit)."""
        return self.reconstruct and self.recon_epochs > 0

    def _check_profile(self) -> None:
        if self.profile is None:
            return
        if self.sparsity.is_nm:
            raise ConfigError(f"a sparsity profile needs unstructured sparsity, not {self.sparsity}")
        if isinstance(self.profile, str):
            if self.profile.lower() != "owl":
                raise ConfigError(f"unknown profile {self.profile!r}: use 'owl' or a dict of layer -> sparsity")
            self.profile = "owl"
            if self.owl_m <= 0 or not 0 <= self.owl_lambda < 0.5:
                raise ConfigError(f"OWL needs owl_m > 0 and 0 <= owl_lambda < 0.5, got {self.owl_m}, {self.owl_lambda}")
            low, high = self.sparsity.ratio - self.owl_lambda, self.sparsity.ratio + self.owl_lambda
            if low < 0 or high >= 1:
                raise ConfigError(f"OWL spreads sparsity over [{low:g}, {high:g}], outside [0, 1): lower owl_lambda")
            return
        if not isinstance(self.profile, dict) or not self.profile:
            raise ConfigError("profile must be 'owl' or a non-empty dict of layer pattern -> sparsity")
        profile = {}
        for pattern, value in self.profile.items():
            ratio = parse_sparsity(value)
            if ratio.is_nm:
                raise ConfigError(f"profile entry {pattern!r}: {value} is N:M; profiles take fractions")
            profile[str(pattern)] = ratio.ratio
        self.profile = profile

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["sparsity"] = str(self.sparsity)
        out["skip"] = list(self.skip)
        return out
