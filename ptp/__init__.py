"""ptp: post-training pruning of Hugging Face causal language models."""

__version__ = "0.1.0"

from .config import ConfigError, PruneConfig, Sparsity, parse_sparsity
from .engine import PruneReport, find_blocks, prune

__all__ = ["ConfigError", "PruneConfig", "PruneReport", "Sparsity", "find_blocks", "parse_sparsity", "prune"]
