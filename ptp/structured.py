"""Structured pruning: remove MLP channels and whole key/value groups of attention heads from every
decoder block, uniformly, so the result is a smaller *standard* model (smaller ``intermediate_size``,
fewer heads) that loads with plain ``from_pretrained`` and runs faster with any runtime.

Per block (the blocks are walked like ``ptp.engine.prune``: calibration activations captured at
block 0, each block pruned from the outputs of the already-pruned blocks before it):

1. run the calibration activations through the block, accumulating the first and second moments
   of the inputs of each *consumer* layer: the one reading the channels we remove (``o_proj`` reads
   the heads, ``down_proj``/``fc2`` the intermediate channels);
2. rank the structures (importance ``flap``, ``wanda-sp`` or ``obs``, see ``ptp.solvers.structured``);
3. compensate in the consumer: ``ls`` (default) solves for the kept columns that best reproduce the
   full layer on the calibration inputs (and for its bias when it has one): no new parameters, so
   the config stays the architecture's standard one; ``bias`` adds FLAP's mean contribution of
   the removed channels to the consumer's bias, which needs the architecture to have that bias
   (OPT has; Llama gains it through ``attention_bias``/``mlp_bias``, which adds zero biases to the
   other projections too; Qwen2's ``o_proj`` and MLP have none, so it is refused);
4. slice the producers' output rows and the consumer's input columns.

Blocks are recognised without per-model tables: ``ptp.engine.input_groups`` gives the layers in
execution order grouped by shared input; a group of three ([q, k, v]) followed by one layer is the
attention, a group of one or two ([fc1] or [gate, up]) followed by one layer whose input width is
their output width is the MLP. Attention heads can only be removed where the config keeps
``head_dim`` separate from ``hidden_size`` (Llama, Qwen2, Mistral, ...): OPT's and GPT-2's derive
it, so there only the MLP is pruned.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import ConfigError
from . import checks
from .engine import move_outside_blocks, as_token_batch, capture_block_inputs, find_blocks, input_groups, run_block
from .solvers.structured import (
    COMPENSATION,
    IMPORTANCE,
    Moments,
    bias_compensation,
    channel_groups,
    group_scores,
    least_squares,
    obs_select,
    obs_select_channels,
    output_error,
    with_bias_input,
)

logger = logging.getLogger("ptp")

INTERMEDIATE_KEYS = ("intermediate_size", "ffn_dim", "n_inner")  # Llama/Qwen2/Mistral..., OPT, GPT-2
MULTIPLE_OF = 8  # kept MLP width is rounded to a multiple of this (vector-friendly shapes)


@dataclass
class Unit:
    """One prunable structure of a block: producers' output rows and the consumer's input columns."""

    kind: str  # "attention" or "mlp"
    producers: list[str]  # names inside the block, e.g. ["self_attn.q_proj", ...]
    consumer: str  # e.g. "self_attn.o_proj"


@dataclass
class BlockReport:
    block: int
    attention_error: float | None  # ||Wx - W'x||^2 / ||Wx||^2 of o_proj on the calibration inputs
    mlp_error: float | None  # the same for down_proj / fc2


@dataclass
class StructuredReport:
    ratio: float
    importance: str
    compensation: str
    intermediate: tuple[int, int] = (0, 0)  # MLP width before, after
    heads: tuple[int, int] = (0, 0)  # attention heads before, after
    kv_heads: tuple[int, int] = (0, 0)
    block_params: tuple[int, int] = (0, 0)  # parameters of all decoder blocks before, after
    blocks: list[BlockReport] = field(default_factory=list)
    config: dict = field(default_factory=dict)  # the config keys that changed
    wall_time_s: float = 0.0

    @property
    def removed(self) -> float:
        """Fraction of the decoder blocks' parameters removed."""
        return 1 - self.block_params[1] / self.block_params[0] if self.block_params[0] else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "removed": self.removed}


# --------------------------------------------------------------------------- the block's layout


