"""Calibration data: token windows from a named recipe, a local file or directory, or the model itself.

Every text source ends the same way: one long token stream ``[1, T]`` from which
``random_windows`` draws ``nsamples`` windows of ``seqlen`` tokens (recipes may instead draw
each window from one random document, as the papers do for C4). ``self`` skips text entirely:
the model samples its own calibration sequences.

Sources are resolved in this order: ``self``; an existing path (a ``.json`` recipe file, a
``.txt``/``.jsonl``/``.parquet`` file, or a directory of them); a recipe name in ``calib/``.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import ConfigError

logger = logging.getLogger("ptp")

# Recipe files: the copy an installed wheel carries inside the package (see setup.py), else the
# repository's top-level calib/ folder, next to the package (a source checkout, an editable install).
_PACKAGED = Path(__file__).resolve().parent / "calib"
RECIPE_DIR = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parent.parent / "calib"
# datasets' packaged builder for each local file kind.
BUILDERS = {".txt": "text", ".jsonl": "json", ".parquet": "parquet"}
# Self-calibration sampling (Williams et al. 2024 sample from the model's own distribution,
# starting at BOS). Temperature 1 keeps that distribution; top-p 0.95 drops the far tail of
# rare tokens, which otherwise derails a small model into unreadable text.
SELF_TEMPERATURE = 1.0
SELF_TOP_P = 0.95
SELF_BATCH = 16


def random_windows(token_ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Draw ``nsamples`` windows of ``seqlen`` tokens from one token stream.

    token_ids: LongTensor [1, T] (or [T]): the whole source tokenized as one stream.
    Returns LongTensor [nsamples, seqlen].

    Start offsets are uniform in [0, T - seqlen) from ``random.Random(seed)``, the
    draw the SparseGPT and Wanda reference code makes (``random.seed(seed)`` then
    ``random.randint(0, T - seqlen - 1)`` per sample), so the same seed gives the
    same windows as those scripts.

    >>> random_windows(torch.arange(10)[None], nsamples=2, seqlen=3, seed=0).shape
    torch.Size([2, 3])
    """
    ids = token_ids.reshape(-1)
    ntok = ids.numel()
    _check_counts(nsamples, seqlen)
    if ntok < seqlen + 1:
        raise ConfigError(
            f"calibration source too short: it has {ntok} tokens, "
            f"needs at least {seqlen + 1} for windows of {seqlen} tokens"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, ntok - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts]).long()


