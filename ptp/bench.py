"""Throughput: does the pruned model run faster? Measured honestly, next to its dense original.

Method (after gpt-fast): every measurement is warmed up, synchronised, timed with
``perf_counter``, repeated, and the median reported. Dense and pruned models are measured
in the same process and *interleaved* (dense, pruned, dense, pruned, ...) so that a noisy
machine slows both alike and their ratio stays meaningful.

- prefill: one forward pass over ``batch x length`` prompt tokens; tokens/s = batch*length/s.
- decode: greedy generation with a KV cache; the prompt is prefilled untimed, then
  ``new_tokens`` single-token steps are timed; tokens/s = batch*new_tokens/s.
- memory: the weights' bytes, and the peak memory of each run. CUDA: ``max_memory_allocated``
  above what was allocated before the run. CPU: the process's peak RSS during the run (VmHWM,
  reset through ``/proc/self/clear_refs`` where Linux allows it), every loaded model included:
  after warm-up the allocator reuses what it holds, so an increase above the start reads 0.

A pruned checkpoint stores its zeros in dense tensors, and dense kernels multiply by them
all the same: on CPU (and on GPU without a sparse kernel) pruning alone changes no speed.
On CUDA, 2:4 models are also run with their linear weights converted by
``torch.sparse.to_sparse_semi_structured`` (fp16/bf16, compute capability >= 8.0), the one
path where the zeros can pay off.
"""

from __future__ import annotations

import copy
import inspect
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

PREFILL_SHAPES = ((1, 128), (4, 128), (1, 512))  # (batch, prompt length)
DECODE_BATCHES = (1, 8)
DECODE_PROMPT = 32
NEW_TOKENS = 32
CPU_NOTE = (
    "CPU: pruned weights are stored dense, with zeros; dense kernels multiply by the zeros all the same, "
    "so unstructured or N:M sparsity does not make this model faster on CPU (differences are noise)."
)
SPARSE_NOTE = (
    "+sparse: the same checkpoint with its pruned linear layers on ptp's sparse runtime (packed kept values + "
    "1-bit mask, CPU kernels that read only those bytes); decode is bound by memory bandwidth, so it gains up to "
    "the share of the step those layers take, while the embedding, LM head and attention stay dense."
)
SHAPES_NOTE = (
    "The models differ in size (structured pruning makes smaller dense layers): that is a real speedup on any "
    "hardware, bounded by the share of the work that shrank (the embedding and head do not)."
)


@dataclass
class Measurement:
    """One (model, kind, shape) cell: the median of ``seconds`` over the repeats.

    kind: "prefill" (length = prompt tokens per sequence) or "decode" (length = new tokens).
    peak_bytes: CUDA: peak allocation above the pre-measurement level (activations, KV cache,
    logits); CPU: the process's peak RSS during the run. None where it cannot be read.
    """

    model: str
    kind: str
    batch: int
    length: int
    tokens_per_s: float
    seconds: list[float]
    peak_bytes: int | None


@dataclass
class BenchReport:
    device: str
    dtype: str
    weights_bytes: dict[str, int]
    measurements: list[Measurement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def rows(self) -> list[tuple[str, int, int, dict[str, Measurement]]]:
        """(kind, batch, length, {model: measurement}) per shape, in measurement order."""
        table: dict[tuple, dict[str, Measurement]] = {}
        for m in self.measurements:
            table.setdefault((m.kind, m.batch, m.length), {})[m.model] = m
        return [(k, b, n, cells) for (k, b, n), cells in table.items()]

    def markdown(self) -> str:
        """One row per shape: tokens/s of each model, and each model's ratio to the first."""
        names = list(self.weights_bytes)
        kernels = [n for n in names if n.endswith("+2:4") and n[:-4] in names]  # vs their own base
        head = "| kind | batch | tokens | " + " | ".join(f"{n} tok/s" for n in names)
        head += "".join(f" | {n} / {names[0]}" for n in names[1:])
        head += "".join(f" | 2:4 kernels helped {n[:-4]}?" for n in kernels)
        head += " | peak MiB (" + ", ".join(names) + ") |"
        lines = [head, "|" + "---|" * (head.count("|") - 1)]
        for kind, batch, length, cells in self.rows():
            tps = [cells[n].tokens_per_s if n in cells else None for n in names]
            row = f"| {kind} | {batch} | {length} | " + " | ".join(_fmt(t, "{:.1f}") for t in tps)
            row += "".join(f" | {_fmt(t / tps[0] if t and tps[0] else None, '{:.2f}x')}" for t in tps[1:])
            for n in kernels:
                ratio = cells[n].tokens_per_s / cells[n[:-4]].tokens_per_s
                row += f" | {'yes' if ratio > 1.05 else 'no'} ({ratio:.2f}x)"
            peaks = [_mib(cells[n].peak_bytes) if n in cells else "–" for n in names]
            lines.append(row + " | " + ", ".join(peaks) + " |")
        weights = ", ".join(f"{n} {b / 2**20:.0f} MiB" for n, b in self.weights_bytes.items())
        peak = "peak: allocated above the weights" if self.device.startswith("cuda") else \
            "peak: the process's RSS during each model's runs, all loaded models included"
        lines += ["", f"device {self.device}, dtype {self.dtype}; weights: {weights}; median of repeats; {peak}."]
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    return "–" if value is None else spec.format(value)


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.0f}"