def find_units(block: nn.Module, hidden, batch_kwargs) -> list[Unit]:
    """The attention and MLP units of one block, from the order in which its linears run."""
    layers = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    if any(type(m).__name__ == "Conv1D" for m in block.modules()):
        raise ConfigError("structured pruning supports nn.Linear blocks; GPT-2's fused Conv1D layers are not")
    groups = input_groups(block, layers, hidden, batch_kwargs)
    units = []
    for producers, after in zip(groups, groups[1:]):
        if len(after) != 1:
            continue
        consumer = layers[after[0]]
        widths = {layers[p].out_features for p in producers}
        if len(producers) == 3:
            units.append(Unit("attention", producers, after[0]))
        elif len(producers) in (1, 2) and widths == {consumer.in_features} and consumer.in_features > consumer.out_features:
            units.append(Unit("mlp", producers, after[0]))
    return units


def head_layout(config) -> tuple[int, int, int]:
    """(attention heads, key/value heads, head_dim) from a transformers config."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def intermediate_key(config, width: int) -> str:
    for key in INTERMEDIATE_KEYS:
        if getattr(config, key, None) == width:
            return key
    raise ConfigError(f"no config key among {INTERMEDIATE_KEYS} holds the MLP width {width}")


def target_config(config, heads: int, kv: int, head_dim: int, mlp_key: str | None, mlp_width: int):
    """A copy of ``config`` describing the pruned model."""
    new = copy.deepcopy(config)
    if heads != config.num_attention_heads:
        new.num_attention_heads = heads
        new.num_key_value_heads = kv
        new.head_dim = head_dim
    if mlp_key is not None:
        setattr(new, mlp_key, mlp_width)
    return new


def check_expressible(model, new_config, units: list[Unit], widths: dict[str, int]) -> None:
    """Build the target config's first block on the meta device and check that its consumers
    have the widths we are about to cut to: otherwise the result would not load as this
    architecture (e.g. OPT, whose head_dim is hidden_size / heads)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        probe = AutoModelForCausalLM.from_config(_one_layer(new_config))
    _, blocks = find_blocks(probe)
    for unit in units:
        got = blocks[0].get_submodule(unit.consumer).in_features
        if got != widths[unit.kind]:
            raise ConfigError(
                f"{type(model.config).__name__} cannot express a {unit.kind} of width {widths[unit.kind]} "
                f"(its config gives {got}); "
                + ("prune the MLP only (attn_ratio=0)" if unit.kind == "attention" else "choose another ratio")
            )


def _one_layer(config):
    config = copy.deepcopy(config)
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(config, key):
            setattr(config, key, 1)
    if hasattr(config, "layer_types") and config.layer_types:
        config.layer_types = config.layer_types[:1]
    return config


# --------------------------------------------------------------------------- how much to remove


def plan(block: nn.Module, units: list[Unit], kv_groups: int, ratio: float, attn_ratio: float | None,
         can_drop_heads: bool) -> tuple[int, int]:
    """(KV groups to remove, MLP channels to remove) so that about ``ratio`` of the block's
    parameters go. Heads: ``attn_ratio`` of the KV groups when given, else ``ratio`` of them,
    rounded; the MLP takes the rest of the budget, its kept width rounded to MULTIPLE_OF."""
    total = sum(p.numel() for p in block.parameters())
    per_group, per_channel, width = 0, 0, 0
    for unit in units:
        consumer = block.get_submodule(unit.consumer)
        producers = [block.get_submodule(p) for p in unit.producers]
        if unit.kind == "attention":  # each producer and the consumer lose 1/kv_groups of their rows/columns
            per_group = (sum(p.out_features * _row_params(p) for p in producers)
                         + consumer.out_features * consumer.in_features) // kv_groups
        else:
            per_channel = sum(_row_params(p) for p in producers) + consumer.out_features
            width = consumer.in_features
    share = ratio if attn_ratio is None else attn_ratio
    groups = round(share * kv_groups) if per_group and can_drop_heads else 0
    if attn_ratio is None:
        groups = min(groups, int(ratio * total // per_group) if per_group else 0)
    if groups >= kv_groups and groups:
        raise ConfigError(f"cannot remove all {kv_groups} key/value groups; lower the ratio")
    if not per_channel:
        return groups, 0
    budget = ratio * total - groups * per_group
    keep = width - max(budget, 0) / per_channel
    keep = max(MULTIPLE_OF, int(round(keep / MULTIPLE_OF)) * MULTIPLE_OF) if width >= 2 * MULTIPLE_OF else max(1, round(keep))
    return groups, width - min(keep, width)


def _row_params(layer: nn.Linear) -> int:
    """Parameters per output row: the row of the weight and its bias."""
    return layer.in_features + (layer.bias is not None)


# --------------------------------------------------------------------------- cutting


def cut_rows(layer: nn.Linear, keep: torch.Tensor) -> None:
    """Keep the output rows ``keep`` (bool [out]) of a linear layer, in place."""
    layer.weight = nn.Parameter(layer.weight.data[keep].clone())
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.data[keep].clone())
    layer.out_features = int(keep.sum())


def cut_columns(layer: nn.Linear, keep: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Replace a linear layer's weight by ``weight`` [out, keep.sum()] (and its bias), in place."""
    dtype = layer.weight.dtype
    layer.weight = nn.Parameter(weight.to(dtype).contiguous())
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(dtype))
    layer.in_features = int(keep.sum())


def add_bias(layer: nn.Linear) -> None:
    """Give a bias-free linear layer a zero bias (for ``compensation="bias"`` on Llama)."""
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=layer.weight.dtype, device=layer.weight.device))


