"""Solvers: pure functions of tensors, (weight, statistics, sparsity) -> (pruned weight, keep mask)."""

from .magnitude import magnitude
from .masks import mask_from_score, nm_mask, unstructured_mask
from .sparsegpt import inverse_hessian_cholesky, sparsegpt
from .stats import Hessian, InputNorms, relative_error
from .wanda import wanda

__all__ = [
    "Hessian",
    "InputNorms",
    "inverse_hessian_cholesky",
    "magnitude",
    "mask_from_score",
    "nm_mask",
    "relative_error",
    "sparsegpt",
    "unstructured_mask",
    "wanda",
]