def document_windows(texts: list[str], tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """The papers' C4 draw: per sample, a random document longer than ``seqlen`` tokens, then a
    random window inside it. Returns LongTensor [nsamples, seqlen].

    Documents are tokenized only when drawn; too-short ones are redrawn, as in the reference code,
    but a source where every document is too short is an error rather than an endless loop.
    """
    _check_counts(nsamples, seqlen)
    rng = random.Random(seed)
    lengths: dict[int, torch.Tensor] = {}
    windows = []
    for _ in range(nsamples):
        while True:
            i = rng.randint(0, len(texts) - 1)
            if i not in lengths:
                lengths[i] = _tokenize(tokenizer, texts[i])[0]
            if lengths[i].numel() > seqlen:
                break
            if len(lengths) == len(texts) and all(t.numel() <= seqlen for t in lengths.values()):
                longest = max(t.numel() for t in lengths.values())
                raise ConfigError(
                    f"calibration source too short: its longest document has {longest} tokens, "
                    f"needs more than {seqlen}"
                )
        start = rng.randint(0, lengths[i].numel() - seqlen - 1)
        windows.append(lengths[i][start : start + seqlen])
    return torch.stack(windows).long()


def _check_counts(nsamples: int, seqlen: int) -> None:
    if nsamples < 1 or seqlen < 1:
        raise ConfigError(f"nsamples and seqlen must be positive, got {nsamples} and {seqlen}")


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one stream, LongTensor [1, T] (verbose=False: longer than the model's
    context is the point here, not a mistake)."""
    return tokenizer(text, return_tensors="pt", verbose=False).input_ids


# --------------------------------------------------------------------------- sources


def calibration_batches(
    source: str,
    tokenizer,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    model=None,
    text_field: str = "text",
) -> torch.Tensor:
    """Calibration tokens LongTensor [nsamples, seqlen] from ``source``.

    source: ``"self"`` (needs ``model``), a recipe name from ``calib/`` (``wikitext2``, ``c4``,
    ``ptb``), a recipe ``.json`` path, or a local ``.txt``/``.jsonl``/``.parquet`` file or a
    directory of them. ``text_field`` names the column of local ``.jsonl``/``.parquet`` files.
    When ``model`` is given, ``seqlen`` is checked against its maximum positions.

    >>> tokens = calibration_batches("wikitext2", tokenizer, nsamples=128, seqlen=2048, seed=0)
    """
    _check_counts(nsamples, seqlen)
    if model is not None:
        check_seqlen(model, seqlen)
    if source == "self":
        if model is None:
            raise ConfigError("--calib self needs the model to sample from")
        return self_calibration(model, tokenizer, nsamples, seqlen, seed)
    path = Path(source).expanduser()
    if path.suffix == ".json" and path.is_file():
        return recipe_windows(load_recipe(path), tokenizer, nsamples, seqlen, seed)
    if path.exists():
        text = local_text(path, text_field)
        logger.info("calibration: %s (%d characters)", path, len(text))
        return random_windows(_tokenize(tokenizer, text), nsamples, seqlen, seed)
    if (RECIPE_DIR / f"{source}.json").is_file():
        return recipe_windows(load_recipe(RECIPE_DIR / f"{source}.json"), tokenizer, nsamples, seqlen, seed)
    known = ", ".join(["self"] + sorted(p.stem for p in RECIPE_DIR.glob("*.json")))
    raise ConfigError(f"unknown calibration source {source!r}: not a file or directory, nor one of {known}")


def check_seqlen(model, seqlen: int) -> None:
    """Refuse windows longer than the model's position table (they would run off its end)."""
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit and seqlen > limit:
        raise ConfigError(f"seqlen {seqlen} is above the model's maximum positions ({limit})")


def local_text(path: Path, text_field: str = "text") -> str:
    """One file, or every supported file under a directory (sorted), through ``datasets``; the
    documents joined with blank lines. A .txt file is one document, read whole, so its tokens are
    exactly those of the file."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in BUILDERS)
    if not files:
        raise ConfigError(f"no .txt, .jsonl or .parquet files under {path}")
    return "\n\n".join(text for file in files for text in _file_texts(file, text_field))


def _file_texts(file: Path, text_field: str) -> list[str]:
    import datasets

    if file.suffix not in BUILDERS:
        raise ConfigError(f"calibration file {file} is not .txt, .jsonl or .parquet (or a .json recipe)")
    extra = {"sample_by": "document"} if file.suffix == ".txt" else {}
    if file.suffix != ".parquet":
        check_utf8(file)
    elif not _parquet_magic(file):  # before datasets, which logs a traceback of its own first
        raise ConfigError(f"{file} is not a Parquet file (no PAR1 magic at its start and end)")
    try:
        ds = datasets.load_dataset(BUILDERS[file.suffix], data_files=str(file), split="train", **extra)
    except Exception as err:  # DatasetGenerationError, pyarrow's errors: a file that is not what it says
        cause = err.__cause__ or err
        raise ConfigError(f"cannot read calibration file {file}: {_first_line(cause)}") from None
    field = "text" if file.suffix == ".txt" else text_field
    if field not in ds.column_names:
        raise ConfigError(f"{file} has no field {field!r} (fields: {', '.join(ds.column_names)}); use --text-field")
    return _strings(ds[field], f"field {field!r} of {file}")


def check_utf8(file: Path) -> None:
    """Refuse a file that is not UTF-8 text (random bytes, a binary named .txt), naming the offset."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise ConfigError(f"{file} is not UTF-8 text (byte {offset + err.start} is 0x{chunk[err.start]:02x})") from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ConfigError(f"{file} is not UTF-8 text (it ends inside a character)") from None


def _parquet_magic(file: Path) -> bool:
    with open(file, "rb") as f:
        head = f.read(4)
        f.seek(max(0, file.stat().st_size - 4))
        return head == b"PAR1" and f.read(4) == b"PAR1"


def _strings(column, what: str) -> list[str]:
    """The non-empty texts of a column, refusing one that holds anything but text."""
    odd = next((v for v in column if v is not None and not isinstance(v, str)), None)
    if odd is not None:
        raise ConfigError(f"{what} holds {type(odd).__name__} values, not text")
    return [t for t in column if t]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


# --------------------------------------------------------------------------- recipes


def load_recipe(path: Path) -> dict:
    """A recipe file (see calib/README.md): which dataset, split and field, and how to draw windows."""
    try:
        recipe = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"cannot read calibration recipe {path}: {err}") from None
    if not isinstance(recipe, dict) or "dataset" not in recipe:
        raise ConfigError(f"calibration recipe {path} has no 'dataset'")
    problem = _recipe_problem(recipe)
    if problem:
        raise ConfigError(f"calibration recipe {path}: {problem}")
    recipe.setdefault("name", Path(path).stem)
    return recipe


