"""Scale: prune models larger than memory, resume interrupted runs, spread calibration over processes.

All three work through ``engine.BlockHooks``, around the engine's own per-block loop:

- **Streaming** (``Stream``): the model is built on the meta device (no weights). Each decoder
  block's tensors are read from the safetensors shards just before the block is pruned, written to
  the block's own output shard right after, and dropped. The embeddings are loaded only to capture
  block 0's inputs; the head is never loaded (it is copied, a shard at a time, into the output).
  Calibration activations stay in memory up to ``act_budget`` bytes; above it they live in files,
  read and written one batch at a time. Peak memory: one block, its statistics and solver
  temporaries, and the activations (or one batch of them) — not the depth of the model.
- **Resume**: the output is built in a hidden sibling of ``out``, ``.NAME.ptp-partial``. After
  every block, the block's shard and the activations that feed the next block are on disk before
  ``ptp-state.json`` (replaced atomically: the commit point) records the block as done. A resumed
  run checks that model, config, dtype, process count and calibration tokens are unchanged, reloads
  those activations and continues: the output is identical, tensor for tensor, to an uninterrupted
  run. The finished directory is renamed to ``out`` only at the end, so ``out`` is never partial.
- **Several processes** (``prune_distributed``, or ``Stream`` under ``torchrun``): each rank of a
  ``torch.distributed`` process group takes a contiguous range of whole calibration batches, formed
  exactly as one process forms them (``local_batches``), so every batch's forward is the same bit
  for bit; before a group of layers is solved its float64 statistic sums are added over the ranks
  (``all_reduce_stats``; exact, so the order does not matter), and every rank solves the same
  problem: every rank ends with exactly the weights one process finds with the same batch size.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from . import __version__, checks, io
from .config import ConfigError, PruneConfig
from .engine import (BlockHooks, LayerReport, PruneReport, WeightTally, as_token_batch, find_blocks, log_accounting,
                     prunable_layers, prune)
from .units import find_unit
from .solvers import Hessian, InputNorms

logger = logging.getLogger("ptp")

STATE = "ptp-state.json"  # the commit point of a streamed run; gone once the run is finished
INDEX = "model.safetensors.index.json"
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                     "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


# --------------------------------------------------------------------------- several processes


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched() -> bool:
    """True in a process started by torchrun for a group of more than one."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str | None) -> str | None:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT): NCCL when computing on CUDA, each rank on GPU ``LOCAL_RANK``; gloo on CPU.
    Returns the device this rank computes on (``device`` itself without torchrun)."""
    import torch.distributed as dist

    if not launched():
        return device
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(dist.destroy_process_group)
    if dist.get_rank() != 0:  # one set of progress bars and logs: rank 0's
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    return device


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``ptp ARGV`` as ``nproc`` processes on this machine under torchrun; its exit code.

    ``--nproc`` itself is left out of the processes' arguments: torchrun's parser would take it for
    an abbreviation of its own ``--nproc-per-node`` (and the processes know their number anyway).
    """
    args = [a for i, a in enumerate(argv) if not (a == "--nproc" or a.startswith("--nproc=")
                                                   or (i and argv[i - 1] == "--nproc"))]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "ptp", *args]
    logger.info("launching %d processes: %s", nproc, " ".join(command))
    return subprocess.call(command)


def local_batches(tokens: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, bool]:
    """This rank's calibration samples, and whether its statistics count.

    Batch i is samples [i*batch_size, (i+1)*batch_size), as one process forms them; each rank takes
    a contiguous range of whole batches (the counts differ by at most one), so each batch runs
    through every block in the same shape, hence bit for bit the same, as in one process. A rank
    left without a batch (more ranks than batches) still runs batch 0, to take part in every
    collective in step with the others, but adds nothing to the statistics.
    """
    rank, world = rank_world()
    count = math.ceil(tokens.shape[0] / batch_size)
    first, last = rank * count // world, (rank + 1) * count // world
    if first == last:
        return tokens[:batch_size], False
    return tokens[first * batch_size : last * batch_size], True