# --------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """CUDA: peak allocation above the level at ``start()``. CPU: the process's peak RSS since
    ``start()`` (an increase above the start would read 0 once the allocator holds its memory)."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = _rss("VmRSS") if _reset_rss_peak() else None

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return None if self.base is None else _rss("VmHWM")


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def timed(run: Callable[[], None], device: torch.device, memory: PeakMemory) -> tuple[float, int | None]:
    """(seconds, peak bytes) of one call of ``run``, synchronised before and after."""
    synchronize(device)
    memory.start()
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start, memory.peak()


# --------------------------------------------------------------------------- workloads


def model_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def _last_logits_only(model: nn.Module) -> dict:
    """``logits_to_keep=1`` where the model supports it: a serving prefill computes only the
    last position's logits, and the full [B, L, V] head would dominate small models."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def prefill_step(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    """A closure running one prefill forward over ids [B, L]."""
    extra = _last_logits_only(model)

    def run() -> None:
        model(input_ids=ids, use_cache=False, **extra)

    return run


def decode_steps(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> Callable[[], torch.Tensor]:
    """A closure that prefills ``prompt`` [B, P] untimed *when created*, and when called
    generates ``new_tokens`` greedy tokens one step at a time through the KV cache.

    The closure returns the greedy continuation [B, 1 + new_tokens] (what ``generate``
    with ``do_sample=False`` would give), so tests can check that the timed loop is real.
    """
    extra = _last_logits_only(model)
    # transformers >= 5.2x calls the KV cache `cache`; earlier versions `past_key_values`.
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=prompt, use_cache=True, **extra)
    state = {"past": getattr(out, key), "next": out.logits[:, -1:].argmax(-1)}

    def run() -> torch.Tensor:
        past, nxt, tokens = state["past"], state["next"], [state["next"]]
        for _ in range(new_tokens):
            out = model(input_ids=nxt, use_cache=True, **{key: past})
            past, nxt = getattr(out, key), out.logits[:, -1:].argmax(-1)
            tokens.append(nxt)
        return torch.cat(tokens, dim=1)  # [B, 1 + new_tokens]: the prefill's token, then each step's

    return run


def measure(
    models: dict[str, nn.Module],
    kind: str,
    batch: int,
    length: int,
    make_run: Callable[[nn.Module, torch.Tensor], Callable[[], None]],
    prompt_len: int,
    warmup: int,
    repeats: int,
) -> list[Measurement]:
    """Warm up every model, then time them interleaved ``repeats`` times on the same ids."""
    first = next(iter(models.values()))
    device = model_device(first)
    vocab = first.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    memory = PeakMemory(device)
    times = {name: [] for name in models}
    peaks = {name: [] for name in models}
    for name, model in models.items():
        for _ in range(warmup):
            make_run(model, ids)()
    for _ in range(repeats):
        for name, model in models.items():
            run = make_run(model, ids)  # decode: a fresh KV cache each repeat, prefilled untimed
            seconds, peak = timed(run, device, memory)
            times[name].append(seconds)
            peaks[name].append(peak)
    tokens = batch * length
    return [
        Measurement(name, kind, batch, length, tokens / statistics.median(times[name]), times[name],
                    None if None in peaks[name] else max(peaks[name]))
        for name in models
    ]


# --------------------------------------------------------------------------- 2:4 kernels


def is_two_four(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive inputs of every row has at most 2 nonzeros.

    weight: [out, in] (nn.Linear layout); in must be a multiple of 4.
    """
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


