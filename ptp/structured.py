"""Structured pruning: remove MLP channels, whole key/value groups of attention heads, and in
mixture-of-experts blocks whole experts and expert channels, from every decoder block, uniformly,
so the result is a smaller *standard* model (smaller ``intermediate_size``, fewer heads, fewer
experts) that loads with plain ``from_pretrained`` and runs faster with any runtime.

Per block (the blocks are walked like ``ptp.engine.prune``: calibration activations captured at
block 0, each block pruned from the outputs of the already-pruned blocks before it):

1. run the calibration activations through the block, accumulating the first and second moments
   of the inputs of each *consumer* layer: the one reading the channels we remove (``o_proj`` reads
   the heads, ``down_proj``/``fc2`` the intermediate channels); for routed experts, each expert's
   routed tokens, the energy of its weighted output and the moments of its ``down_proj`` input;
2. rank the structures (importance ``flap``, ``wanda-sp`` or ``obs``, see ``ptp.solvers.structured``;
   experts by the energy of their contribution to the block output, ``expert_energy``);
3. compensate in the consumer: ``ls`` (default) solves for the kept columns that best reproduce the
   full layer on the calibration inputs (and for its bias when it has one): no new parameters, so
   the config stays the architecture's standard one; ``bias`` adds FLAP's mean contribution of
   the removed channels to the consumer's bias, which needs the architecture to have that bias
   (OPT has; Llama gains it through ``attention_bias``/``mlp_bias``, which adds zero biases to the
   other projections too; Qwen2's ``o_proj`` and MLP have none, so it is refused);
4. slice the producers' output rows (and the norms over them, OLMo 2's ``q_norm``/``k_norm``), the
   consumer's input columns, and for experts the experts' dim 0 and the router's rows.

Blocks are recognised without per-model tables: ``ptp.engine.input_groups`` gives the layers
(``nn.Linear`` or GPT-2's ``Conv1D``) in execution order grouped by shared input; producers
followed by one layer reading heads x head_dim channels are the attention (q, k, v apart, or one
fused q|k|v layer as Phi-3's), producers followed by one layer reading their width (or half of
it: Phi-3's fused gate|up) are the MLP. Routed experts are a module holding 3-D parameters
[experts, ...] next to a router with a [experts, hidden] weight. Which config key sets each width
is found by building a one-block model of candidate configs on the meta device, and every pruned
shape is checked against such a model before any work: where a config cannot express the result
(head_dim derived from hidden_size, an MLP width fixed in code), the answer is a ConfigError.
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn
from torch.nn import functional as F

from .config import ConfigError, PruneConfig
from . import checks
from .engine import (BlockHooks, Reconstruction, as_token_batch, check_reconstruction, find_blocks, for_each_block,
                     input_groups, linear_layers, run_block)
from .solvers.structured import (
    COMPENSATION,
    IMPORTANCE,
    Moments,
    bias_compensation,
    channel_groups,
    expert_energy_order,
    group_scores,
    least_squares,
    obs_select,
    obs_select_channels,
    output_error,
    with_bias_input,
)

logger = logging.getLogger("ptp")

MULTIPLE_OF = 8  # kept MLP / expert widths are rounded to a multiple of this (vector-friendly shapes)
IMPLICIT_WIDTH_KEYS = ("n_inner",)  # GPT-2, GPT-J: None means 4 x hidden_size


@dataclass
class Unit:
    """One prunable structure of a block: producers' output rows and the consumer's input columns."""

    kind: str  # "attention" or "mlp"
    producers: list[str]  # names inside the block, e.g. ["self_attn.q_proj", ...]
    consumer: str  # e.g. "self_attn.o_proj"
    followers: dict[str, str] = field(default_factory=dict)  # norm over a producer's whole output -> producer


@dataclass
class Experts:
    """The routed experts of a block: fused 3-D parameters [count, ...] and their router.

    width: each expert's intermediate width I when the experts follow transformers' fused layout
    (``gate_up_proj`` [E, 2I, H] chunked gate|up, ``down_proj`` [E, H, I], ``act_fn``), checked
    numerically against the module's own forward; 0 when not recognised (whole experts only).
    """

    path: str  # e.g. "mlp.experts"
    router: str  # e.g. "mlp.gate"
    count: int
    top_k: int
    width: int = 0
    gate_up: str = ""  # parameter names inside the experts module
    down: str = ""


@dataclass
class Plan:
    """What to remove from every block."""

    kv_groups: int = 0  # key/value groups of heads
    channels: int = 0  # MLP (or shared expert) channels
    experts: int = 0  # whole routed experts
    expert_channels: int = 0  # channels of every kept expert


@dataclass
class BlockReport:
    block: int
    attention_error: float | None  # ||Wx - W'x||^2 / ||Wx||^2 of o_proj on the calibration inputs
    mlp_error: float | None  # the same for down_proj / fc2
    expert_error: float | None = None  # the same for the kept experts' down_proj, averaged
    expert_tokens: list[int] | None = None  # calibration tokens routed to each original expert
    experts_kept: list[int] | None = None  # the original indices of the kept experts


@dataclass
class StructuredReport:
    ratio: float
    importance: str
    compensation: str
    experts_ratio: float | None = None
    intermediate: tuple[int, int] = (0, 0)  # MLP width before, after
    heads: tuple[int, int] = (0, 0)  # attention heads before, after
    kv_heads: tuple[int, int] = (0, 0)
    experts: tuple[int, int] = (0, 0)  # routed experts per block before, after
    expert_intermediate: tuple[int, int] = (0, 0)  # each expert's width before, after
    block_params: tuple[int, int] = (0, 0)  # parameters of all decoder blocks before, after
    blocks: list[BlockReport] = field(default_factory=list)
    config: dict = field(default_factory=dict)  # the config keys that changed
    wall_time_s: float = 0.0
    reconstruction: list[dict] = field(default_factory=list)  # with ``reconstruct``: as PruneReport's

    @property
    def removed(self) -> float:
        """Fraction of the decoder blocks' parameters removed."""
        return 1 - self.block_params[1] / self.block_params[0] if self.block_params[0] else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "removed": self.removed}


# --------------------------------------------------------------------------- nn.Linear and Conv1D


