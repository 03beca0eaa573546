# TEMPORARY: being written right now by the lead; signatures are final.
from __future__ import annotations
from dataclasses import dataclass, field


@dataclass
class LayerReport:
    name: str            # full module name, e.g. "model.layers.3.mlp.down_proj"
    sparsity: float      # achieved fraction of zeros in the weight
    error: float         # ||WX - W'X||^2 / ||WX||^2 on calibration inputs
    seconds: float = 0.0


@dataclass
class PruneReport:
    method: str
    sparsity: str
    layers: list[LayerReport] = field(default_factory=list)
    wall_time_s: float = 0.0

    def to_dict(self) -> dict: ...


def find_blocks(model, path=None):
    """-> (dotted_name, nn.ModuleList of decoder blocks)"""
    raise NotImplementedError


def prune(model, batches, config):
    """Prune `model` in place; batches: LongTensor [n, L] or list of [1, L]; -> PruneReport."""
    raise NotImplementedError