class SemiStructuredLinear(nn.Module):
    """A linear layer whose 2:4 weight is a ``torch.sparse`` semi-structured tensor.

    Inputs [..., in] are flattened to 2-D first: the sparse kernels' dispatch refuses the
    ``expand`` that a 3-D single-token (decode) input produces, and pads 2-D inputs itself.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(to_sparse_semi_structured(linear.weight.detach()), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features)


def semi_structured_copy(model: nn.Module) -> tuple[nn.Module | None, str]:
    """A copy of ``model`` whose 2:4 linear layers run semi-structured sparse kernels.

    Returns (copy, note) or (None, reason). Needs CUDA with compute capability >= 8.0 and
    fp16/bf16 weights; a layer whose shape the kernels refuse stays dense, and the copy is
    checked with prefill- and decode-shaped forwards against the original (argmax agreement).
    Only reachable on a GPU; not exercised by the CPU test suite.
    """
    device = model_device(model)
    dtype = next(model.parameters()).dtype
    if device.type != "cuda":
        return None, "2:4 kernels need CUDA"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return None, "2:4 kernels need compute capability >= 8.0"
    if dtype not in (torch.float16, torch.bfloat16):
        return None, f"2:4 kernels need fp16/bf16 weights, the model is {dtype} (use --dtype bfloat16)"
    sparse = copy.deepcopy(model)
    converted, refused = 0, 0
    for name, module in list(sparse.named_modules()):
        if type(module) is nn.Linear and is_two_four(module.weight):
            try:
                replacement = SemiStructuredLinear(module)
            except (RuntimeError, ValueError) as err:  # a shape or dtype the kernels do not take
                refused += 1
                log.debug("2:4 kernel refused %s: %s", name, err)
                continue
            parent, _, child = name.rpartition(".")
            setattr(sparse.get_submodule(parent) if parent else sparse, child, replacement)
            converted += 1
    if converted == 0:
        return None, "no linear layer is 2:4 sparse"
    try:
        agree = [_argmax_agreement(sparse, model, ids.to(device)) for ids in (torch.arange(16)[None], torch.ones(2, 1, dtype=torch.long))]
    except (RuntimeError, NotImplementedError) as err:
        return None, f"2:4 kernels failed in a forward pass: {str(err).splitlines()[0]}"
    return sparse, f"2:4 kernels on {converted} linear layers ({refused} refused), argmax agreement {min(agree):.2f}"


@torch.no_grad()
def _argmax_agreement(a: nn.Module, b: nn.Module, ids: torch.Tensor) -> float:
    return (a(input_ids=ids).logits.argmax(-1) == b(input_ids=ids).logits.argmax(-1)).float().mean().item()


# --------------------------------------------------------------------------- entry point


@torch.inference_mode()  # no autograd bookkeeping: less per-step overhead that would mask the model's own cost
def throughput(
    models: dict[str, nn.Module] | nn.Module,
    *,
    prefill_shapes: tuple[tuple[int, int], ...] = PREFILL_SHAPES,
    decode_batches: tuple[int, ...] = DECODE_BATCHES,
    prompt_len: int = DECODE_PROMPT,
    new_tokens: int = NEW_TOKENS,
    warmup: int = 1,
    repeats: int = 5,
    semi_structured: bool = True,
) -> BenchReport:
    """Prefill and decode tokens/s of one model or several, measured interleaved.

    models: {"dense": dense, "pruned": pruned} (the first is the reference for ratios), or a
    single model. All must sit on the same device. On CUDA, every 2:4 model also gets a
    "<name>+2:4" entry running semi-structured sparse kernels (``semi_structured=False``
    to skip).

    >>> report = ptp.throughput({"dense": dense, "pruned": pruned})
    >>> print(report.markdown())
    """
    models = {"model": models} if isinstance(models, nn.Module) else dict(models)
    first = next(iter(models.values()))
    device = model_device(first)
    report = BenchReport(
        device=_device_name(device), dtype=str(next(first.parameters()).dtype).replace("torch.", ""),
        weights_bytes={n: _weight_bytes(m) for n, m in models.items()},
    )
    for m in models.values():
        m.eval()
    if semi_structured:
        add_semi_structured(models, report)
    if device.type == "cpu":
        sizes = set(report.weights_bytes.values())
        sparse = any(type(m).__name__ == "SparseLinear" for model in models.values() for m in model.modules())
        report.notes.append(SPARSE_NOTE if sparse else CPU_NOTE if len(sizes) == 1 else SHAPES_NOTE)
    for batch, length in prefill_shapes:
        report.measurements += measure(models, "prefill", batch, length, prefill_step, length, warmup, repeats)
    for batch in decode_batches:
        make = lambda model, ids: decode_steps(model, ids, new_tokens)  # noqa: E731
        report.measurements += measure(models, "decode", batch, new_tokens, make, prompt_len, warmup, repeats)
    return report


def add_semi_structured(models: dict[str, nn.Module], report: BenchReport) -> None:
    """On CUDA, add a 2:4-kernel copy of every model whose linear layers are 2:4 sparse."""
    for name, model in list(models.items()):
        if model_device(model).type != "cuda" or not _any_two_four(model):
            continue
        sparse, note = semi_structured_copy(model)
        report.notes.append(f"{name}: {note}")
        if sparse is not None:
            models[f"{name}+2:4"] = sparse
            report.weights_bytes[f"{name}+2:4"] = _weight_bytes(sparse)


def _any_two_four(model: nn.Module) -> bool:
    return any(type(m) is nn.Linear and m.weight.any() and is_two_four(m.weight) for m in model.modules())


def _weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers (a semi-structured weight counts its packed storage)."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        # A semi-structured weight holds its kept values and metadata, and (CUTLASS) their transposes.
        parts = ("packed", "meta", "packed_t", "meta_t")
        inner = [getattr(t, a) for a in parts if isinstance(getattr(t, a, None), torch.Tensor)]
        total += sum(x.numel() * x.element_size() for x in inner) if inner else t.numel() * t.element_size()
    return total


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
