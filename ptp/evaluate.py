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

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

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
        raise ValueError(f"need at least {seqlen} tokens for one window, got {flat.numel()}")
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
