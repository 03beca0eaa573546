"""Judging a pruned model: perplexity, agreement with the dense model, zero-shot tasks.

Perplexity follows the protocol of the SparseGPT (Frantar & Alistarh, 2023) and Wanda
(Sun et al., 2023) papers: the evaluation text is tokenized once as a single stream
[1, T], cut into n = T // L non-overlapping windows of L tokens (the tail is dropped),
each window is run independently, and

    ppl = exp( mean over all windows and positions of -log p(x_{t+1} | x_<=t) )

Every window contributes L - 1 predictions, so this equals the papers'
``exp(sum(loss_i * L) / (n * L))`` exactly.

Memory: only one batch of logits exists at a time, in the model's dtype; the float32
log-softmax over the vocabulary is computed in chunks of positions (``CHUNK`` rows),
so a 49k-entry vocabulary costs ``CHUNK * V * 4`` bytes extra, not ``B * L * V * 4``.

Nothing here is imported by the pruning engine.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import ConfigError

log = logging.getLogger(__name__)

CHUNK = 512  # positions per float32 log-softmax chunk: 512 x 49152 x 4 B = 96 MiB


def windows(tokens: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """Cut a token stream into non-overlapping windows.

    tokens: LongTensor [1, T] (or [T]). Returns LongTensor [n, seqlen] with
    n = T // seqlen, or the first ``limit`` of them. The tail shorter than seqlen is dropped,
    as in the papers' loops.
    """
    flat = tokens.reshape(-1)
    n = flat.numel() // seqlen
    if limit is not None:
        n = min(n, limit)
    if n == 0:
        raise ConfigError(f"evaluation text too short: {flat.numel()} tokens, one window needs {seqlen}")
    return flat[: n * seqlen].view(n, seqlen)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where input ids must go: the device of the input embeddings."""
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def batch_logits(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Logits [B, L, V] (model dtype) for input ids [B, L]; no KV cache is kept."""
    batch = batch.to(model_device(model))
    return model(input_ids=batch, use_cache=False).logits


def iter_batches(n: int, batch_size: int, desc: str, progress: bool) -> Iterator[slice]:
    """Slices of size batch_size over range(n), with a progress bar over windows."""
    bar = tqdm(total=n, desc=desc, unit="win", disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        yield slice(start, stop)
        bar.update(stop - start)
    bar.close()


def chunked_nll(logits: torch.Tensor, labels: torch.Tensor, chunk: int = CHUNK) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods, in float32 one chunk at a time.

    logits: [B, L, V] (any float dtype); labels: LongTensor [B, L] (the same window).
    Position t predicts labels[:, t + 1]. Returns (sum of NLL as a Python float, count),
    count = B * (L - 1).
    """
    pred = logits[:, :-1].reshape(-1, logits.shape[-1])  # [B*(L-1), V], a view
    target = labels[:, 1:].reshape(-1).to(pred.device)
    total = 0.0
    for s in range(0, pred.shape[0], chunk):
        # Upcast per chunk: a bf16 log-softmax over 49k entries loses ~1% of the NLL.
        total += F.cross_entropy(pred[s : s + chunk].float(), target[s : s + chunk], reduction="sum").item()
    return total, target.numel()


@torch.no_grad()
def perplexity_of_tokens(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    seqlen: int,
    limit: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> float:
    """Perplexity of ``model`` on a token stream, the SparseGPT/Wanda way.

    tokens: LongTensor [1, T], the whole evaluation text tokenized once.
    seqlen: window length L; windows are non-overlapping, the tail is dropped.
    limit: evaluate only the first ``limit`` windows.
    batch_size: windows per forward pass (results do not depend on it beyond float noise).

    >>> ppl = perplexity_of_tokens(model, tok("\\n\\n".join(rows), return_tensors="pt").input_ids, 1024, limit=32)
    """
    wins = windows(tokens, seqlen, limit)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for sl in iter_batches(len(wins), batch_size, "perplexity", progress):
        batch = wins[sl]
        nll, n = chunked_nll(batch_logits(model, batch), batch)
        total, count = total + nll, count + n
    model.train(was_training)
    ppl = math.exp(total / count)
    log.info("perplexity %.4f over %d windows of %d tokens", ppl, len(wins), seqlen)
    return ppl


# ---------------------------------------------------------------------------------------
# Evaluation texts: the papers' splits, or any local text file.


@dataclass(frozen=True)
class EvalText:
    """Where an evaluation split lives on the hub and how the papers make one string of it.

    The rows of ``field`` in ``split`` are joined with ``sep``; ``max_rows`` keeps only the
    first rows and ``max_windows`` the first ``max_windows * seqlen`` tokens (the papers'
    C4 subset: 1100 validation documents, then 256 windows).
    """

    path: str
    name: str | None
    split: str
    field: str
    sep: str
    data_files: dict | None = None
    max_rows: int | None = None
    max_windows: int | None = None


EVAL_TEXTS = {
    # SparseGPT/Wanda: "\n\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])
    "wikitext2": EvalText("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text", "\n\n"),
    # SparseGPT's get_c4: the first validation shard, ' '.join of 1100 documents, 256 x L tokens.
    "c4": EvalText(
        "allenai/c4", None, "validation", "text", " ",
        data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, max_rows=1100, max_windows=256,
    ),
    # The test split, joined with spaces as in SparseGPT's get_ptb_new (the sentences carry no
    # newline; the older get_ptb used the validation split joined with "\n\n").
    "ptb": EvalText("ptb-text-only/ptb_text_only", "penn_treebank", "test", "sentence", " "),
}


def read_text_file(path: str | Path) -> str:
    """A local evaluation text, read with universal newlines.

    Universal newlines turn CRLF into "\n", so a file saved on Windows (such as
    ``shared/data/wikitext2/test.raw.txt``) yields the same text, and the same tokens, as
    the papers' ``"\n\n".join(rows)``; keeping the "\r" changes the tokenization.
    """
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"evaluation text {path} is not UTF-8 text (byte {err.start} is 0x{err.object[err.start]:02x})") from None
    except OSError as err:
        raise ConfigError(f"cannot read evaluation text {path}: {err.strerror or err}") from None


def check_source(source: str | Path) -> None:
    """Refuse a source that is neither a named split nor an existing file (cheap, no loading)."""
    if str(source) not in EVAL_TEXTS and not Path(source).is_file():
        raise ConfigError(f"unknown evaluation text {str(source)!r}: not one of {sorted(EVAL_TEXTS)} nor a file")
    if str(source) not in EVAL_TEXTS:
        read_text_file(source)  # not UTF-8 text: say so before the model loads


def load_eval_text(source: str | Path) -> tuple[str, EvalText | None]:
    """(text, recipe) for a named split (``wikitext2``, ``c4``, ``ptb``) or a local text file.

    Named splits go through ``datasets.load_dataset``, so ``HF_DATASETS_OFFLINE=1`` reads
    them from the local datasets cache. The recipe is None for a file.
    """
    if str(source) in EVAL_TEXTS:
        recipe = EVAL_TEXTS[str(source)]
        import datasets  # imported here: loading datasets costs ~1 s and a file needs none of it

        kwargs = {"data_files": recipe.data_files} if recipe.data_files else {}
        try:
            rows = datasets.load_dataset(recipe.path, recipe.name, split=recipe.split, **kwargs)[recipe.field]
        except Exception as err:  # offline and not cached, gone from the hub, a script dataset, ...
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError(
                f"cannot load {source} ({recipe.path}, {recipe.split} split): {first} "
                "-- offline it must be in the datasets cache; or pass a local text file"
            ) from None
        rows = list(rows[: recipe.max_rows] if recipe.max_rows else rows)
        return recipe.sep.join(rows), recipe
    check_source(source)
    return read_text_file(source), None


def eval_tokens(tokenizer, source: str | Path, seqlen: int) -> torch.Tensor:
    """The evaluation text of ``source`` tokenized once: LongTensor [1, T].

    Tokenized as the papers do, ``tokenizer(text, return_tensors="pt")`` with the
    tokenizer's default special tokens; C4 is then cut to its first 256 x seqlen tokens.
    """
    text, recipe = load_eval_text(source)
    ids = tokenizer(text, return_tensors="pt").input_ids
    if recipe is not None and recipe.max_windows:
        ids = ids[:, : recipe.max_windows * seqlen]
    return ids


def check_seqlen(model: torch.nn.Module, seqlen: int) -> None:
    """Refuse windows longer than the model's positions (they would silently extrapolate)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if seqlen < 2:
        raise ConfigError(f"seqlen must be at least 2, got {seqlen}")
    if limit is not None and seqlen > limit:
        raise ConfigError(f"seqlen {seqlen} exceeds the model's max_position_embeddings ({limit})")


def perplexity(
    model: torch.nn.Module,
    tokenizer,
    source: str | Path = "wikitext2",
    *,
    seqlen: int = 2048,
    limit: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> float:
    """Perplexity on a named split (``wikitext2``, ``c4``, ``ptb``) or a local text file.

    Loads and tokenizes the text (see ``eval_tokens``), then ``perplexity_of_tokens``.

    >>> ptp.perplexity(model, tok, "../shared/data/wikitext2/test.raw.txt", seqlen=1024, limit=32)
    """
    check_seqlen(model, seqlen)
    return perplexity_of_tokens(model, eval_tokens(tokenizer, source, seqlen), seqlen, limit, batch_size, progress)


# ---------------------------------------------------------------------------------------
# Agreement with the dense model: no labels needed, so it judges `--calib self` runs too.


@dataclass
class Agreement:
    """How closely a pruned model follows its dense original over the same windows.

    kl: mean over predicted positions of KL(p_dense || p_pruned) in nats.
    top1: fraction of positions where both models' most likely next token is the same.
    ppl_dense, ppl_pruned: the perplexities of both models on those windows.
    """

    kl: float
    top1: float
    ppl_dense: float
    ppl_pruned: float
    windows: int
    seqlen: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def chunked_agreement(
    dense_logits: torch.Tensor, pruned_logits: torch.Tensor, labels: torch.Tensor, chunk: int = CHUNK
) -> torch.Tensor:
    """Sums over positions of [KL(dense||pruned), top-1 agreement, NLL dense, NLL pruned].

    dense_logits, pruned_logits: [B, L, V]; labels: LongTensor [B, L]. Positions 0..L-2
    (those with a next-token label, the same as perplexity) are compared, in float32
    chunks of ``chunk`` positions. Returns a float64 tensor [4]; count is B * (L - 1).
    """
    vocab = dense_logits.shape[-1]
    dense = dense_logits[:, :-1].reshape(-1, vocab)
    pruned = pruned_logits[:, :-1].reshape(-1, vocab)
    target = labels[:, 1:].reshape(-1).to(dense.device)
    sums = torch.zeros(4, dtype=torch.float64)
    for s in range(0, dense.shape[0], chunk):
        lp_d = dense[s : s + chunk].float().log_softmax(-1)
        lp_p = pruned[s : s + chunk].to(dense.device).float().log_softmax(-1)
        t = target[s : s + chunk, None]
        kl = (lp_d.exp() * (lp_d - lp_p)).sum(-1)  # KL(P||Q) = sum_v P(v) (log P(v) - log Q(v))
        agree = lp_d.argmax(-1) == lp_p.argmax(-1)
        nll_d, nll_p = -lp_d.gather(-1, t), -lp_p.gather(-1, t)
        sums += torch.stack([kl.sum(), agree.sum(), nll_d.sum(), nll_p.sum()]).double().cpu()
    return sums


@torch.no_grad()
def compare_on_tokens(
    pruned: torch.nn.Module,
    dense: torch.nn.Module,
    tokens: torch.Tensor,
    seqlen: int,
    limit: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> Agreement:
    """KL(dense||pruned), top-1 agreement and both perplexities over the same windows.

    tokens: LongTensor [1, T]; windows as in ``perplexity_of_tokens``. Both models run on
    each batch in turn, so two batches of logits (one per model) exist at a time.
    """
    wins = windows(tokens, seqlen, limit)
    modes = pruned.training, dense.training
    pruned.eval(), dense.eval()
    sums = torch.zeros(4, dtype=torch.float64)
    for sl in iter_batches(len(wins), batch_size, "compare", progress):
        batch = wins[sl]
        sums += chunked_agreement(batch_logits(dense, batch), batch_logits(pruned, batch), batch)
    pruned.train(modes[0]), dense.train(modes[1])
    kl, top1, nll_d, nll_p = (sums / (len(wins) * (seqlen - 1))).tolist()
    result = Agreement(kl, top1, math.exp(nll_d), math.exp(nll_p), len(wins), seqlen)
    log.info("KL(dense||pruned) %.4f, top-1 agreement %.4f", kl, top1)
    return result


def compare(
    pruned: torch.nn.Module,
    dense: torch.nn.Module,
    tokenizer,
    source: str | Path = "wikitext2",
    *,
    seqlen: int = 2048,
    limit: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> Agreement:
    """Agreement of ``pruned`` with ``dense`` on a named split or a local text file.

    >>> a = ptp.compare(pruned, dense, tok, "../shared/data/wikitext2/test.raw.txt", seqlen=1024, limit=32)
    >>> a.kl, a.top1
    """
    check_seqlen(dense, seqlen)
    tokens = eval_tokens(tokenizer, source, seqlen)
    return compare_on_tokens(pruned, dense, tokens, seqlen, limit, batch_size, progress)


# ---------------------------------------------------------------------------------------
# Zero-shot tasks through lm-eval, on the model already in memory.


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer,
    tasks: list[str] | str,
    *,
    include_path: str | Path | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 1,
) -> dict[str, dict[str, float]]:
    """Run lm-eval tasks on an in-memory model; returns {task: {metric: value}}.

    The model is wrapped in lm-eval's ``HFLM`` as it is, so a freshly pruned model needs
    no save/reload. ``include_path`` adds a directory of local task YAMLs (what makes this
    work offline); hub tasks (``arc_easy``, ``hellaswag``, ...) need their datasets in the
    local ``datasets`` cache when ``HF_DATASETS_OFFLINE=1``. Metric names are lm-eval's
    with the filter suffix dropped (``acc``, ``acc_norm``, ``acc_stderr``, ...).

    >>> ptp.evaluate_tasks(model, tok, ["arc_easy", "piqa"], limit=200)["arc_easy"]["acc"]
    """
    from lm_eval import simple_evaluate  # optional dependency: pip install 'ptp[eval]'
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    manager = task_manager(TaskManager, names, include_path)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown lm-eval task(s): {', '.join(unknown)} (local tasks need --include-path)")
    was_training = model.training
    lm = HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=batch_size)
    out = simple_evaluate(
        model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=False
    )
    model.train(was_training)
    return {task: metrics_of(res) for task, res in out["results"].items()}


def task_manager(TaskManager, names: list[str], include_path: str | Path | None):
    """lm-eval's task index: local tasks only when they are all that is asked for.

    Indexing lm-eval's ~15k built-in task YAMLs takes ~20 s on a small CPU; a run of
    local tasks skips it.
    """
    if include_path:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in names):
            return local
    return TaskManager(include_path=str(include_path) if include_path else None)


def metrics_of(result: dict) -> dict[str, float]:
    """lm-eval's ``{"acc,none": 0.5, "alias": ...}`` -> ``{"acc": 0.5}`` (numbers only)."""
    metrics = {}
    for key, value in result.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[key.split(",")[0]] = float(value)
    return metrics