def all_reduce_stats(accumulators: list, contribute: bool = True) -> None:
    """Sum calibration statistics over all ranks, in place, so that every rank holds what a single
    process would have accumulated over all the samples.

    ``Hessian`` and ``InputNorms`` keep float64 sums of float32 per-batch terms (the scaling is
    applied when they are read): the sums and the token counts add, exactly, so the result does not
    depend on how the batches were spread. ``contribute=False``: this rank adds nothing (it ran a
    batch only to keep in step; see ``local_batches``).
    """
    import torch.distributed as dist

    for acc in accumulators:
        data = acc.upper if isinstance(acc, Hessian) else acc.sq_sum if isinstance(acc, InputNorms) else None
        if data is None:
            raise TypeError(f"cannot reduce {type(acc).__name__}")
        if not contribute:
            data.zero_()
            acc.tokens = 0
        count = torch.tensor([acc.tokens], dtype=torch.int64, device=data.device)
        dist.all_reduce(count)
        dist.all_reduce(data)
        acc.tokens = int(count.item())


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is true on any rank (so that all ranks take the same branch)."""
    if rank_world()[1] == 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _barrier() -> None:
    if rank_world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


class Distributed(BlockHooks):
    """Sums each group's statistics over the process group before the group is solved.
    ``contributes``: whether this rank's statistics count (``local_batches``)."""

    contributes = True

    def __init__(self, contributes: bool = True):
        self.contributes = contributes

    def reduce(self, accumulators: list) -> None:
        if rank_world()[1] > 1:
            all_reduce_stats(accumulators, self.contributes)


def prune_distributed(model: nn.Module, batches, config: PruneConfig) -> PruneReport:
    """``ptp.prune`` on one rank of a process group: call it on every rank with the same ``batches``;
    each rank runs its share of the batches, the statistics are summed over ranks, and every rank
    ends with the pruned model one process would give with the same ``config.batch_size``.

    >>> torch.distributed.init_process_group("gloo")      # under torchrun
    >>> report = ptp.scale.prune_distributed(model, tokens, ptp.PruneConfig(sparsity="2:4"))
    """
    config = checks.as_config(config)
    mine, contributes = local_batches(as_token_batch(batches), config.batch_size)
    return prune(model, mine, config, Distributed(contributes))


# --------------------------------------------------------------------------- sizes and memory


def parse_size(text: str | int | None) -> int | None:
    """Bytes from ``"2GB"``, ``"512MiB"``, ``"1.5G"`` (binary), ``"0"``; None or "" for no limit.

    >>> parse_size("2GB"), parse_size("1KiB"), parse_size("1K")
    (2000000000, 1024, 1024)
    """
    if text is None or text == "":
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", str(text), re.IGNORECASE)
    if not match:
        raise ConfigError(f"a size is a number with an optional unit such as 512MB, 2GiB or 1.5G; got {text!r}")
    number, prefix, suffix = float(match.group(1)), match.group(2).lower(), match.group(3).lower()
    power = "_kmgt".index(prefix) if prefix else 0
    base = 1000 if suffix == "b" and prefix else 1024  # MB decimal; MiB and bare M binary
    return int(number * base**power)


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages; None when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def would_not_fit(model: str) -> bool:
    """True for a local safetensors directory too large to prune in memory here: the in-memory path
    holds the model and, to verify the saved copy, a reloaded one (times the processes on this node)."""
    folder = Path(model)
    files = list(folder.glob("*.safetensors")) if folder.is_dir() else []
    available = available_memory()
    if not files or available is None:
        return False
    size = sum(f.stat().st_size for f in files)
    needed = 2 * size * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if needed > available:
        logger.info("%s: %.1f GB of weights, %.1f GB of memory available: streaming it block by block",
                    model, size / 1e9, available / 1e9)
        return True
    return False


# --------------------------------------------------------------------------- checkpoints on disk