def prune_unit(block, unit: Unit, moments: Moments, remove: int, importance: str, compensation: str,
               damp: float, head_dim: int, n_rep: int) -> float:
    """Remove ``remove`` structures of one unit in place; returns the consumer's output error."""
    consumer = block.get_submodule(unit.consumer)
    W = consumer.weight.data.float()
    size = head_dim * n_rep if unit.kind == "attention" else 1
    groups = channel_groups(W.shape[1], size).to(W.device)
    if importance == "obs" and size == 1:
        keep_groups = obs_select_channels(W, moments.second, remove, damp)
    elif importance == "obs":
        keep_groups = obs_select(W, moments.second, groups, remove, damp)
    else:
        keep_groups = torch.ones(groups.shape[0], dtype=torch.bool, device=W.device)
        keep_groups[group_scores(W, moments, groups, importance).argsort()[:remove]] = False
    keep = torch.zeros(W.shape[1], dtype=torch.bool, device=W.device)
    keep[groups[keep_groups].flatten()] = True

    bias = consumer.bias.data.float() if consumer.bias is not None else None
    if compensation == "ls" and bias is not None:  # solve for the bias too: a constant, always-kept input
        full = torch.cat([W, bias[:, None]], 1)
        solved = least_squares(full, with_bias_input(moments.second, moments.mean), torch.cat([keep, keep.new_ones(1)]), damp)
        new_w, new_b = solved[:, :-1], solved[:, -1]
    elif compensation == "ls":
        new_w, new_b = least_squares(W, moments.second, keep, damp), None
    elif compensation == "bias":
        new_w, new_b = W[:, keep], (0 if bias is None else bias) + bias_compensation(W, moments.mean, keep)
    else:
        new_w, new_b = W[:, keep], bias
    error = _error(W, bias, new_w, new_b, keep, moments)

    for name in unit.producers:
        producer = block.get_submodule(name)
        rows = producer.out_features
        if unit.kind == "attention" and rows != W.shape[1]:  # k/v: one head per KV group
            per = channel_groups(rows, head_dim)
            keep_rows = torch.zeros(rows, dtype=torch.bool, device=W.device)
            keep_rows[per[keep_groups].flatten()] = True
        else:
            keep_rows = keep
        cut_rows(producer, keep_rows)
    if compensation == "bias" and consumer.bias is None:
        add_bias(consumer)
    cut_columns(consumer, keep, new_w, new_b)
    return error


def _error(W, bias, new_w, new_b, keep, moments: Moments) -> float:
    """Relative output error of the consumer on the calibration inputs, bias included."""
    full = torch.zeros_like(W)
    full[:, keep] = new_w
    zero = torch.zeros(W.shape[0], device=W.device)
    old_b = bias if bias is not None else zero
    new_b = new_b if new_b is not None else zero
    H = with_bias_input(moments.second, moments.mean)
    return output_error(torch.cat([W, old_b[:, None]], 1), H, torch.cat([full, new_b[:, None]], 1))


# --------------------------------------------------------------------------- the driver


