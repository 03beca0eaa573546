"""One call from a model name to a pruned, saved and evaluated model: load -> calibrate -> prune ->
save -> evaluate. ``ptp sweep`` runs one ``Job`` per cell; a notebook runs the same code.

>>> job = ptp.Job("smollm2-135m", out="out/s24", prune=ptp.PruneConfig(method="admm", sparsity="2:4"),
...               calib="valid.tokens.txt", nsamples=64, seqlen=512, ppl=("test.raw.txt",))
>>> result = ptp.run(job)
>>> result.perplexity, result.report.mean_sparsity
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import ConfigError, PruneConfig

logger = logging.getLogger("ptp")


@dataclass
class Job:
    """What to prune, how, where to save it and what to measure.

    model:            hub ID, local directory, .gguf file or ``smollm2-135m`` (see ``ptp.load_model``).
    prune:            the engine's config (unstructured, N:M, any solver, reconstruction), or None
                      with ``structured_ratio`` set for structured pruning (a smaller dense model).
    calib, nsamples, seqlen, seed, text_field: the calibration windows (``ptp.calibration_batches``);
                      seqlen None: 2048, or the model's maximum positions if smaller.
    structured_options: further keyword arguments of ``ptp.prune_structured`` (attn_ratio,
                      experts_ratio, importance, compensation, damp, batch_size, device, blocks).
    out:              output directory (None: keep the model in memory only); ``format`` "dense" or
                      "compressed"; ``overwrite``, ``verify`` as in ``ptp.save`` (verify also checks a
                      ptp directory's checksums when it is loaded).
    ppl:              evaluation texts (files or named splits), ``ppl_seqlen``-token windows, at
                      most ``ppl_limit`` of them.
    """

    model: str
    prune: PruneConfig | None = None
    structured_ratio: float | None = None
    structured_options: dict = field(default_factory=dict)
    calib: str = "wikitext2"
    nsamples: int = 128
    seqlen: int | None = None
    seed: int = 0
    text_field: str = "text"
    dtype: str = "auto"
    out: str | None = None
    format: str = "dense"
    overwrite: bool = False
    verify: bool = True
    ppl: tuple[str, ...] = ()
    ppl_seqlen: int = 1024
    ppl_limit: int | None = None
    trust_remote_code: bool = False

    def __post_init__(self):
        if (self.prune is None) == (self.structured_ratio is None):
            raise ConfigError("a job prunes either with a PruneConfig or with structured_ratio, exactly one of them")
        if self.format not in ("dense", "compressed"):
            raise ConfigError(f"unknown format {self.format!r}; choose dense or compressed")
        if self.structured_ratio is not None and self.format != "dense":
            raise ConfigError("structured pruning writes a smaller dense model; --format compressed does not apply")
        self.ppl = tuple(self.ppl)

    @property
    def method(self) -> str:
        return "structured" if self.prune is None else self.prune.method

    @property
    def pattern(self) -> str:
        return f"{self.structured_ratio:g}" if self.prune is None else str(self.prune.sparsity)


@dataclass
class JobResult:
    model: nn.Module
    tokenizer: object
    tokens: torch.Tensor  # the calibration windows [n, L]
    report: object  # PruneReport, or StructuredReport
    record: dict = field(default_factory=dict)  # what ptp.json holds (empty when not saved)
    perplexity: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # load, calibrate, prune, save, evaluate


def default_seqlen(model: nn.Module, seqlen: int | None) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    return seqlen if seqlen is not None else min(2048, limit or 2048)  # 0 is a value, not "unset"


def calibrate(job: Job, model: nn.Module, tokenizer) -> torch.Tensor:
    """The job's calibration windows, LongTensor [nsamples, seqlen]."""
    from .data import calibration_batches

    device = job.prune.device if job.prune is not None else job.structured_options.get("device")
    if job.calib == "self" and device:
        model.to(device)  # sampling runs the whole model; do it where the user asked to compute
    return calibration_batches(job.calib, tokenizer, job.nsamples, default_seqlen(model, job.seqlen), job.seed,
                               model=model, text_field=job.text_field)


def prune_model(job: Job, model: nn.Module, tokens: torch.Tensor):
    """Prune ``model`` in place as the job says (over every process of an initialised process
    group, when there is one); returns the engine's report."""
    from . import scale
    from .engine import prune, prunable_layers
    from .structured import prune_structured

    if job.prune is None:
        return prune_structured(model, tokens, job.structured_ratio, **job.structured_options)
    prunable_layers(model, job.prune)
    if scale.rank_world()[1] > 1:
        return scale.prune_distributed(model, tokens, job.prune)
    return prune(model, tokens, job.prune)


def run(job: Job, *, tokens: torch.Tensor | None = None, loaded: tuple[nn.Module, object] | None = None,
        meta: dict | None = None) -> JobResult:
    """Load (unless ``loaded`` = (model, tokenizer) is given: it is pruned in place), calibrate
    (unless ``tokens`` are given), prune, save to ``job.out`` when set, and measure perplexity on
    ``job.ppl``. ``meta`` adds fields to ``ptp.json``. Under several processes every rank prunes
    and rank 0 alone saves and evaluates (the others return with an empty record)."""
    from . import io, scale
    from .evaluate import perplexity

    seconds: dict[str, float] = {}
    start = clock = time.perf_counter()
    if job.out is not None:
        io.check_out_dir(job.out, job.overwrite)
    source = io.resolve_model(job.model)
    model, tokenizer = loaded or io.load_model(job.model, dtype=job.dtype, trust_remote_code=job.trust_remote_code,
                                                verify=job.verify)
    seconds["load"] = time.perf_counter() - clock
    if job.prune is not None:
        from .engine import prunable_layers

        prunable_layers(model, job.prune)  # a config that cannot apply fails before calibrating
    clock = time.perf_counter()
    tokens = calibrate(job, model, tokenizer) if tokens is None else tokens
    seconds["calibrate"] = time.perf_counter() - clock
    model.to("cpu")  # the engine moves one block at a time to the device
    clock = time.perf_counter()
    report = prune_model(job, model, tokens)
    seconds["prune"] = time.perf_counter() - clock
    record: dict = {}
    if scale.rank_world()[0] != 0:
        return JobResult(model, tokenizer, tokens, report, record, {}, seconds)
    if job.out is not None:
        clock = time.perf_counter()
        info = {"model": job.model,
                "model_source": {"path": source[0], "gguf_file": source[1],
                                 "revision": getattr(model.config, "_commit_hash", None)},
                "method": job.method,
                "calibration": {"source": job.calib, "nsamples": int(tokens.shape[0]), "seqlen": int(tokens.shape[1]),
                                "seed": job.seed, "text_field": job.text_field},
                "total_wall_time_s": time.perf_counter() - start,  # load + calibration + pruning
                **(meta or {})}
        if job.prune is None:
            info["structured"] = report.to_dict()
            record = io.save(model, tokenizer, job.out, meta=info, overwrite=job.overwrite, verify=job.verify)
        else:
            info.update(sparsity=str(job.prune.sparsity), config=job.prune.to_dict(),
                        processes=scale.rank_world()[1])  # calibration split over this many
            record = io.save(model, tokenizer, job.out, report=report, sparsity=job.prune.sparsity, meta=info,
                             format=job.format, overwrite=job.overwrite, verify=job.verify)
        seconds["save"] = time.perf_counter() - clock
    clock = time.perf_counter()
    ppl = {source: perplexity(model, tokenizer, source, seqlen=job.ppl_seqlen, limit=job.ppl_limit, progress=False)
           for source in job.ppl}
    seconds["evaluate"] = time.perf_counter() - clock
    return JobResult(model, tokenizer, tokens, report, record, ppl, seconds)
