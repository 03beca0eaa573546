"""Trust in what ptp reads back: checksums, claims checked against tensors, readable files.

A directory ptp writes ends with ``ptp.json``, whose ``integrity`` entry holds the SHA-256 of
every other file it wrote and of the record itself (everything but ``integrity``), taken just
before the final rename. Every ptp load checks them (``verify=False`` / ``--no-verify`` skips
it), then checks that each pruned layer holds the number of zeros the record claims. So a
flipped byte, a truncated shard or an edited record fails with one line naming the file, not
with a NaN perplexity. The structural checks (``safe_open``, ``compressed_index``) run always:
they are what turns a file that is not what it says into a ``ConfigError`` instead of a
traceback, whether or not checksums were recorded.
"""

from __future__ import annotations

import math

import hashlib
import json
import logging
import re
from pathlib import Path

import torch

from .config import ConfigError

logger = logging.getLogger("ptp")

RECORD = "ptp.json"
FORMATS = ("dense", "compressed")
# Files ptp itself adds to a directory it wrote, after the save (ptp eval / bench / report).
ADDED_LATER = ("eval.md", "bench.md", "report.md", "layers.png")
# What save_pretrained (model, tokenizer, generation config) writes: the files ptp may replace
# with --overwrite in a directory saved before checksums were recorded.
CHECKPOINT_FILE = re.compile(
    r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens|vocab|"
    r"preprocessor_config|chat_template)\.json|chat_template\.jinja|merges\.txt|tokenizer\.model|"
    r"spiece\.model|.*\.safetensors|.*\.safetensors\.index\.json|" + re.escape(RECORD)
)
NO_VERIFY = "pass --no-verify (Python: verify=False) to load it anyway"