def check_options(ratio: float, attn_ratio: float | None, importance: str, compensation: str) -> tuple[str, str]:
    """Validate the options of ``prune_structured`` (cheaply, before any model is loaded).
    Returns (importance, compensation) lower-cased; raises ConfigError."""
    if not 0 <= ratio < 1:
        raise ConfigError(f"ratio must lie in [0, 1), got {ratio}")
    if attn_ratio is not None and not 0 <= attn_ratio < 1:
        raise ConfigError(f"attn_ratio must lie in [0, 1), got {attn_ratio}")
    importance, compensation = importance.lower(), compensation.lower()
    if importance not in IMPORTANCE:
        raise ConfigError(f"unknown importance {importance!r}; choose one of {', '.join(IMPORTANCE)}")
    if compensation not in COMPENSATION:
        raise ConfigError(f"unknown compensation {compensation!r}; choose one of {', '.join(COMPENSATION)}")
    return importance, compensation


@torch.no_grad()
def prune_structured(
    model: nn.Module,
    batches,
    ratio: float = 0.35,
    *,
    attn_ratio: float | None = None,
    importance: str = "flap",
    compensation: str = "ls",
    damp: float = 0.01,
    batch_size: int = 8,
    device: str | None = None,
    blocks: str | None = None,
) -> StructuredReport:
    """Remove about ``ratio`` of every decoder block's parameters, in place, as whole MLP channels
    and whole key/value groups of attention heads; update ``model.config`` to match.

    batches:      calibration tokens, LongTensor [n, L] or a list of [1, L] tensors.
    ratio:        fraction of each block's parameters to remove, in [0, 1).
    attn_ratio:   fraction of the KV groups to remove (rounded); default ``ratio`` (rounded), 0 to
                  prune the MLP only. The MLP takes the rest of the parameter budget.
    importance:   "flap" (weighted fluctuation), "wanda-sp" (|W|*||X||) or "obs" (greedy
                  structured OBS on the consumer's Hessian, as in ZipLM).
    compensation: "ls" (least-squares update of the consumer, standard config), "bias" (FLAP's
                  mean-contribution bias; needs the bias in the architecture) or "none".
    damp:         relative dampening of the least-squares / OBS Hessian.

    >>> report = ptp.prune_structured(model, tokens, ratio=0.35)
    >>> model.config.intermediate_size, model.config.num_key_value_heads
    (992, 2)
    """
    start = time.perf_counter()
    importance, compensation = check_options(ratio, attn_ratio, importance, compensation)
    tokens = as_token_batch(batches)
    checks.check_token_ids(model, tokens)  # an id outside the vocabulary: one line, not an IndexError
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    blocks_name, layers = find_blocks(model, blocks)
    config = model.config
    heads, kv, head_dim = head_layout(config)
    n_rep = heads // kv
    report = StructuredReport(ratio, importance, compensation)
    report.block_params = (sum(p.numel() for p in layers.parameters()), 0)

    use_cache = getattr(config, "use_cache", None)
    home = next(layers[0].parameters()).device
    move_outside_blocks(model, layers, device)
    try:
        hidden, batch_kwargs = capture_block_inputs(model, layers, tokens, batch_size, device)
        layers[0].to(device)
        units = find_units(layers[0], hidden, batch_kwargs)
        if not units:
            raise ConfigError(f"found no attention or MLP to prune in {type(layers[0]).__name__}")
        mlp = next((u for u in units if u.kind == "mlp"), None)
        mlp_width = layers[0].get_submodule(mlp.consumer).in_features if mlp else 0
        mlp_key = intermediate_key(config, mlp_width) if mlp else None
        can_drop = _heads_expressible(config, heads, kv, head_dim, n_rep)
        if attn_ratio and not can_drop:
            raise ConfigError(f"{type(config).__name__} derives head_dim from hidden_size, so its heads cannot "
                              "be removed in a standard config; use attn_ratio=0")
        drop_groups, drop_channels = plan(layers[0], units, kv, ratio, attn_ratio, can_drop)
        new_kv = kv - drop_groups
        new_config = target_config(config, new_kv * n_rep, new_kv, head_dim, mlp_key, mlp_width - drop_channels)
        widths = {"attention": new_kv * n_rep * head_dim, "mlp": mlp_width - drop_channels}
        check_expressible(model, new_config, units, widths)
        pruned_units = [u for u in units if (drop_groups if u.kind == "attention" else drop_channels)]
        biased = _enable_bias(new_config, layers[0], pruned_units) if compensation == "bias" else set()
        logger.info("structured %s/%s: KV groups %d -> %d, MLP %d -> %d", importance, compensation, kv, new_kv,
                    mlp_width, mlp_width - drop_channels)

        show = logger.getEffectiveLevel() <= logging.INFO
        for i, block in enumerate(tqdm(layers, desc=f"structured {ratio:g}", disable=not show)):
            block.to(device)
            todo = [(u, drop_groups if u.kind == "attention" else drop_channels) for u in units]
            todo = [(u, n) for u, n in todo if n]
            moments = {u.consumer: Moments(block.get_submodule(u.consumer).in_features, device) for u, _ in todo}
            hooks = [block.get_submodule(name).register_forward_pre_hook(lambda m, a, acc=acc: acc.add(a[0]))
                     for name, acc in moments.items()]
            try:
                run_block(block, hidden, batch_kwargs, batch_size, write=False)
            finally:
                for hook in hooks:
                    hook.remove()
            errors = {"attention": None, "mlp": None}
            for unit, remove in todo:
                if unit.kind in biased:  # the architecture's flag gives every projection of the unit a bias
                    for name in unit.producers:
                        add_bias(block.get_submodule(name))
                errors[unit.kind] = prune_unit(block, unit, moments[unit.consumer], remove, importance,
                                               compensation, damp, head_dim, n_rep)
            report.blocks.append(BlockReport(i, errors["attention"], errors["mlp"]))
            if i + 1 < len(layers):  # the pruned block's outputs, in place, feed the next block
                run_block(block, hidden, batch_kwargs, batch_size)
            block.to(home)
    finally:
        move_outside_blocks(model, layers, home)
        if use_cache is not None:
            model.config.use_cache = use_cache

    before = config.to_dict()
    report.config = {k: v for k, v in new_config.to_dict().items() if k not in before or before[k] != v}
    for key, value in report.config.items():
        setattr(config, key, value)
    report.intermediate = (mlp_width, mlp_width - drop_channels)
    report.heads, report.kv_heads = (heads, new_kv * n_rep), (kv, new_kv)
    report.block_params = (report.block_params[0], sum(p.numel() for p in layers.parameters()))
    report.wall_time_s = time.perf_counter() - start
    logger.info("removed %.1f%% of the decoder blocks' parameters in %.1f s", 100 * report.removed, report.wall_time_s)
    return report


