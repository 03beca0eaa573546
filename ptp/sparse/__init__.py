"""ptp's CPU sparse runtime: pruned linear weights stored packed (kept values + a 1-bit mask,
laid out for the kernel) and multiplied by C++ kernels that read only the packed bytes.

- ``format``: ``pack`` / ``unpack`` (pure, bit-exact) and the byte layout;
- ``kernels``: the C library (built on first use), ISA dispatch, the small-batch and prefill paths;
- ``SparseLinear``: the drop-in ``nn.Linear``; ``sparsify(model)``: swap a model's pruned
  linears in place; ``load_sparse(DIR)``: what ``ptp.load(DIR, runtime="sparse")`` calls.

This package never imports the pruning engine or the solvers.
"""

from .convert import load_sparse, sparsify
from .format import PackedWeight, pack, pack_compressed, unpack
from .module import SparseLinear

__all__ = ["PackedWeight", "SparseLinear", "load_sparse", "pack", "pack_compressed", "sparsify", "unpack"]