class Shards:
    """The safetensors files of a model directory: which file holds each tensor; reads a few at a time."""

    def __init__(self, folder: Path, file: str | None = None):
        from safetensors import safe_open

        index = folder / INDEX
        if file is not None:  # one file of a checkpoint being written
            with safe_open(str(folder / file), framework="pt") as f:
                self.file = dict.fromkeys(f.keys(), folder / file)
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                self.file = {str(key): folder / str(name) for key, name in weight_map.items()}
            except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise ConfigError(f"{index} is not a safetensors index ({type(err).__name__}: {err})") from None
        elif (folder / "model.safetensors").is_file():
            with io.integrity.safe_open(folder / "model.safetensors") as f:
                self.file = dict.fromkeys(f.keys(), folder / "model.safetensors")
        else:
            raise ConfigError(f"--stream reads safetensors weights (model.safetensors or {INDEX}); {folder} has none")
        for file in set(self.file.values()):
            if not file.is_file():
                raise ConfigError(f"{index} names {file.name}, which is missing")

    def read(self, keys: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors ``keys``, floating ones cast to ``dtype``; each file is opened once and closed."""
        out = {}
        for file in dict.fromkeys(self.file[key] for key in keys):
            with io.integrity.safe_open(file) as f:
                for key in keys:
                    if self.file[key] == file:
                        tensor = io.integrity.get_tensor(f, file, key)
                        out[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        return {key: out[key] for key in keys}

    def headers(self) -> dict[str, tuple[list[int], str]]:
        """Shape and safetensors dtype ("F32", "BF16", ...) of every tensor, from the file headers only."""
        out = {}
        for file in sorted(set(self.file.values())):
            with io.integrity.safe_open(file) as f:
                for key in f.keys():
                    if self.file.get(key) == file:
                        piece = f.get_slice(key)
                        out[key] = (piece.get_shape(), piece.get_dtype())
        return out


def skeleton(config, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model of a transformers ``config`` with every parameter on the meta device (no memory).
    Non-persistent buffers computed at construction (rotary tables) are real: they are never saved."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cannot build the model: {first}") from None
    return model.eval()


def checkpoint_dtype(config, headers: dict) -> torch.dtype:
    """What ``from_pretrained(dtype="auto")`` would pick: the config's dtype, else the first
    floating tensor's."""
    named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(named, torch.dtype):
        return named
    if isinstance(named, str) and isinstance(getattr(torch, named, None), torch.dtype):
        return getattr(torch, named)
    names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    return next((names[d] for _, d in headers.values() if d in names), torch.float32)


def materialise(module: nn.Module, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    """Give ``module`` real tensors: ``tensors`` maps ``prefix + local name`` to the values."""
    for key, tensor in tensors.items():
        owner_name, _, attr = key.removeprefix(prefix).rpartition(".")
        owner = module.get_submodule(owner_name)
        if attr in owner._parameters:
            old = owner._parameters[attr]
            owner._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad)
        else:
            owner._buffers[attr] = tensor


def trim_heap() -> None:
    """Hand the heap's freed pages back to the OS (glibc ``malloc_trim``; nothing elsewhere).

    Each block's tensors are freed when the block is done, but glibc keeps small-to-medium freed
    chunks (up to its 32 MB mmap threshold) in a fragmented heap: measured on a 10-block model
    with 1024-wide layers, the resident size after each block crept from 571 to 833 MiB without
    this, and stayed at 400 MiB with it.
    """
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        _LIBC = ctypes.CDLL(name) if name else False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


_LIBC = None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard(path: Path, tensors: dict[str, torch.Tensor], verify: bool = True) -> None:
    """Write a safetensors file atomically (a temporary name, synced, then renamed) and, with
    ``verify``, read it back and compare every tensor bit for bit."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    _fsync(tmp)
    os.replace(tmp, path)
    if verify:
        with safe_open(str(path), framework="pt") as f:
            for key, tensor in tensors.items():
                if not io.bit_equal(tensor, f.get_tensor(key)):
                    raise RuntimeError(f"{path}: tensor {key} differs from the one in memory after writing")


# --------------------------------------------------------------------------- activations on disk


class ActivationFile:
    """A tensor [n, ...] kept in a file, read and written by slices along dim 0 (pread/pwrite:
    no memory map, so only the slice in hand counts towards the process's resident memory)."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: torch.dtype):
        self.path, self.shape, self.dtype = Path(path), tuple(shape), dtype
        self.row = math.prod(shape[1:]) * dtype.itemsize
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self.fd).st_size != shape[0] * self.row:
            os.ftruncate(self.fd, shape[0] * self.row)

    def _rows(self, sl: slice) -> tuple[int, int]:
        start, stop, step = sl.indices(self.shape[0])
        if step != 1:
            raise IndexError("activations are read in contiguous slices")
        return start, max(stop, start)

    def read(self, sl: slice) -> torch.Tensor:
        start, stop = self._rows(sl)
        buf = torch.empty((stop - start) * self.row, dtype=torch.uint8)
        view, offset = memoryview(buf.numpy()), start * self.row
        while len(view):
            n = os.preadv(self.fd, [view], offset)
            if n <= 0:
                raise OSError(f"{self.path}: short read")
            view, offset = view[n:], offset + n
        return buf.view(self.dtype).view(stop - start, *self.shape[1:])

    def write(self, sl: slice, value: torch.Tensor) -> None:
        start, stop = self._rows(sl)
        data = value.detach().to("cpu", self.dtype).contiguous().reshape(-1).view(torch.uint8)
        if data.numel() != (stop - start) * self.row:
            raise ValueError(f"writing {data.numel()} bytes into {stop - start} rows of {self.row}")
        view, offset = memoryview(data.numpy()), start * self.row
        while len(view):
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class DiskActivations:
    """Activations [n, L, d] on disk, in two files: block j reads its inputs from file ``j % 2`` and
    writes its outputs to the other, so the inputs of the block being pruned stay intact until its
    outputs are complete — they are what a resumed run starts from. ``x[a:b]`` reads a batch,
    ``x[a:b] = y`` writes one; ``advance()`` syncs the outputs and makes them the next inputs."""

    def __init__(self, paths: tuple[Path, Path], shape, dtype, block: int):
        self.files = [ActivationFile(path, shape, dtype) for path in paths]
        self.shape, self.dtype, self.block = tuple(shape), dtype, block

    def __getitem__(self, sl: slice) -> torch.Tensor:
        return self.files[self.block % 2].read(sl)

    def __setitem__(self, sl: slice, value: torch.Tensor) -> None:
        self.files[(self.block + 1) % 2].write(sl, value)

    def advance(self) -> None:
        self.files[(self.block + 1) % 2].sync()
        self.block += 1

    def close(self) -> None:
        for file in self.files:
            file.close()


# --------------------------------------------------------------------------- streaming


class Stream(Distributed):
    """Prune the safetensors model in ``model_dir`` into ``out`` one decoder block at a time.

    Construction checks everything cheap (the directory, the output, an interrupted run, N:M
    widths) and builds the weightless model (``self.model``, whose config the caller may read);
    ``run(tokens)`` does the work. Under torchrun every rank runs it with the same tokens; rank 0
    writes the output, every rank its own activation checkpoints (so with several nodes, ``out``
    must be on a filesystem they share).

    act_budget: bytes of calibration activations kept in memory (per rank); above it they go to
                files next to the checkpoint. None: no limit.
    resume:     continue the interrupted run found in ``.NAME.ptp-partial`` (or start one).
    structured: structured pruning instead of ``config``'s solver: the keyword arguments of
                ``ptp.prune_structured`` (ratio, attn_ratio, importance, ...) but for batch_size,
                device, blocks and the reconstruction settings, which come from ``config``. Each
                block is written in the pruned config's shapes.
    """

    def __init__(self, model_dir, out, config: PruneConfig, *, dtype: str = "auto", resume: bool = False,
                 overwrite: bool = False, act_budget: int | None = None, trust_remote_code: bool = False,
                 structured: dict | None = None):
        self.source = Path(model_dir).expanduser()
        if not self.source.is_dir():
            raise ConfigError(f"--stream needs a local model directory with safetensors weights; {model_dir} is not one")
        if dtype != "auto" and dtype not in io.DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; choose auto, {', '.join(io.DTYPES)}")
        self.config, self.resume, self.act_budget, self.structured = config, resume, act_budget, structured
        self.rank, self.world = rank_world()
        self.shards = Shards(self.source)
        self.out = io.check_out_dir(out, overwrite)
        self.work = self.out.parent / f".{self.out.name}.ptp-partial"
        if (self.work / STATE).exists() and not resume:
            raise ConfigError(f"{self.work} holds an interrupted run of this output: "
                              "pass --resume to continue it, or delete it to start over")
        headers = self.shards.headers()
        from transformers import AutoConfig

        try:
            hf_config = AutoConfig.from_pretrained(self.source, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read the config of {model_dir}: {str(err).strip().splitlines()[0]}") from None
        self.dtype = io.DTYPES[dtype] if dtype != "auto" else checkpoint_dtype(hf_config, headers)
        self.model = skeleton(hf_config, self.dtype, trust_remote_code)
        self.blocks_name, self.blocks = find_blocks(self.model, config.blocks)
        if structured is None:
            prunable_layers(self.model, config)  # an N:M width that cannot work fails here, before any work
        else:
            from .structured import check_options, check_uniform

            check_options(structured.get("ratio", 0.35), structured.get("attn_ratio"),
                          structured.get("importance", "flap"), structured.get("compensation", "ls"),
                          structured.get("experts_ratio"))
            check_uniform(self.blocks)
        self._plan(headers)
        self.record: dict = {}

    def _plan(self, headers: dict) -> None:
        """Which checkpoint tensors each block needs, what is outside the blocks, and the output shards:
        one per block, then the outside tensors packed into shards no larger than a block's."""
        prefix = f"{self.blocks_name}."
        wanted = self.model.state_dict()  # meta tensors: names only
        self.block_keys = [[f"{prefix}{i}.{k}" for k in block.state_dict()] for i, block in enumerate(self.blocks)]
        self.outside = [k for k in self.shards.file if not k.startswith(prefix) and k in wanted]
        head = self.model.get_output_embeddings()
        self.head_keys = {f"{name}.{p}" for name, m in self.model.named_modules() if m is head and head is not None
                          for p, _ in m.named_parameters(recurse=False)}
        tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        missing = [k for keys in self.block_keys for k in keys if k not in self.shards.file]
        missing += [k for k in wanted if not k.startswith(prefix) and k not in self.shards.file
                    and not (tied and k in self.head_keys)]
        if missing:
            raise ConfigError(f"{self.source} has no tensor {missing[0]} ({len(missing)} missing): --stream reads "
                              "checkpoints whose tensor names are the model's own, as save_pretrained writes them")
        size = {k: math.prod(shape) * SAFETENSORS_BYTES.get(d, 4) for k, (shape, d) in headers.items()}
        limit = max(sum(size.get(k, 0) for k in keys) for keys in self.block_keys)
        groups: list[list[str]] = []
        for key in self.outside:
            if not groups or (sum(size[k] for k in groups[-1]) + size[key] > limit):
                groups.append([])
            groups[-1].append(key)
        total = len(self.blocks) + len(groups)
        name = lambda j: f"model-{j + 1:05d}-of-{total:05d}.safetensors"  # noqa: E731
        self.block_files = [name(i) for i in range(len(self.blocks))]
        self.outside_files = [(name(len(self.blocks) + g), keys) for g, keys in enumerate(groups)]

    # ---------------------------------------------------------------- the run

    def run(self, batches, tokenizer=None, meta: dict | None = None, verify: bool = True) -> PruneReport:
        """Prune, checkpointing after every block, and (rank 0) publish the finished directory to
        ``out``. An error or a kill leaves the checkpoint for ``resume``; ``out`` is untouched."""
        tokens = as_token_batch(batches)
        mine, self.contributes = local_batches(tokens, self.config.batch_size)
        self.verify = verify
        self.fingerprint = {
            "ptp_version": __version__, "model": str(self.source.absolute()), "dtype": str(self.dtype),
            "config": {k: v for k, v in self.config.to_dict().items() if k != "device"},
            "structured": self.structured,
            "processes": self.world, "tokens": list(tokens.shape),
            "tokens_sha256": hashlib.sha256(tokens.contiguous().numpy().tobytes()).hexdigest(),
        }
        self.done, self.saved = self._open_state()
        self.activations = "memory"
        capture = [k for k in self.outside if k not in self.head_keys]  # the head is not needed before block 0
        materialise(self.model, "", self.shards.read(capture, self.dtype))
        self.disk = self.twin = None
        try:
            report = self._prune(mine)
        except BaseException as err:
            if isinstance(err, ConfigError) and self.rank == 0 and self._committed() == 0:
                shutil.rmtree(self.work, ignore_errors=True)  # refused before any block: nothing to resume
            elif self.rank == 0 and (self.work / STATE).exists():
                logger.error("interrupted: %d of %d blocks are saved in %s; run again with --resume to continue",
                             self._committed(), len(self.blocks), self.work)
            raise
        finally:
            for buffer in (self.disk, self.twin):
                if isinstance(buffer, DiskActivations):
                    buffer.close()
        if self.rank == 0:
            self._finish(report, tokenizer, meta, verify)
        _barrier()
        return report

    def _prune(self, tokens: torch.Tensor):
        if self.structured is None:
            return prune(self.model, tokens, self.config, self)
        from .structured import prune_structured

        c = self.config
        return prune_structured(self.model, tokens, **self.structured, batch_size=c.batch_size, device=c.device,
                                blocks=c.blocks, tuning=c if c.tunes_blocks else None, hooks=self)

    def _committed(self) -> int:
        try:
            return json.loads((self.work / STATE).read_text())["done"]
        except (OSError, ValueError, KeyError):
            return 0

    def _open_state(self) -> tuple[int, dict]:
        """Read (resume) or start the checkpoint; every rank reads it, so all refuse a mismatch alike."""
        state_path = self.work / STATE
        state = json.loads(state_path.read_text()) if self.resume and state_path.is_file() else None
        if state is not None and state["fingerprint"] != self.fingerprint:
            old, new = state["fingerprint"], self.fingerprint
            diff = [k for k in new if old.get(k) != new[k]]
            if "config" in diff:
                diff += [f"config.{k}" for k in new["config"] if old["config"].get(k) != new["config"][k]]
            raise ConfigError(f"the interrupted run in {self.work} used different settings ({', '.join(diff)}); "
                              "delete it to start over")
        _barrier()  # every rank has read the state before rank 0 touches it
        if self.rank == 0 and state is None:
            shutil.rmtree(self.work, ignore_errors=True)  # nothing committed there: start clean
            self.work.mkdir(parents=True)
            self._commit(0)
        _barrier()
        if state is None:
            return 0, {}
        logger.info("resuming %s: %d of %d blocks already pruned", self.work, state["done"], len(self.blocks))
        return state["done"], state

    def _commit(self, done: int, report: PruneReport | None = None) -> None:
        """Record that blocks < ``done`` are written and their activations saved (atomic replace)."""
        tmp = self.work / (STATE + ".tmp")
        layers = [asdict(layer) for layer in getattr(report, "layers", [])]
        blocks = [asdict(block) for block in getattr(report, "blocks", [])]  # structured
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "done": done, "layers": layers, "blocks": blocks,
                                   "reconstruction": report.reconstruction if report else []}, indent=1))
        _fsync(tmp)
        os.replace(tmp, self.work / STATE)
        _fsync(self.work)

    def _slots(self, kind: str = "activations") -> tuple[Path, Path]:
        """The two files of the pruned model's activations, or (``kind="dense"``) of the dense
        model's ones that block reconstruction tunes towards."""
        return tuple(self.work / f"{kind}-rank{self.rank}-{slot}.bin" for slot in (0, 1))

    # ---------------------------------------------------------------- hooks called by engine.prune

    def alloc(self, shape, dtype, device):
        nbytes = math.prod(shape) * dtype.itemsize * (2 if self.config.tunes_blocks else 1)  # + the dense twin
        if self.act_budget is None or nbytes <= self.act_budget:
            return super().alloc(shape, dtype, device)
        self.activations = "disk"
        logger.info("activations: %.2f GB per rank, above the %.2f GB budget: kept on disk in %s",
                    nbytes / 1e9, self.act_budget / 1e9, self.work)
        # Resuming at block k: the capture's writes go to the file block k will write anyway, and its
        # reads come from the saved inputs of block k.
        self.disk = DiskActivations(self._slots(), shape, dtype, block=self.done if self.done else -1)
        return self.disk

    def start(self, hidden, report: PruneReport):
        self.model.to("meta")  # the embeddings are done with (no block is loaded yet)
        trim_heap()
        if self.structured is None:
            report.layers += [LayerReport(**layer) for layer in self.saved.get("layers", [])]
        else:
            from .structured import BlockReport

            report.blocks += [BlockReport(**block) for block in self.saved.get("blocks", [])]
        report.reconstruction += self.saved.get("reconstruction", [])
        if isinstance(hidden, DiskActivations):
            if self.done == 0:
                hidden.advance()  # the captured inputs become block 0's
            return hidden, self.done
        if self.done:
            self._load(hidden, self._slots()[self.done % 2])
        return hidden, self.done

    def _load(self, buffer: torch.Tensor, path: Path) -> None:
        saved = ActivationFile(path, buffer.shape, buffer.dtype)
        for a in range(0, buffer.shape[0], self.config.batch_size):
            buffer[a : a + self.config.batch_size] = saved.read(slice(a, a + self.config.batch_size))
        saved.close()

    def _save(self, buffer: torch.Tensor, path: Path) -> None:
        saved = ActivationFile(path, buffer.shape, buffer.dtype)
        for a in range(0, buffer.shape[0], self.config.batch_size):
            saved.write(slice(a, a + self.config.batch_size), buffer[a : a + self.config.batch_size])
        saved.sync()
        saved.close()

    def dense_twin(self, hidden):
        # Kept where the pruned activations are and checkpointed with them, in files of their own.
        if isinstance(hidden, DiskActivations):
            self.twin = DiskActivations(self._slots("dense"), hidden.shape, hidden.dtype, block=hidden.block)
            if not self.done:  # a fresh run: the captured inputs are the dense ones too
                inputs = self.twin.files[self.twin.block % 2]
                for a in range(0, hidden.shape[0], self.config.batch_size):
                    inputs.write(slice(a, a + self.config.batch_size), hidden[a : a + self.config.batch_size])
        else:
            self.twin = hidden.clone()
            if self.done:
                self._load(self.twin, self._slots("dense")[self.done % 2])
        return self.twin

    def twin_written(self, twin) -> None:
        if isinstance(twin, DiskActivations):
            twin.advance()

    def load_block(self, index: int, block: nn.Module) -> None:
        materialise(block, f"{self.blocks_name}.{index}.", self.shards.read(self.block_keys[index], self.dtype))

    def block_done(self, index: int, block: nn.Module, hidden, report: PruneReport) -> None:
        prefix = f"{self.blocks_name}.{index}."
        pruned = [layer.name for layer in getattr(report, "layers", []) if layer.name.startswith(prefix)]
        if self.rank == 0:
            io._canonical_zeros(self.model, pruned)  # as io.save does: -0.0 -> +0.0 in pruned weights
            for name in pruned if self.verify else ():
                io.check_sparsity(name, find_unit(self.model, name).matrix(), self.config.sparsity)
            tensors = {prefix + k: v for k, v in block.state_dict().items()}
            write_shard(self.work / self.block_files[index], tensors, self.verify)
        if isinstance(hidden, DiskActivations):
            hidden.advance()
        else:
            self._save(hidden, self._slots()[(index + 1) % 2])
        if isinstance(self.twin, torch.Tensor):  # on disk, it was synced when written
            self._save(self.twin, self._slots("dense")[(index + 1) % 2])
        _barrier()  # every rank's activations are on disk
        if self.rank == 0:
            self._commit(index + 1, report)
        _barrier()  # committed: the older activations may now be overwritten
        block.to("meta")
        trim_heap()

    # ---------------------------------------------------------------- the output directory

    def _finish(self, report: PruneReport, tokenizer, meta: dict | None, verify: bool) -> None:
        """Copy the tensors outside the blocks, write index, config, tokenizer and ptp.json, check
        the set of tensors, drop the checkpoint files and rename the directory to ``out``."""
        # A block's file holds what its (pruned) block held: the planned names, plus the biases that
        # structured pruning's bias compensation adds.
        weight_map = {key: file for file in self.block_files for key in Shards(self.work, file).file}
        # The weight accounting is recounted from the files written (a resumed run never held its
        # first blocks, and the tensors outside the blocks are not in memory now).
        tally = WeightTally(self.blocks_name, self.config.skip) if self.structured is None else None
        for i, block in enumerate(self.blocks if tally else ()):
            prefix = f"{self.blocks_name}.{i}."
            materialise(block, prefix, Shards(self.work, self.block_files[i]).read(self.block_keys[i]))
            tally.add_block(i, block)
            block.to("meta")
        for file, keys in self.outside_files:
            tensors = self.shards.read(keys, self.dtype)
            for key, tensor in tensors.items() if tally else ():
                tally.add_outside(key, tensor)
            write_shard(self.work / file, tensors, verify)
            weight_map.update(dict.fromkeys(keys, file))
            del tensors
            trim_heap()
        if tally:
            report.accounting = tally.result()
            log_accounting(report)
        from safetensors import safe_open

        total = 0
        shapes = {k: list(v.shape) for k, v in self.model.state_dict().items()}  # meta: the model's own shapes
        for file in dict.fromkeys(weight_map.values()):
            with safe_open(str(self.work / file), framework="pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    total += math.prod(piece.get_shape()) * SAFETENSORS_BYTES.get(piece.get_dtype(), 4)
                    if verify and list(piece.get_shape()) != shapes.get(key):
                        raise RuntimeError(f"{file}: {key} has shape {piece.get_shape()}, the model {shapes.get(key)}")
        tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        missing = [k for k in shapes if k not in weight_map and not (tied and k in self.head_keys)]
        if verify and missing:
            raise RuntimeError(f"the output has no {missing[0]} ({len(missing)} tensors missing)")
        (self.work / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                   "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        self.model.config.save_pretrained(self.work)
        io._strip_foreign_config(self.work / "config.json")
        if (self.source / "generation_config.json").is_file():
            shutil.copy2(self.source / "generation_config.json", self.work / "generation_config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(self.work)
        if self.structured is None:
            self.record = io._record(self.model, report, self.config.sparsity, meta, "dense")
        else:  # as pipeline.run records a structured prune
            self.record = io._record(self.model, None, None, {**(meta or {}), "structured": report.to_dict()}, "dense")
        self.record["stream"] = {"activations": self.activations, "act_budget_bytes": self.act_budget,
                                 "processes": self.world, "resumed_at_block": self.done,
                                 "shards": len(self.block_files) + len(self.outside_files)}
        for leftover in [STATE, *(p.name for p in self.work.glob("*-rank*.bin"))]:
            (self.work / leftover).unlink(missing_ok=True)
        self.record = io.integrity.write_record(self.work, self.record)  # last: checksums of every file
        io.publish_dir(self.work, self.out)
        logger.info("saved %s (dense, %d shards%s)", self.out, len(set(weight_map.values())),
                    ", every tensor verified" if verify else "")


def prune_streaming(model_dir, batches, config: PruneConfig, out, *, tokenizer=None, dtype: str = "auto",
                    resume: bool = False, act_budget: int | None = None, overwrite: bool = False,
                    verify: bool = True, meta: dict | None = None) -> PruneReport:
    """Prune the safetensors model in ``model_dir`` to ``out`` without ever holding it in memory.

    batches: LongTensor [n, L] of calibration tokens (the same on every rank under torchrun).
    The output is an ordinary checkpoint (one shard per decoder block, index, config, tokenizer
    when given, ptp.json) that ``from_pretrained`` loads. See ``Stream`` for the options.

    >>> ptp.scale.prune_streaming("big-model", tokens, ptp.PruneConfig(sparsity="2:4"), "out/big-2of4")
    """
    stream = Stream(model_dir, out, config, dtype=dtype, resume=resume, overwrite=overwrite, act_budget=act_budget)
    return stream.run(batches, tokenizer=tokenizer, meta=meta, verify=verify)


def prune_structured_streaming(model_dir, batches, out, ratio: float = 0.35, *, tokenizer=None, dtype: str = "auto",
                               resume: bool = False, act_budget: int | None = None, overwrite: bool = False,
                               verify: bool = True, meta: dict | None = None, batch_size: int = 8,
                               device: str | None = None, blocks: str | None = None,
                               tuning: PruneConfig | None = None, **options):
    """``ptp.prune_structured`` of the safetensors model in ``model_dir`` into ``out``, one block in
    memory at a time, checkpointed after every block like ``prune_streaming`` (``resume``,
    ``act_budget``). ``options``: attn_ratio, experts_ratio, importance, compensation, damp.
    ``tuning``: a ``PruneConfig`` with ``reconstruct=True`` (its recon_* settings are used).

    >>> ptp.scale.prune_structured_streaming("big-model", tokens, "out/big-s35", 0.35)
    """
    tuning = tuning or PruneConfig()
    config = PruneConfig(batch_size=batch_size, device=device, blocks=blocks, reconstruct=tuning.reconstruct,
                         recon_epochs=tuning.recon_epochs, recon_lr=tuning.recon_lr, recon_batch=tuning.recon_batch,
                         recon_holdout=tuning.recon_holdout, recon_norms=tuning.recon_norms)
    stream = Stream(model_dir, out, config, dtype=dtype, resume=resume, overwrite=overwrite, act_budget=act_budget,
                    structured=dict(ratio=ratio, **options))
    return stream.run(batches, tokenizer=tokenizer, meta=meta, verify=verify)