# --------------------------------------------------------------------------- the record


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def record_digest(record: dict) -> str:
    """SHA-256 of the record without its ``integrity`` entry, in a canonical JSON form."""
    body = {k: v for k, v in record.items() if k != "integrity"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_record(folder: Path, record: dict) -> dict:
    """Seal ``folder``: checksum every file in it, then write ``record`` with them as ptp.json.

    Call it last, when every other file is written. Returns the record (``integrity`` added)."""
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != RECORD}
    record.pop("integrity", None)
    record["integrity"] = {"algorithm": "sha256", "files": files, "record": record_digest(record)}
    (folder / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def read_record(folder: str | Path) -> dict | None:
    """``folder``'s ptp.json as a dict; None when there is none. Raises ConfigError when it is not
    a genuine ptp record (not JSON, not an object, no ``ptp_version`` and ``format``)."""
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    return parse_record(path)


def parse_record(path: Path) -> dict:
    """The record in the file ``path``; ConfigError unless it is a genuine ptp record."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"{path} is not a ptp record: {_first_line(err)}") from None
    problem = record_problem(record)
    if problem:
        raise ConfigError(f"{path} is not a ptp record: {problem}")
    return record


def record_problem(record) -> str | None:
    """Why ``record`` is not something ptp wrote (None when it is)."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    if not isinstance(record.get("ptp_version"), str) or record.get("format") not in FORMATS:
        return "no ptp_version and format"
    integrity = record.get("integrity")
    if "integrity" in record and not (isinstance(integrity, dict) and integrity.get("algorithm") == "sha256"
                                      and isinstance(integrity.get("files"), dict)
                                      and isinstance(integrity.get("record"), str)):
        return "its integrity entry is malformed"
    report = record.get("report")  # none for structured pruning: nothing is sparse
    layers = [] if report is None else report.get("layers", []) if isinstance(report, dict) else None
    if layers is None or not isinstance(layers, list) or not all(_layer_ok(l) for l in layers):
        return "its per-layer report is malformed"
    return None


def _layer_ok(layer) -> bool:
    """A per-layer entry: a name, a numeric sparsity, an error that is a number or null (a layer that
    saw no calibration tokens has none), and, when present, an integer count of zeros."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    return (isinstance(layer, dict) and isinstance(layer.get("name"), str) and number(layer.get("sparsity"))
            and (layer.get("error") is None or number(layer.get("error")))
            and isinstance(layer.get("zeros", 0), int) and not isinstance(layer.get("zeros", 0), bool))


def check_files(folder: str | Path) -> dict | None:
    """Check ``folder`` against its ptp.json: the record unchanged, every recorded file present and
    with its recorded SHA-256. Returns the record (None for a directory ptp did not write).
    Raises ConfigError naming the first file that fails."""
    folder = Path(folder)
    record = read_record(folder)
    if record is None:
        return None
    integrity = record.get("integrity")
    if integrity is None:  # a record from before checksums; the per-layer claims are still checked
        logger.warning("%s: ptp.json records no checksums (saved by an older ptp): its files are not checked", folder)
        return record
    if record_digest(record) != integrity["record"]:
        raise ConfigError(f"{folder / RECORD} was changed after it was saved (its checksum no longer matches); "
                          + NO_VERIFY)
    for name, digest in integrity["files"].items():
        path = folder / name
        if not path.is_file():
            raise ConfigError(f"{path} is missing (ptp.json lists it); " + NO_VERIFY)
        if sha256_file(path) != digest:
            raise ConfigError(f"{path} is corrupt: its SHA-256 differs from the one recorded when it was saved; "
                              + NO_VERIFY)
    logger.info("checked %s: %d files match their recorded SHA-256", folder, len(integrity["files"]))
    return record


def check_claims(model: torch.nn.Module, record: dict | None, folder) -> None:
    """Every layer of the record's report holds the zeros (or, in older records, the sparsity) it
    claims. Raises ConfigError naming the first layer that does not."""
    from .units import find_unit

    for layer in ((record or {}).get("report") or {}).get("layers", []):
        try:
            weight = find_unit(model, layer["name"]).matrix()
        except (KeyError, AttributeError):
            raise ConfigError(f"{folder}: ptp.json reports layer {layer['name']}, which the model does not have") from None
        zeros = int((weight == 0).sum())
        claimed = layer.get("zeros") or round(layer["sparsity"] * weight.numel())
        if zeros != claimed:
            raise ConfigError(f"{folder}: layer {layer['name']} has {zeros} zero weights "
                              f"({zeros / weight.numel():.4f}), ptp.json claims {claimed} ({layer['sparsity']:.4f}); "
                              + NO_VERIFY)


# --------------------------------------------------------------------------- readable files


def safe_open(path: Path):
    """``safetensors.safe_open`` whose failures (a truncated file, a garbled header) are ConfigErrors."""
    from safetensors import safe_open as _open

    try:
        return _open(str(path), framework="pt")
    except Exception as err:  # SafetensorError has no importable base besides Exception
        raise ConfigError(f"{path} is not a readable safetensors file: {_first_line(err)}") from None


def get_tensor(f, path: Path, key: str) -> torch.Tensor:
    try:
        return f.get_tensor(key)
    except Exception as err:  # data outside the file, a bad dtype: the header lies
        raise ConfigError(f"{path}: tensor {key} cannot be read: {_first_line(err)}") from None


def compressed_index(f, path: Path) -> dict:
    """The ``ptp_compressed`` metadata of a ``*.ptp.safetensors`` file, checked against its tensors:
    {key: {"shape": [out, in], "transposed": bool}}, with ``key:values`` and ``key:mask`` present."""
    try:
        index = json.loads((f.metadata() or {}).get("ptp_compressed", "{}"))
    except ValueError as err:
        raise ConfigError(f"{path}: its ptp_compressed metadata is not JSON: {err}") from None
    keys = set(f.keys())
    if not isinstance(index, dict):
        raise ConfigError(f"{path}: its ptp_compressed metadata is not an object")
    for key, info in index.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        if not (isinstance(shape, list) and len(shape) in (2, 3) and all(type(s) is int and s > 0 for s in shape)
                and isinstance(info.get("transposed"), bool)):
            raise ConfigError(f"{path}: metadata of {key} is malformed: {info!r}")
        if f"{key}:values" not in keys or f"{key}:mask" not in keys:
            raise ConfigError(f"{path}: {key} has no values or no mask tensor")
    return index


def check_packed(path: Path, key: str, values: torch.Tensor, bits: torch.Tensor, shape: list[int]) -> None:
    """A mask of ceil(out*in/8) bytes whose set bits are exactly as many as the kept values."""
    numel = math.prod(shape)
    if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != (numel + 7) // 8:
        raise ConfigError(f"{path}: mask of {key} is {bits.numel()} {bits.dtype} entries; "
                          f"shape {shape} needs {(numel + 7) // 8} uint8 bytes")
    if not values.is_floating_point():
        raise ConfigError(f"{path}: values of {key} are {values.dtype}, not floating point")
    kept = int(_popcount(bits, numel))
    if kept != values.numel():
        raise ConfigError(f"{path}: mask of {key} marks {kept} kept weights, but {values.numel()} values are stored")


def _popcount(bits: torch.Tensor, numel: int) -> int:
    import numpy as np

    return int(np.unpackbits(bits.numpy(), count=numel).sum())


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --------------------------------------------------------------------------- --overwrite


def overwrite_problem(folder: Path) -> str | None:
    """Why ``--overwrite`` must not delete ``folder`` (None when it may): it must hold a genuine
    ptp record, and nothing but files ptp writes (those the record lists, checkpoint and tokenizer
    files, and ptp's own reports), so that no file of the user's is ever deleted."""
    try:
        record = read_record(folder)
    except ConfigError as err:
        return str(err)
    if record is None:
        return "it has files but no ptp.json, so ptp did not write it"
    listed = set((record.get("integrity") or {}).get("files", {}))
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()
                     if p.is_symlink() or not p.is_file()
                     or not (p.name in listed or p.name in ADDED_LATER or CHECKPOINT_FILE.fullmatch(p.name)))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        return f"it holds entries ptp does not write ({shown}); move them away or choose another --out"
    return None


# --------------------------------------------------------------------------- ptp report


def stored_zeros(folder: Path, names: list[str]) -> dict[str, tuple[int, int]]:
    """(zeros, numel) of the weight of each layer in ``names``, read from ``folder``'s safetensors
    files (dense or compressed) without building the model."""
    wanted = {f"{name}.weight": name for name in names}
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file) as f:
            index = compressed_index(f, file) if file.name.endswith(".ptp.safetensors") else {}
            for key in (k for k in f.keys() if k in wanted):
                tensor = get_tensor(f, file, key)
                out[wanted[key]] = (int((tensor == 0).sum()), tensor.numel())
            for key in (k for k in index if k in wanted):
                values = get_tensor(f, file, f"{key}:values")
                numel = index[key]["shape"][0] * index[key]["shape"][1]
                out[wanted[key]] = (numel - int(torch.count_nonzero(values)), numel)
    return out


def measured_record(path: str | Path, verify: bool = True) -> dict:
    """The ptp.json of ``path`` (a directory, or the file) with each layer's sparsity and zeros as
    its stored weights have them. Refuses (ConfigError) a record that disagrees with the tensors:
    the report must describe the model, not what someone wrote into ptp.json."""
    from .report import layer_rows

    path = Path(path)
    folder, file = (path, path / RECORD) if path.is_dir() else (path.parent, path)
    if not file.is_file():
        raise ConfigError(f"no ptp.json in {path}: not a directory written by ptp prune")
    record = parse_record(file)
    if verify and file.name == RECORD:
        check_files(folder)
    if "structured" in record:  # nothing is sparse: the record must describe the config on disk
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        wrong = [k for k, v in record["structured"].get("config", {}).items() if config.get(k) != v]
        if wrong:
            raise ConfigError(f"{folder}: ptp.json says {wrong[0]} is {record['structured']['config'][wrong[0]]}, "
                              f"config.json has {config.get(wrong[0])}: the record does not describe this model")
        return record
    layers = layer_rows(record)
    zeros = stored_zeros(folder, [layer["name"] for layer in layers])
    for layer in layers:
        if layer["name"] not in zeros:
            raise ConfigError(f"{folder}: ptp.json reports layer {layer['name']}, whose weight is in no safetensors file")
        count, numel = zeros[layer["name"]]
        claimed = layer.get("zeros") or round(layer["sparsity"] * numel)
        if count != claimed or abs(count / numel - layer["sparsity"]) > 0.5 / numel:
            raise ConfigError(f"{folder}: ptp.json says {layer['name']} has sparsity {layer['sparsity']:.4f}, "
                              f"its stored weight has {count / numel:.4f}: the record does not describe these tensors")
        layer.update(sparsity=count / numel, zeros=count)
    return record