def is_layer(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2's Conv1D (a linear layer that stores its weight as [in, out])."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def weight_of(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as [out, in] (a view: Conv1D stores the transpose)."""
    return layer.weight.T if _is_conv1d(layer) else layer.weight


def out_width(layer: nn.Module) -> int:
    return weight_of(layer).shape[0]


def in_width(layer: nn.Module) -> int:
    return weight_of(layer).shape[1]


def _take(tensor: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """``tensor`` restricted to the True entries of ``keep`` (bool) along ``dim``. Index-based, so
    it also works on meta tensors (the dry run of ``check_expressible``)."""
    index = keep.nonzero().flatten().to(tensor.device)
    return tensor.index_select(dim, index).clone()


def cut_rows(layer: nn.Module, keep: torch.Tensor) -> None:
    """Keep the output rows ``keep`` (bool [out]) of a linear layer, in place."""
    conv = _is_conv1d(layer)
    layer.weight = nn.Parameter(_take(layer.weight.data, keep, 1 if conv else 0))
    if layer.bias is not None:
        layer.bias = nn.Parameter(_take(layer.bias.data, keep, 0))
    if conv:
        layer.nf = int(keep.sum())
    else:
        layer.out_features = int(keep.sum())


def set_columns(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Replace a linear layer's weight by ``weight`` [out, kept] (and its bias), in place."""
    dtype = layer.weight.dtype
    conv = _is_conv1d(layer)
    layer.weight = nn.Parameter((weight.T if conv else weight).to(dtype).contiguous())
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(dtype))
    if conv:
        layer.nx = weight.shape[1]
    else:
        layer.in_features = weight.shape[1]


def add_bias(layer: nn.Module) -> None:
    """Give a bias-free linear layer a zero bias (for ``compensation="bias"`` on Llama)."""
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(out_width(layer), dtype=layer.weight.dtype, device=layer.weight.device))


# --------------------------------------------------------------------------- the block's layout


def head_layout(config) -> tuple[int, int, int]:
    """(attention heads, key/value heads, head_dim) from a transformers config."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None)
    if kv is None and getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        kv = 1  # Falcon-7B style multi-query attention
    kv = kv or getattr(config, "num_kv_heads", None) or heads  # Falcon's new architecture: num_kv_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def producer_segments(kind: str, rows: int, width: int, kv_width: int) -> list[str] | None:
    """How a producer's output rows split into the consumer's channels: ``["c"]`` rows are the
    channels themselves (q, up, fc1), ``["kv"]`` one row block per KV group (k, v), ``["c", "kv",
    "kv"]`` a fused q|k|v layer (Phi-3), ``["c", "c"]`` a fused gate|up layer (Phi-3). None if the
    width fits none of these."""
    layouts = [["c"], ["kv"], ["c", "kv", "kv"]] if kind == "attention" else [["c"], ["c", "c"]]
    sizes = {"c": width, "kv": kv_width}
    return next((lay for lay in layouts if sum(sizes[s] for s in lay) == rows), None)


def find_units(block: nn.Module, hidden, batch_kwargs, layout: tuple[int, int, int]) -> list[Unit]:
    """The attention and MLP units of one block, from the order in which its linears run.

    layout: (heads, kv heads, head_dim) of the config. A group of producers followed by one layer
    reading heads x head_dim channels is the attention (first such group only); a group whose rows
    are the next layer's input width (or twice it), that layer writing the hidden size, is the MLP
    (first such group only: Qwen2-MoE's shared_expert_gate also reads a hidden-wide input).
    """
    heads, kv, head_dim = layout
    layers = {name: m for name, m in block.named_modules() if is_layer(m)}
    groups = input_groups(block, layers, hidden, batch_kwargs)
    units = []
    for producers, after in zip(groups, groups[1:]):
        if len(after) != 1:
            continue
        consumer = layers[after[0]]
        width = in_width(consumer)
        rows = [out_width(layers[p]) for p in producers]
        attention = width == heads * head_dim and not any(u.kind == "attention" for u in units)
        if attention and all(producer_segments("attention", r, width, kv * head_dim) for r in rows) \
                and sum(rows) == (heads + 2 * kv) * head_dim:
            units.append(Unit("attention", producers, after[0]))
        elif rows in ([width], [width, width], [2 * width]) and out_width(consumer) == hidden.shape[-1] \
                and not any(u.kind == "mlp" for u in units):
            units.append(Unit("mlp", producers, after[0]))
    followers = find_followers(block, [p for u in units for p in u.producers], layers, hidden, batch_kwargs)
    for unit in units:
        unit.followers = {f: p for f, p in followers.items() if p in unit.producers}
    return units


@torch.no_grad()
def find_followers(block, producers: list[str], layers, hidden, batch_kwargs) -> dict[str, str]:
    """Modules with parameters that normalise a producer's *whole* output (OLMo 2's q_norm /
    k_norm are RMSNorms over all heads x head_dim rows, not per head): their parameters must lose
    the same rows. Found by one forward: a module whose input shares storage with a producer's
    output and whose parameters each have as many entries as that producer has rows.
    Returns {module name: producer name}."""
    outputs: list[tuple[torch.Tensor, str]] = []  # held, so no other tensor reuses their memory meanwhile
    found: dict[str, str] = {}
    candidates = {name: m for name, m in block.named_modules()
                  if name not in layers and any(True for _ in m.parameters(recurse=False))}

    def produced(module, args, output, name):
        outputs.append((output, name))

    def consumed(module, args, name):
        if not args or not torch.is_tensor(args[0]):
            return
        ptr = args[0].untyped_storage().data_ptr()
        producer = next((n for out, n in outputs if out.untyped_storage().data_ptr() == ptr), None)
        rows = out_width(layers[producer]) if producer else None
        if producer and all(p.numel() == rows for p in module.parameters(recurse=False)):
            found.setdefault(name, producer)

    hooks = [block.get_submodule(p).register_forward_hook(lambda m, a, o, n=p: produced(m, a, o, n)) for p in producers]
    hooks += [m.register_forward_pre_hook(lambda m, a, n=name: consumed(m, a, n)) for name, m in candidates.items()]
    try:
        _run_one(block, hidden, batch_kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return found


def _run_one(block, hidden, batch_kwargs):
    """Forward the first calibration sample through ``block`` (for recognising its layout)."""
    args, kwargs = batch_kwargs[0]
    first = lambda v: v[:1] if torch.is_tensor(v) and v.dim() and v.shape[0] > 1 else v  # noqa: E731
    one = {k: tuple(map(first, v)) if isinstance(v, tuple) else first(v) for k, v in kwargs.items()}
    device = next(block.parameters()).device
    return block(hidden[:1].to(device), *args, **one)


def find_experts(block: nn.Module, hidden, batch_kwargs, hidden_size: int) -> Experts | None:
    """The routed experts of a block, or None: the module whose own parameters are all 3-D with a
    common first dimension E (one matrix per expert), and the module beside it holding a router
    weight [E, hidden] (the experts' parent's other children)."""
    found = [(name, m) for name, m in block.named_modules() if _expert_count(m)]
    if not found:
        return None
    if len(found) > 1:
        raise ConfigError(f"{type(block).__name__} has several expert modules ({', '.join(n for n, _ in found)})")
    path, module = found[0]
    count = _expert_count(module)
    parent = path.rpartition(".")[0]
    routers = [name for name, m in block.get_submodule(parent).named_modules()
               if m is not module and any(p.dim() == 2 and tuple(p.shape) == (count, hidden_size)
                                          for p in m.parameters(recurse=False))]
    if len(routers) != 1:
        raise ConfigError(f"found no router weight [{count}, {hidden_size}] beside the experts {path}")
    router = f"{parent}.{routers[0]}" if parent else routers[0]
    top_k = getattr(block.get_submodule(router), "top_k", None) or getattr(block.get_submodule(parent), "top_k", None)
    if top_k is None:
        raise ConfigError(f"cannot tell how many experts {router} routes each token to (no top_k attribute)")
    experts = Experts(path, router, count, int(top_k))
    _recognise_channels(experts, module, block, hidden, batch_kwargs, hidden_size)
    return experts


def _expert_count(module: nn.Module) -> int:
    """E when every own parameter of ``module`` is [E, ., .] with E > 1, else 0."""
    shapes = [p.shape for p in module.parameters(recurse=False)]
    if not shapes or any(len(s) != 3 for s in shapes) or len({s[0] for s in shapes}) != 1 or shapes[0][0] < 2:
        return 0
    return shapes[0][0]


@torch.no_grad()
def _recognise_channels(experts: Experts, module, block, hidden, batch_kwargs, hidden_size: int) -> None:
    """Set ``experts.width`` (and the parameter names) when the experts compute
    ``down[e] @ (act(g) * u)``, ``g, u = (gate_up[e] @ x).chunk(2)``, checked against the module's
    own forward on the routed calibration tokens of the first sample."""
    params = dict(module.named_parameters(recurse=False))
    down = [n for n, p in params.items() if p.shape[1] == hidden_size and p.shape[2] != hidden_size]
    down = down or [n for n, p in params.items() if p.shape[1] == p.shape[2] == hidden_size and "down" in n]
    if len(params) != 2 or len(down) != 1 or not hasattr(module, "act_fn"):
        return
    gate_up = next(n for n in params if n != down[0])
    width = params[down[0]].shape[2]
    if tuple(params[gate_up].shape[1:]) != (2 * width, hidden_size):
        return
    experts.width, experts.gate_up, experts.down = width, gate_up, down[0]
    routed = []
    hook = module.register_forward_pre_hook(lambda m, a, k: routed.append(_routing(m, a, k)), with_kwargs=True)
    try:
        _run_one(block, hidden, batch_kwargs)
    finally:
        hook.remove()
    x, index, weights = routed[0]
    for e in index.unique().tolist()[:2]:
        tokens, position = (index == e).nonzero(as_tuple=True)
        ours = expert_forward(module, experts, e, x[tokens]) * weights[tokens, position, None]
        theirs = expert_output(module, x[tokens], e, weights[tokens, position])
        ours, theirs = ours.float(), theirs.float()
        if not torch.allclose(ours, theirs, rtol=1e-2, atol=1e-2 * float(theirs.abs().max())):  # bf16-proof
            experts.width = 0  # a different layout (interleaved, biased, clamped): whole experts only
            return


def _routing(module, args, kwargs):
    """(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) of one call of an experts module,
    whatever the arguments are named: its first three parameters."""
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    values = list(bound.arguments.values())
    return values[0], values[1], values[2]


def expert_output(module, x: torch.Tensor, e: int, weights: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s weighted output on its routed tokens, by the module's own forward (so any
    layout is scored right): x [n, H], weights [n] -> [n, H]."""
    index = torch.full((x.shape[0], 1), e, dtype=torch.long, device=x.device)
    return module.forward(x, index, weights[:, None].to(x.dtype))


def expert_intermediate(module, experts: Experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """act(g) * u, the input of expert e's down projection: x [n, H] -> [n, I]."""
    gate, up = F.linear(x, getattr(module, experts.gate_up)[e]).chunk(2, dim=-1)
    return module.act_fn(gate) * up


def expert_forward(module, experts: Experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e on x [n, H], unweighted, in the recognised layout -> [n, H]."""
    return F.linear(expert_intermediate(module, experts, e, x), getattr(module, experts.down)[e])


def check_uniform(layers: nn.ModuleList) -> None:
    """Every block must have block 0's parameter shapes: the same structures are removed from all
    (a standard config has one intermediate_size, one head count)."""
    reference = {name: p.shape for name, p in layers[0].named_parameters()}
    for i, block in enumerate(layers):
        shapes = {name: p.shape for name, p in block.named_parameters()}
        if shapes != reference:
            differ = sorted(set(shapes.items()) ^ set(reference.items()))[0][0]
            raise ConfigError(f"decoder block {i} differs from block 0 ({differ}); structured pruning removes "
                              "the same structures from every block, so the blocks must be alike")


# --------------------------------------------------------------------------- what the config can express


def probe_block(config) -> nn.Module:
    """Block 0 of a one-block model of ``config`` on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        probe = AutoModelForCausalLM.from_config(_one_layer(config))
    return find_blocks(probe)[1][0]


def _one_layer(config):
    config = copy.deepcopy(config)
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(config, key):
            setattr(config, key, 1)
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1]
    return config


def _measure(config, key: str, value: int, measure) -> int | None:
    """What ``measure(block)`` reads on a probe of ``config`` with ``key`` set to ``value``."""
    probe_config = copy.deepcopy(config)
    try:
        setattr(probe_config, key, value)
        return measure(probe_block(probe_config))
    except Exception:  # noqa: BLE001 - any config the model class rejects cannot express it
        return None


def config_key(config, value: int, target: int, measure) -> str | None:
    """The config key that sets a width: among the integer keys holding ``value`` (and the
    implicit ones holding None, GPT-2's n_inner), the one whose change to ``target`` changes
    ``measure(probe block)`` to ``target``. None when no key does (the width is fixed in code)."""
    items = config.to_dict().items()
    candidates = [k for k, v in items if v == value and type(v) is int]
    candidates += [k for k, v in items if v is None and k in IMPLICIT_WIDTH_KEYS and value == 4 * config.hidden_size]
    return next((k for k in candidates if _measure(config, k, target, measure) == target), None)


def heads_expressible(config, unit: Unit | None, heads: int, kv: int, head_dim: int) -> bool:
    """Whether a config with one KV group fewer keeps ``head_dim`` (its attention consumer reads
    (kv - 1) x heads-per-group x head_dim channels on a probe)."""
    if unit is None or kv < 2:
        return False
    n_rep = heads // kv
    try:
        probe = target_config(config, Plan(kv_groups=1), (heads, kv, head_dim), {})
        got = in_width(probe_block(probe).get_submodule(unit.consumer))
    except Exception:  # noqa: BLE001 - OPT: "embed_dim must be divisible by num_heads"; Falcon: head_dim read-only
        return False
    return got == (kv - 1) * n_rep * head_dim


def target_config(config, plan: Plan, layout: tuple[int, int, int], widths: dict[str, tuple[str, int]]):
    """A copy of ``config`` describing the pruned model. widths: {what: (config key, new value)}."""
    heads, kv, head_dim = layout
    new = copy.deepcopy(config)
    if plan.kv_groups:
        new_kv = kv - plan.kv_groups
        new.num_attention_heads = new_kv * (heads // kv)
        new.num_key_value_heads = new_kv
        new.head_dim = head_dim
    for key, value in widths.values():
        setattr(new, key, value)
    return new


def check_expressible(config, new_config, units: list[Unit], experts: Experts | None, plan: Plan,
                      layout: tuple[int, int, int], biased: set[str] = frozenset()) -> None:
    """Dry run: cut a meta-device block of ``config`` as planned and compare every parameter
    shape with a meta-device block of ``new_config``; raise ConfigError naming the first
    difference, before any work (e.g. a config key that moves more than the width it was found for)."""
    heads, kv, head_dim = layout
    try:
        want = {name: tuple(p.shape) for name, p in probe_block(new_config).named_parameters()}
    except Exception as err:  # noqa: BLE001 - the model class rejects the new config
        raise ConfigError(f"{type(config).__name__} cannot be built with the pruned sizes: {err}") from None
    block = probe_block(config)
    n_rep = heads // kv
    for unit in units:
        drop = plan.kv_groups if unit.kind == "attention" else plan.channels
        if not drop:
            continue
        size = head_dim * n_rep if unit.kind == "attention" else 1
        consumer = block.get_submodule(unit.consumer)
        for name in unit.producers + [unit.consumer] if unit.kind in biased else []:
            add_bias(block.get_submodule(name))
        keep_groups = torch.arange(in_width(consumer) // size) >= drop
        keep = keep_groups.repeat_interleave(size)
        cut_unit(block, unit, keep_groups, keep, head_dim, _take(weight_of(consumer).data, keep, 1), None)
    if experts is not None and (plan.experts or plan.expert_channels):
        kept = torch.arange(experts.count) >= plan.experts
        cut_experts(block, experts, kept)
        if plan.expert_channels:
            module = block.get_submodule(experts.path)
            keep = torch.arange(experts.width) >= plan.expert_channels
            masks = keep.expand(int(kept.sum()), -1)
            cut_expert_channels(module, experts, masks, _take(getattr(module, experts.down).data, keep, 2))
    got = {name: tuple(p.shape) for name, p in block.named_parameters()}
    for name in sorted(set(want) | set(got)):
        if want.get(name) != got.get(name):
            raise ConfigError(f"{type(config).__name__} cannot express the pruned block: {name} would be "
                              f"{got.get(name)} but the pruned config builds {want.get(name)}")


# --------------------------------------------------------------------------- how much to remove


def plan_removal(block: nn.Module, units: list[Unit], experts: Experts | None, kv_groups: int, ratio: float,
                 attn_ratio: float | None, experts_ratio: float | None, can_drop_heads: bool) -> Plan:
    """What to remove so that about ``ratio`` of the block's parameters go.

    Experts first, when asked: round(experts_ratio x E) whole experts. Heads: ``attn_ratio`` of the
    KV groups when given, else ``ratio`` of them (rounded) within the budget. The MLP channels (and
    every kept expert's channels, by the same fraction) take the rest of the budget, kept widths
    rounded to MULTIPLE_OF.
    """
    total = sum(p.numel() for p in block.parameters())
    budget = ratio * total
    plan = Plan()
    if experts is not None and experts_ratio:
        plan.experts = round(experts_ratio * experts.count)
        if experts.count - plan.experts < experts.top_k:
            raise ConfigError(f"cannot keep {experts.count - plan.experts} of {experts.count} experts: each token "
                              f"is routed to {experts.top_k}; lower experts_ratio")
        budget -= plan.experts * _expert_params(block, experts)
    per_group = 0
    mlp = None
    for unit in units:
        consumer = block.get_submodule(unit.consumer)
        producers = [block.get_submodule(p) for p in unit.producers]
        if unit.kind == "attention":  # each producer and the consumer lose 1/kv_groups of their rows/columns
            per_group = (sum(out_width(p) * _row_params(p) for p in producers)
                         + out_width(consumer) * in_width(consumer)) // kv_groups
        else:
            mlp = (in_width(consumer), sum(_row_params(p) * out_width(p) for p in producers) // in_width(consumer)
                   + out_width(consumer))
    share = ratio if attn_ratio is None else attn_ratio
    plan.kv_groups = round(share * kv_groups) if per_group and can_drop_heads else 0
    if attn_ratio is None:
        plan.kv_groups = min(plan.kv_groups, max(int(budget // per_group), 0) if per_group else 0)
    if plan.kv_groups >= kv_groups and plan.kv_groups:
        raise ConfigError(f"cannot remove all {kv_groups} key/value groups; lower the ratio")
    budget -= plan.kv_groups * per_group

    widths = []  # (width, parameters per channel)
    if mlp:
        widths.append(mlp)
    if experts is not None and experts.width:
        module = block.get_submodule(experts.path)
        tensors = (getattr(module, experts.gate_up), getattr(module, experts.down))
        per_channel = sum(t.numel() for t in tensors) // (experts.count * experts.width)
        widths.append((experts.width, (experts.count - plan.experts) * per_channel))
    fraction = max(budget, 0) / sum(w * c for w, c in widths) if widths else 0.0
    removed = [w - _round_width(w * (1 - fraction), w) for w, _ in widths]
    if mlp:
        plan.channels = removed.pop(0)
    if experts is not None and experts.width:
        plan.expert_channels = removed.pop(0)
    return plan


def _round_width(keep: float, width: int) -> int:
    """The kept width: a multiple of MULTIPLE_OF (at least one) where the width allows, at most ``width``."""
    if width >= 2 * MULTIPLE_OF:
        return min(width, max(MULTIPLE_OF, int(round(keep / MULTIPLE_OF)) * MULTIPLE_OF))
    return min(width, max(1, round(keep)))


def _expert_params(block, experts: Experts) -> int:
    """Parameters one expert holds: its slice of the experts' tensors and its router row(s)."""
    tensors = list(block.get_submodule(experts.path).parameters(recurse=False))
    tensors += [p for p in block.get_submodule(experts.router).parameters(recurse=False) if p.shape[0] == experts.count]
    return sum(p.numel() for p in tensors) // experts.count


def _row_params(layer: nn.Module) -> int:
    """Parameters per output row: the row of the weight and its bias."""
    return in_width(layer) + (layer.bias is not None)


# --------------------------------------------------------------------------- cutting


def cut_unit(block, unit: Unit, keep_groups: torch.Tensor, keep: torch.Tensor, head_dim: int,
             weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Keep the channels ``keep`` (bool [in]) of a unit, in place: the producers' rows (k/v keep
    the KV groups ``keep_groups``), the norms over their outputs, the consumer's columns, which
    become ``weight`` [out, kept] (and ``bias``)."""
    kv_keep = keep_groups.repeat_interleave(head_dim) if unit.kind == "attention" else None
    masks = {"c": keep, "kv": kv_keep}
    rows = {}
    for name in unit.producers:
        producer = block.get_submodule(name)
        kv_width = kv_keep.shape[0] if kv_keep is not None else 0
        segments = producer_segments(unit.kind, out_width(producer), keep.shape[0], kv_width)
        rows[name] = torch.cat([masks[s] for s in segments])
        cut_rows(producer, rows[name])
    for name, producer in unit.followers.items():
        follower = block.get_submodule(name)
        for key, p in list(follower.named_parameters(recurse=False)):
            flat = _take(p.data.reshape(-1), rows[producer], 0)
            setattr(follower, key, nn.Parameter(flat.reshape(-1, *p.shape[1:]) if p.dim() > 1 else flat))
        if hasattr(follower, "normalized_shape"):  # nn.LayerNorm checks its input against it
            follower.normalized_shape = tuple(follower.weight.shape)
    set_columns(block.get_submodule(unit.consumer), weight, bias)


def cut_experts(block, experts: Experts, kept: torch.Tensor) -> None:
    """Keep the experts ``kept`` (bool [E]), in place: dim 0 of every expert tensor and the
    router's rows. (The modules' expert counts come with ``rebuild_block``.)"""
    module, router = block.get_submodule(experts.path), block.get_submodule(experts.router)
    for owner in (module, router):
        for key, p in list(owner.named_parameters(recurse=False)):
            if p.shape[0] == experts.count:
                setattr(owner, key, nn.Parameter(_take(p.data, kept, 0)))
        for key, b in list(owner.named_buffers(recurse=False)):
            if b is not None and b.dim() and b.shape[0] == experts.count:  # e.g. a score-correction bias
                setattr(owner, key, _take(b, kept, 0))


def cut_expert_channels(module, experts: Experts, keep: torch.Tensor, down: torch.Tensor) -> None:
    """Keep channels ``keep`` (bool [E', I], the same count per expert) of every expert, in place:
    gate and up rows of ``gate_up`` [E', 2I, H]; ``down`` [E', H, I'] replaces the down projection."""
    gate_up = getattr(module, experts.gate_up).data
    rows = torch.cat([keep, keep], dim=1)  # the chunked gate|up layout: gate rows, then up rows
    new = torch.stack([_take(gate_up[e], rows[e], 0) for e in range(gate_up.shape[0])])
    setattr(module, experts.gate_up, nn.Parameter(new))
    setattr(module, experts.down, nn.Parameter(down.to(gate_up.dtype).contiguous()))


# --------------------------------------------------------------------------- choosing and solving


def solve_consumer(W: torch.Tensor, bias: torch.Tensor | None, moments: Moments, size: int, remove: int,
                   importance: str, compensation: str, damp: float):
    """Choose ``remove`` groups of ``size`` input channels of a consumer W [out, in] and solve for
    the rest. Returns (keep_groups bool [in / size], keep bool [in], new W [out, kept], new bias or
    None, relative output error on the calibration inputs)."""
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
    return keep_groups, keep, new_w, new_b, _error(W, bias, new_w, new_b, keep, moments)


def prune_unit(block, unit: Unit, moments: Moments, remove: int, importance: str, compensation: str,
               damp: float, head_dim: int, n_rep: int) -> float:
    """Remove ``remove`` structures of one unit in place; returns the consumer's output error."""
    consumer = block.get_submodule(unit.consumer)
    W = weight_of(consumer).data.float()
    bias = consumer.bias.data.float() if consumer.bias is not None else None
    size = head_dim * n_rep if unit.kind == "attention" else 1
    keep_groups, keep, new_w, new_b, error = solve_consumer(W, bias, moments, size, remove, importance,
                                                            compensation, damp)
    if compensation == "bias" and consumer.bias is None:
        add_bias(consumer)
    cut_unit(block, unit, keep_groups, keep, head_dim, new_w, new_b)
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


class ExpertStats:
    """What one block's routed experts see on the calibration tokens, from a pre-hook on the
    experts module (where the routing is known): per expert, the tokens routed to it, the energy
    sum_t ||w_te E_e(x_t)||^2 of its weighted output, and (for channel pruning) the moments of its
    down projection's input scaled by the routing weight, w_te * (act(g) * u)."""

    def __init__(self, module, experts: Experts, channels: bool, device):
        self.module, self.experts = module, experts
        self.tokens = torch.zeros(experts.count, dtype=torch.long)
        self.energy = torch.zeros(experts.count, dtype=torch.float64)
        self.moments = [Moments(experts.width, device) for _ in range(experts.count)] if channels else None

    @torch.no_grad()
    def __call__(self, module, args, kwargs) -> None:
        x, index, weights = _routing(module, args, kwargs)
        for e in range(self.experts.count):
            tokens, position = (index == e).nonzero(as_tuple=True)
            if not len(tokens):
                continue
            xe, we = x[tokens], weights[tokens, position]
            self.tokens[e] += len(tokens)
            self.energy[e] += float(expert_output(module, xe, e, we).float().pow(2).sum())
            if self.moments is not None:
                self.moments[e].add(expert_intermediate(module, self.experts, e, xe) * we[:, None].to(xe.dtype))


def prune_experts(block, experts: Experts, stats: ExpertStats, plan: Plan, importance: str, compensation: str,
                  damp: float, index: int) -> tuple[list[int], float | None]:
    """Remove the ``plan.experts`` experts of least output energy, then ``plan.expert_channels``
    channels of every kept expert, each from its own statistics. An expert routed fewer tokens than
    its kept width (too few for a least-squares fit) is logged and pruned by E[z_j^2] ||W_:,j||^2
    from what it has (by ||W_:,j||^2 alone when it got none), without the update.
    Returns (original indices of the kept experts, mean relative output error of the kept experts'
    down projections, or None when no channels were removed)."""
    order = expert_energy_order(stats.energy, stats.tokens)
    kept = torch.ones(experts.count, dtype=torch.bool)
    kept[order[: plan.experts]] = False
    kept_ids = kept.nonzero().flatten().tolist()
    if plan.expert_channels:
        module = block.get_submodule(experts.path)
        down = getattr(module, experts.down).data
        keep_width = experts.width - plan.expert_channels
        masks, new_down, errors = [], [], []
        for e in kept_ids:
            W, moments = down[e].float(), stats.moments[e]
            if moments.tokens < keep_width:
                keep, new_w, error = _few_tokens_channels(W, moments, plan.expert_channels, index, e)
            else:
                _, keep, new_w, _, error = solve_consumer(W, None, moments, 1, plan.expert_channels, importance,
                                                          compensation, damp)
            masks.append(keep.cpu())
            new_down.append(new_w)
            errors.append(error)
        cut_experts(block, experts, kept)
        cut_expert_channels(module, experts, torch.stack(masks).to(down.device), torch.stack(new_down))
        measured = [e for e in errors if e == e]  # an expert without tokens has no error to measure (nan)
        return kept_ids, sum(measured) / len(measured) if measured else None
    if plan.experts:
        cut_experts(block, experts, kept)
    return kept_ids, None


def _few_tokens_channels(W: torch.Tensor, moments: Moments, remove: int, block: int, expert: int):
    """The logged fallback of ``prune_experts``: (keep [I], W[:, keep], output error or nan)."""
    if moments.tokens:
        score = moments.second.diagonal() * W.pow(2).sum(0)
        how = f"by E[z_j^2]·||W_:,j||^2 from its {moments.tokens} tokens"
    else:
        score = W.pow(2).sum(0)
        how = "by ||W_:,j||^2 (it received no tokens)"
    logger.warning("block %d expert %d: %d calibration tokens are too few for a least-squares fit; its channels "
                   "are ranked %s and sliced without an update", block, expert, moments.tokens, how)
    keep = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)
    keep[score.argsort()[:remove]] = False
    error = _error(W, None, W[:, keep], None, keep, moments) if moments.tokens else float("nan")
    return keep, W[:, keep], error


# --------------------------------------------------------------------------- the driver


def check_options(ratio: float, attn_ratio: float | None, importance: str, compensation: str,
                  experts_ratio: float | None = None) -> tuple[str, str]:
    """Validate the options of ``prune_structured`` (cheaply, before any model is loaded).
    Returns (importance, compensation) lower-cased; raises ConfigError."""
    if not 0 <= ratio < 1:
        raise ConfigError(f"ratio must lie in [0, 1), got {ratio}")
    if attn_ratio is not None and not 0 <= attn_ratio < 1:
        raise ConfigError(f"attn_ratio must lie in [0, 1), got {attn_ratio}")
    if experts_ratio is not None and not 0 <= experts_ratio < 1:
        raise ConfigError(f"experts_ratio must lie in [0, 1), got {experts_ratio}")
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
    experts_ratio: float | None = None,
    importance: str = "flap",
    compensation: str = "ls",
    damp: float = 0.01,
    batch_size: int = 8,
    device: str | None = None,
    blocks: str | None = None,
    tuning: PruneConfig | None = None,
    hooks: BlockHooks | None = None,
) -> StructuredReport:
    """Remove about ``ratio`` of every decoder block's parameters, in place, as whole MLP channels,
    whole key/value groups of attention heads, and in mixture-of-experts blocks whole experts and
    expert channels; update ``model.config`` to match.

    batches:       calibration tokens, LongTensor [n, L] or a list of [1, L] tensors.
    ratio:         fraction of each block's parameters to remove, in [0, 1).
    attn_ratio:    fraction of the KV groups to remove (rounded); default ``ratio`` (rounded), 0 to
                   prune the MLP only. The MLP takes the rest of the parameter budget.
    experts_ratio: mixture-of-experts: fraction of the routed experts to remove (rounded), the
                   ones contributing least to the block output on the calibration tokens; default
                   none (every expert kept, each loses the same share of its channels). Removed
                   first; attention and channels then take what is left of ``ratio`` (``ratio=0``
                   removes experts only).
    importance:    "flap" (weighted fluctuation), "wanda-sp" (|W|*||X||) or "obs" (greedy
                   structured OBS on the consumer's Hessian, as in ZipLM).
    compensation:  "ls" (least-squares update of the consumer, standard config), "bias" (FLAP's
                   mean-contribution bias; needs the bias in the architecture) or "none".
    damp:          relative dampening of the least-squares / OBS Hessian.
    tuning:        a ``PruneConfig`` with ``reconstruct=True``: after each block is cut, tune its
                   remaining weights towards the dense block's outputs, with that config's
                   ``recon_*`` settings (see ``ptp.reconstruct``); its other fields are not used.
    hooks:         the engine's ``BlockHooks``: ``ptp.scale`` streams and resumes this same loop
                   (``prune_structured_streaming``).

    >>> report = ptp.prune_structured(model, tokens, ratio=0.35)
    >>> model.config.intermediate_size, model.config.num_key_value_heads
    (992, 2)
    """
    start = time.perf_counter()
    importance, compensation = check_options(ratio, attn_ratio, importance, compensation, experts_ratio)
    tokens = as_token_batch(batches)
    checks.check_token_ids(model, tokens)  # an id outside the vocabulary: one line, not an IndexError
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    blocks_name, layers = find_blocks(model, blocks)
    check_uniform(layers)
    config = model.config
    layout = head_layout(config)
    heads, kv, head_dim = layout
    n_rep = heads // kv
    report = StructuredReport(ratio, importance, compensation, experts_ratio)
    report.block_params = (sum(p.numel() for p in layers.parameters()), 0)
    recon = None
    if tuning is not None and tuning.tunes_blocks:
        tuning = replace(tuning, batch_size=batch_size)  # the windows are batched as captured
        check_reconstruction(tokens, tuning)
        recon = Reconstruction(tuning, hooks or BlockHooks(), report.reconstruction)
    # From the first block processed (block 0, or where a resumed run starts: the plan depends on
    # the blocks' shapes only, which check_uniform made equal): units, experts, plan, new config,
    # biased kinds, templates.
    plan: dict = {}

    def cut(i, block, hidden, batch_kwargs):
        if not plan:
            units, experts, removal, new_config, biased = _prepare(config, block, hidden, batch_kwargs, layout, ratio,
                                                                   attn_ratio, experts_ratio, compensation)
            mlp = next((u for u in units if u.kind == "mlp"), None)
            plan.update(units=units, experts=experts, removal=removal, new_config=new_config, biased=biased,
                        mlp_width=in_width(block.get_submodule(mlp.consumer)) if mlp else 0)
            plan["templates"], plan["template_config"] = pruned_templates(new_config)
            for done in range(i):  # a resumed run: the blocks already cut are on disk, of the new shapes
                layers[done] = plan["templates"][done]
            logger.info("structured %s/%s: KV groups %d -> %d, MLP %d -> %d%s", importance, compensation, kv,
                        kv - removal.kv_groups, plan["mlp_width"], plan["mlp_width"] - removal.channels,
                        f", experts {experts.count} -> {experts.count - removal.experts} of width {experts.width} -> "
                        f"{experts.width - removal.expert_channels}" if experts else "")
        if recon is not None:
            recon.dense_forward(block, hidden, batch_kwargs)
        report.blocks.append(_prune_block(block, i, plan["units"], plan["experts"], plan["removal"], hidden,
                                          batch_kwargs, batch_size, importance, compensation, damp, head_dim, n_rep,
                                          plan["biased"], device))
        layers[i] = block = rebuild_block(block, plan["templates"][i])
        if recon is not None:
            recon.tune(i, block, linear_layers(block, f"{blocks_name}.{i}", ()), hidden, batch_kwargs)
        run_block(block, hidden, batch_kwargs, batch_size)  # the pruned block's outputs feed the next block

    for_each_block(model, layers, tokens, batch_size, device, f"structured {ratio:g}", cut, hooks, report)
    units, experts, removal, new_config = plan["units"], plan["experts"], plan["removal"], plan["new_config"]
    mlp_width, new_kv = plan["mlp_width"], kv - removal.kv_groups

    before = config.to_dict()
    report.config = {k: v for k, v in new_config.to_dict().items() if k not in before or before[k] != v}
    for key, value in report.config.items():
        setattr(config, key, value)
    for module in layers.modules():  # the rebuilt blocks read the model's (now updated) config, as after loading
        if getattr(module, "config", None) is plan["template_config"]:
            module.config = config
    report.intermediate = (mlp_width, mlp_width - removal.channels)
    report.heads, report.kv_heads = (heads, new_kv * n_rep), (kv, new_kv)
    if experts:
        report.experts = (experts.count, experts.count - removal.experts)
        report.expert_intermediate = (experts.width, experts.width - removal.expert_channels)
    report.block_params = (report.block_params[0], sum(p.numel() for p in layers.parameters()))
    report.wall_time_s = time.perf_counter() - start
    if report.removed < ratio - 0.05:  # e.g. an MLP-only family asked for more than its MLP holds
        logger.warning("removed %.1f%% of the decoder blocks' parameters, less than the %.0f%% asked: the "
                       "structures this config can shrink are at their minimum", 100 * report.removed, 100 * ratio)
    logger.info("removed %.1f%% of the decoder blocks' parameters in %.1f s", 100 * report.removed, report.wall_time_s)
    return report


def pruned_templates(new_config) -> tuple[nn.ModuleList, object]:
    """The decoder blocks of a meta-device model of the pruned config, and the config object
    they hold (no memory: the pruned tensors are assigned into them one block at a time)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        probe = AutoModelForCausalLM.from_config(copy.deepcopy(new_config))
    return find_blocks(probe)[1], probe.config


def rebuild_block(block: nn.Module, template: nn.Module) -> nn.Module:
    """``template`` holding ``block``'s pruned tensors: the block as ``from_pretrained`` builds it
    from the pruned config, so the attributes its forward reads (Phi-3's num_key_value_heads, the
    experts' num_experts, ...) match the new shapes, and the blocks not yet pruned keep reading
    the model's unchanged config. Raises if a tensor's name or shape differs (a bug: the shapes
    were checked by ``check_expressible``)."""
    template.load_state_dict(block.state_dict(), assign=True)
    for name, buffer in block.named_buffers():  # non-persistent buffers (e.g. rotary tables) are not in the state dict
        owner, _, leaf = name.rpartition(".")
        target = template.get_submodule(owner) if owner else template
        if leaf in target._buffers and target._buffers[leaf] is not None and target._buffers[leaf].is_meta:
            target._buffers[leaf] = buffer
    return template.train(block.training)


def _probe_width(width: int) -> int:
    """A different width to build a probe with (which key moves the width is seen by moving it)."""
    return width - MULTIPLE_OF if width > MULTIPLE_OF else width + MULTIPLE_OF


def _prepare(config, block, hidden, batch_kwargs, layout, ratio, attn_ratio, experts_ratio, compensation):
    """Recognise block 0, plan the removal, find the config keys and check the result is
    expressible. Returns (units, experts, plan, new config, kinds of unit that gain biases)."""
    heads, kv, head_dim = layout
    name = type(config).__name__
    units = find_units(block, hidden, batch_kwargs, layout)
    experts = find_experts(block, hidden, batch_kwargs, config.hidden_size)
    attention = next((u for u in units if u.kind == "attention"), None)
    can_drop = heads_expressible(config, attention, heads, kv, head_dim)
    if attn_ratio and not can_drop:
        raise ConfigError(f"{name} derives head_dim from hidden_size, so its heads cannot be removed in a "
                          "standard config; use attn_ratio=0")
    if experts_ratio and not experts:
        raise ConfigError(f"experts_ratio applies to mixture-of-experts models; {name} has no routed experts")
    mlp = next((u for u in units if u.kind == "mlp"), None)
    mlp_key, fixed = _mlp_key(config, block, mlp) if mlp else (None, None)
    if fixed:  # the MLP cannot shrink in this config: plan without it
        units = [u for u in units if u is not mlp]
    count_key, width_key = _expert_keys(config, experts) if experts else (None, None)

    plan = plan_removal(block, units, experts, kv, ratio, attn_ratio, experts_ratio, can_drop)
    if experts and not experts.width and not experts_ratio and ratio:
        raise ConfigError(f"the experts of {name} are not in the fused gate|up layout whose channels ptp can "
                          "remove; remove whole experts instead (experts_ratio, with ratio=0 for experts only)")
    if ratio and not (plan.kv_groups or plan.channels or plan.experts or plan.expert_channels):
        reasons = [fixed] if fixed else []
        if not can_drop:
            reasons.append("its heads cannot be removed (head_dim is derived from hidden_size, or one KV group)")
        raise ConfigError(f"{name}: nothing can be removed in a standard config at ratio {ratio}: "
                          + ("; ".join(reasons) or "the ratio is too small for one structure"))
    if fixed:
        logger.warning("%s: the MLP stays whole, %s", name, fixed)
    if plan.expert_channels and compensation == "bias":
        raise ConfigError("the experts have no bias to compensate into; use compensation='ls'")
    if plan.experts and count_key is None:
        raise ConfigError(f"no key of {name} sets the number of experts ({experts.count})")

    widths = {}  # what: (config key, new value)
    if plan.channels:
        widths["mlp"] = (mlp_key, in_width(block.get_submodule(mlp.consumer)) - plan.channels)
    if plan.experts:
        widths["experts"] = (count_key, experts.count - plan.experts)
    if plan.expert_channels:
        widths["expert width"] = (width_key, experts.width - plan.expert_channels)
    new_config = target_config(config, plan, layout, widths)
    pruned = [u for u in units if (plan.kv_groups if u.kind == "attention" else plan.channels)]
    biased = _enable_bias(new_config, block, pruned) if compensation == "bias" else set()
    check_expressible(config, new_config, units, experts, plan, layout, biased)
    return units, experts, plan, new_config, biased


def _mlp_key(config, block, mlp: Unit) -> tuple[str | None, str | None]:
    """(the config key of the MLP width, None), or (None, why the width cannot change)."""
    width = in_width(block.get_submodule(mlp.consumer))
    key = config_key(config, width, _probe_width(width), lambda b: in_width(b.get_submodule(mlp.consumer)))
    if key is None:
        return None, f"its MLP width {width} is fixed in code (no config key sets {mlp.consumer}'s input width)"
    return key, None


def _expert_keys(config, experts: Experts) -> tuple[str | None, str | None]:
    """The config keys of the number of experts and of each expert's width (None where no key
    moves it; a width without a key leaves the experts' channels alone: ``experts.width`` = 0)."""
    if experts.top_k > experts.count:
        raise ConfigError(f"{type(config).__name__} routes to {experts.top_k} of {experts.count} experts")
    count_key = config_key(config, experts.count, experts.count - 1,
                           lambda b: next(p.shape[0] for p in b.get_submodule(experts.router).parameters(recurse=False)
                                          if p.dim() == 2))
    width_key = None
    if experts.width:
        width_key = config_key(config, experts.width, _probe_width(experts.width),
                               lambda b: getattr(b.get_submodule(experts.path), experts.down).shape[2])
        experts.width = experts.width if width_key else 0
    return count_key, width_key


def _prune_block(block, i, units, experts, plan, hidden, batch_kwargs, batch_size, importance, compensation,
                 damp, head_dim, n_rep, biased, device) -> BlockReport:
    """Gather one block's statistics in one pass over the calibration data, then prune it in place."""
    todo = [(u, plan.kv_groups if u.kind == "attention" else plan.channels) for u in units]
    todo = [(u, n) for u, n in todo if n]
    moments = {u.consumer: Moments(in_width(block.get_submodule(u.consumer)), device) for u, _ in todo}
    hooks = [block.get_submodule(name).register_forward_pre_hook(lambda m, a, acc=acc: acc.add(a[0]))
             for name, acc in moments.items()]
    stats = None
    if experts is not None and (plan.experts or plan.expert_channels):
        module = block.get_submodule(experts.path)
        stats = ExpertStats(module, experts, bool(plan.expert_channels), device)
        hooks.append(module.register_forward_pre_hook(stats, with_kwargs=True))
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
    report = BlockReport(i, errors["attention"], errors["mlp"])
    if stats is not None:
        report.experts_kept, report.expert_error = prune_experts(block, experts, stats, plan, importance,
                                                                 compensation, damp, i)
        report.expert_tokens = stats.tokens.tolist()
    return report


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
