"""``ptp bench --kernels``: per-linear time and achieved bandwidth of the sparse kernel next to
every dense path a user has, and a plain memory copy — so the distance to the limit is printed.

For each shape [out, in], pattern, value dtype and token count T, interleaved (each variant once
per round, ``repeats`` rounds after ``warmup``), medians:

- ``sparse``: ``SparseLinear``'s path (small-batch kernel for T <= 16, unpack + GEMM above),
  with bf16 activations for bf16 values (a bf16 model's), fp32 for fp32 values;
- ``torch fp32``: ``F.linear`` on fp32 weights (for bf16 values: the upcast weights);
- ``torch bf16``: ``F.linear`` with bf16 weights and activations (bf16 values only);
- ``ptp dense bf16``: the sparse kernel's loop with every mask bit set, over the dense bf16
  weight (bf16 values, T <= 16 only: it is the small-batch loop);
- ``copy``: ``dst.copy_(src)`` of a buffer the size of the dense fp32 weight.

The baseline is the fastest dense variant. GB/s = bytes of the weight as that variant stores it
/ time (the activations are a rounding error at small T); copy GB/s counts bytes read + bytes
written, as STREAM's "copy" does.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..config import parse_sparsity
from . import kernels
from .format import PackedWeight, pack, pack_dense

SHAPES = ((4096, 4096), (8192, 2048), (2048, 8192))
PATTERNS = ("0.5", "2:4", "0.7")
DTYPES = ("bfloat16", "float32")
TOKENS = (1, 8, 512)


@dataclass
class KernelRow:
    out: int
    inp: int
    pattern: str
    dtype: str
    tokens: int
    ms: dict[str, float]          # variant -> median milliseconds
    gbps: dict[str, float]        # variant -> weight bytes / s (copy: read + written)
    baseline: str                 # the fastest dense variant

    @property
    def speedup(self) -> float:
        return self.ms[self.baseline] / self.ms["sparse"]

    @property
    def of_copy(self) -> float:
        return self.gbps["sparse"] / self.gbps["copy"]


def random_pruned(out: int, inp: int, pattern: str, seed: int = 0) -> torch.Tensor:
    """fp32 [out, in] with the pattern's smallest |w| zeroed (N:M along the inputs)."""
    sparsity = parse_sparsity(pattern)
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))
    if sparsity.is_nm:
        groups = w.view(out, -1, sparsity.m)
        drop = groups.abs().topk(sparsity.m - sparsity.n, dim=-1, largest=False).indices
        return groups.scatter(-1, drop, 0.0).view(out, inp)
    threshold = w.abs().flatten().kthvalue(max(1, int(sparsity.ratio * w.numel()))).values
    return torch.where(w.abs() <= threshold, torch.zeros(()), w)


# Each timed call runs a variant over COPIES distinct copies of its weight back to back, as
# decode runs one layer after another: the copies together exceed the last-level cache (so
# the weights come from DRAM, as a model's do) and the kernel's threads stay awake between
# calls, as they do between the layers of a forward. Times are per copy.
COPIES_BYTES = 128 << 20


def _variants(w32: torch.Tensor, dtype: torch.dtype, tokens: int):
    """{name: (callable over the copies, weight bytes of one copy)} for one cell."""
    values = w32.to(dtype)
    packed = pack(values)
    copies = max(2, -(-COPIES_BYTES // packed.nbytes))
    x = torch.randn(tokens, w32.shape[1])
    src = torch.empty(w32.numel())
    dst = torch.empty_like(src)
    # bf16 weights: a bf16 model, so bf16 activations, as torch's bf16 linear gets them
    xs = x.bfloat16() if dtype == torch.bfloat16 else x

    def each(weight, fn):
        clone = (lambda p: PackedWeight(p.shape, *(t.clone() for t in p.tensors().values()))) \
            if isinstance(weight, PackedWeight) else torch.clone
        weights = [weight] + [clone(weight) for _ in range(copies - 1)]
        return lambda: [fn(w) for w in weights]

    out = {
        "sparse": (each(packed, lambda p: kernels.matmul(p, xs)), packed.nbytes),
        "torch fp32": (each(w32, lambda w: torch.nn.functional.linear(x, w)), w32.numel() * 4),
        "copy": (each(src, lambda s: dst.copy_(s)), 2 * src.numel() * 4),
    }
    if dtype == torch.bfloat16:
        xb = x.bfloat16()
        out["torch bf16"] = (each(values, lambda w: torch.nn.functional.linear(xb, w)), values.numel() * 2)
        if tokens <= kernels.SMALL_BATCH:
            out["ptp dense bf16"] = (each(pack_dense(values), lambda d: kernels.dense_bf16_matmul(d, tuple(values.shape), xs)),
                                     values.numel() * 2)
    return out, copies


@torch.inference_mode()
def kernel_bench(shapes=None, patterns=None, dtypes=None, tokens=None,
                 warmup: int = 2, repeats: int = 7) -> list[KernelRow]:
    """One KernelRow per (shape, pattern, dtype, tokens); defaults: the module's constants."""
    shapes, patterns = shapes or SHAPES, patterns or PATTERNS
    dtypes, tokens = dtypes or DTYPES, tokens or TOKENS
    rows = []
    for out, inp in shapes:
        for pattern in patterns:
            w32 = random_pruned(out, inp, pattern)
            for dtype_name in dtypes:
                dtype = getattr(torch, dtype_name)
                # bf16 values: compare with the fp32 linear on the *same* (rounded) weights
                w = w32.to(dtype).to(torch.float32)
                for t in tokens:
                    variants, copies = _variants(w, dtype, t)
                    times = {name: [] for name in variants}
                    for _ in range(warmup):
                        for fn, _ in variants.values():
                            fn()
                    for _ in range(repeats):
                        for name, (fn, _) in variants.items():
                            start = time.perf_counter()
                            fn()
                            times[name].append(time.perf_counter() - start)
                    med = {n: statistics.median(s) / copies for n, s in times.items()}
                    dense = [n for n in med if n not in ("sparse", "copy")]
                    rows.append(KernelRow(out, inp, pattern, dtype_name, t, {n: s * 1e3 for n, s in med.items()},
                                          {n: variants[n][1] / med[n] / 1e9 for n in med},
                                          min(dense, key=med.get)))
    return rows


def markdown(rows: list[KernelRow]) -> str:
    head = ("| shape (out×in) | pattern | values | tokens | sparse ms | sparse GB/s | fastest dense | dense ms | "
            "speedup | sparse GB/s / copy GB/s | torch fp32 ms | torch bf16 ms | ptp dense bf16 ms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        def ms(name):
            return f"{r.ms[name]:.3f}" if name in r.ms else "–"

        lines.append(f"| {r.out}×{r.inp} | {r.pattern} | {r.dtype} | {r.tokens} | {r.ms['sparse']:.3f} | "
                     f"{r.gbps['sparse']:.1f} | {r.baseline} | {r.ms[r.baseline]:.3f} | {r.speedup:.2f}× | "
                     f"{r.gbps['sparse']:.1f} / {r.gbps['copy']:.1f} = {r.of_copy:.2f} | "
                     f"{ms('torch fp32')} | {ms('torch bf16')} | {ms('ptp dense bf16')} |")
    lines += ["", f"kernels: {kernels.selected_isa()}, {torch.get_num_threads()} threads; medians, variants interleaved; "
              "copy GB/s = (read + written) bytes / s."]
    return "\n".join(lines)


def to_dicts(rows: list[KernelRow]) -> list[dict]:
    return [{**asdict(r), "speedup": r.speedup, "of_copy": r.of_copy} for r in rows]
