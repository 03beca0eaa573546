"""Solvers: pure functions of tensors, (weight, statistics, sparsity) -> (pruned weight, keep mask)."""

from .admm import admm, masked_least_squares
from .magnitude import magnitude
from .masks import mask_from_score, nm_mask, unstructured_mask
from .sparsegpt import inverse_hessian_cholesky, sparsegpt
from .owl import outlier_share, owl_sparsities
from .stats import Hessian, InputNorms, relative_error
from .wanda import wanda

__all__ = [
    "admm",
    "Hessian",
    "InputNorms",
    "inverse_hessian_cholesky",
    "magnitude",
    "masked_least_squares",
    "mask_from_score",
    "nm_mask",
    "outlier_share",
    "owl_sparsities",
    "relative_error",
    "sparsegpt",
    "unstructured_mask",
    "wanda",
]