def _heads_expressible(config, heads: int, kv: int, head_dim: int, n_rep: int) -> bool:
    """Whether a config with fewer heads keeps ``head_dim`` (checked on a 1-layer meta model)."""
    if kv < 2:
        return False
    from transformers import AutoModelForCausalLM

    probe_config = target_config(config, (kv - 1) * n_rep, kv - 1, head_dim, None, 0)
    try:
        with torch.device("meta"):
            probe = AutoModelForCausalLM.from_config(_one_layer(probe_config))
    except ValueError:  # e.g. OPT: "embed_dim must be divisible by num_heads"
        return False
    _, blocks = find_blocks(probe)
    widths = [m.out_features for m in blocks[0].modules() if isinstance(m, nn.Linear)]
    return (kv - 1) * n_rep * head_dim in widths


def _enable_bias(new_config, block, units: list[Unit]) -> set[str]:
    """compensation="bias": the consumers need a bias. Where the layer has none, set the
    architecture's flag (Llama: attention_bias / mlp_bias) if the config has one, else refuse.
    Returns the kinds of unit whose projections all gain a (zero) bias."""
    flags = {"attention": "attention_bias", "mlp": "mlp_bias"}
    biased = set()
    for unit in units:
        if block.get_submodule(unit.consumer).bias is not None:
            continue
        flag = flags[unit.kind]
        if flag not in new_config.to_dict():
            raise ConfigError(
                f"{type(new_config).__name__} has no bias in {unit.consumer} and no {flag} flag to add one; "
                "use compensation='ls', which needs no bias"
            )
        setattr(new_config, flag, True)
        biased.add(unit.kind)
    return biased
