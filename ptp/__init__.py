"""ptp: post-training pruning of Hugging Face causal language models."""

__version__ = "0.1.0"

from .config import ConfigError, PruneConfig, Sparsity, parse_sparsity
from .engine import PruneReport, find_blocks, prune
from .data import calibration_batches, random_windows
from .io import load, load_model, save
from .evaluate import compare, evaluate_tasks, perplexity, perplexity_of_tokens
from .bench import throughput
from .structured import StructuredReport, prune_structured
from .pipeline import Job, JobResult, run
from .sweep import SweepConfig, run_sweep
from . import scale, units

__all__ = ["ConfigError", "PruneConfig", "PruneReport", "Sparsity", "calibration_batches", "find_blocks", "load", "load_model", "parse_sparsity", "prune", "random_windows", "prune_structured", "save", "StructuredReport"]
__all__ += ["compare", "evaluate_tasks", "perplexity", "perplexity_of_tokens", "throughput"]
__all__ += ["Job", "JobResult", "run", "SweepConfig", "run_sweep"]