def _recipe_problem(recipe: dict) -> str | None:
    """What is wrong with a recipe's fields (see calib/README.md), or None."""
    for key in ("dataset", "config", "split", "revision", "field", "join", "name"):
        if key in recipe and not (isinstance(recipe[key], str) or (recipe[key] is None and key != "dataset")):
            return f"{key!r} must be a string, got {recipe[key]!r}"
    files = recipe.get("data_files")
    if files is not None and not isinstance(files, (str, list, dict)):
        return f"'data_files' must be a path, a list or a dict of them, got {files!r}"
    if recipe.get("windows", "stream") not in ("stream", "document"):
        return f"'windows' must be stream or document, got {recipe['windows']!r}"
    return None


def recipe_windows(recipe: dict, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Load a recipe's texts and draw windows as it says: ``stream`` (join, tokenize once, random
    windows) or ``document`` (a random long-enough document per window)."""
    texts = recipe_texts(recipe)
    if recipe.get("windows", "stream") == "document":
        return document_windows(texts, tokenizer, nsamples, seqlen, seed)
    return random_windows(_tokenize(tokenizer, recipe.get("join", "\n\n").join(texts)), nsamples, seqlen, seed)


def recipe_texts(recipe: dict) -> list[str]:
    """The recipe's text column as a list of strings, through ``datasets``.

    Tries ``datasets`` the usual way (the Hub, or its own cache of prepared datasets); when that
    cannot reach the Hub, loads the dataset repository from the local Hugging Face hub cache
    (``HF_HOME/hub/datasets--org--name/snapshots/...``, e.g. after ``hf download --repo-type
    dataset``), which ``datasets`` itself does not look at offline.
    """
    import datasets

    args = dict(path=recipe["dataset"], name=recipe.get("config"), split=recipe.get("split", "train"),
                data_files=recipe.get("data_files"), revision=recipe.get("revision"))
    try:
        ds = datasets.load_dataset(**args)
    except Exception as err:  # offline, not on the hub, a bad name, split or config: datasets has no common base
        snapshot = _hub_cache_snapshot(recipe["dataset"], recipe.get("revision"))
        if snapshot is None:
            raise ConfigError(
                f"cannot load calibration dataset {recipe['dataset']!r} for {recipe['name']!r} "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                "offline? download it once, pass a local file, or use --calib self"
            ) from None
        logger.info("calibration: %s from the local hub cache %s", recipe["dataset"], snapshot)
        try:
            ds = datasets.load_dataset(**{**args, "path": snapshot, "revision": None})
        except Exception as err:
            raise ConfigError(f"cannot load calibration dataset {recipe['dataset']!r} from {snapshot}: "
                              f"{_first_line(err)}") from None
    field = recipe.get("field", "text")
    if field not in ds.column_names:
        raise ConfigError(f"calibration dataset {recipe['dataset']!r} has no field {field!r} "
                          f"(fields: {', '.join(ds.column_names)})")
    texts = _strings(ds[field], f"field {field!r} of {recipe['dataset']!r}")
    return texts if recipe.get("windows") == "document" else list(ds[field])  # the papers join every row, empty ones too


def _hub_cache_snapshot(repo_id: str, revision: str | None) -> str | None:
    """Path of the cached snapshot of a dataset repository, or None; never touches the network."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, repo_type="dataset", revision=revision, local_files_only=True)
    except Exception:  # LocalEntryNotFoundError and friends: simply not cached
        return None


# --------------------------------------------------------------------------- self-calibration


@torch.no_grad()
def self_calibration(model, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Data-free calibration: the model writes its own calibration text.

    Each sample starts from the BOS token (EOS when there is none) and continues with
    ``seqlen - 1`` sampled tokens (temperature ``SELF_TEMPERATURE``, top-p ``SELF_TOP_P``; EOS is
    suppressed until the window is full), in batches of ``SELF_BATCH``. Seeded and run under a
    forked RNG, so the same seed gives the same windows and the caller's RNG is untouched.
    Returns LongTensor [nsamples, seqlen].
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ConfigError("--calib self needs a BOS or EOS token to start sampling from")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    show = logger.getEffectiveLevel() <= logging.INFO
    samples = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with tqdm(total=nsamples * seqlen, desc="self-calibration tokens", unit="tok", disable=not show) as bar:
            for first in range(0, nsamples, SELF_BATCH):
                count = min(SELF_BATCH, nsamples - first)
                prompt = torch.full((count, 1), start, dtype=torch.long, device=device)
                bar.update(count)  # the start token
                out = model.generate(
                    prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                    temperature=SELF_TEMPERATURE, top_p=SELF_TOP_P, top_k=0,
                    max_new_tokens=seqlen - 1, min_new_tokens=seqlen - 1, pad_token_id=pad,
                    logits_processor=[_Progress(bar, count)],
                )
                samples.append(out[:, :seqlen].cpu())
    return torch.cat(samples).long()


class _Progress:
    """A logits processor that changes nothing and advances the progress bar once per step."""

    def __init__(self, bar, rows: int):
        self.bar, self.rows = bar, rows

    def __call__(self, input_ids, scores):
        self.bar.update(self.rows)
        return scores
