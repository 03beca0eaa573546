"""What the engine prunes: a *weight unit* is one weight matrix [out, in] and the inputs it multiplies.

Three kinds exist, and everything past this module (solvers, reports, verification, the compressed
format) sees only the unit's name and its [out, in] matrix:

- ``LinearUnit``: an ``nn.Linear`` (``model.layers.3.mlp.down_proj``), or GPT-2's ``Conv1D``,
  which stores the transpose;
- ``ExpertUnit``: one expert's slice of a fused mixture-of-experts parameter, as transformers 5
  stores experts (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I]; gpt-oss
  stores them transposed, [E, in, out]). Its name is the parameter's with the expert index
  appended: ``model.layers.3.mlp.experts.down_proj.5``.

Inputs are observed, not re-derived: a Linear's from a forward pre-hook; an expert's by running
the experts module's eager forward (the per-expert loop every transformers MoE defines) under a
``TorchFunctionMode`` that sees each ``linear(x, W[e])`` / ``x @ W[e]`` on a slice of a fused
parameter — so each expert's statistics come from exactly the tokens routed to it, with no table
of model families. This module is the engine's: the only other place with hooks.
"""

from __future__ import annotations

import inspect
import types
from contextlib import contextmanager

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .config import ConfigError

# Words in an experts module's forward signature that say it receives the routing decision
# (transformers 5: ``forward(hidden_states, top_k_index, top_k_weights)``; gpt-oss:
# ``router_indices``, ``routing_weights``).
ROUTING_ARGS = ("index", "indices", "routing", "router", "top_k", "expert")


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2's Conv1D (a linear layer that stores its weight as [in, out])."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


class LinearUnit:
    """An nn.Linear or Conv1D: ``matrix()`` is its weight as [out, in] (a view for Conv1D)."""

    kind = "linear"

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module

    def matrix(self) -> torch.Tensor:
        weight = self.module.weight.data
        return weight.T if type(self.module).__name__ == "Conv1D" else weight

    @property
    def in_features(self) -> int:
        return self.matrix().shape[1]

    def parameter(self) -> nn.Parameter:
        return self.module.weight


class ExpertUnit:
    """Expert ``index`` of the fused parameter ``param_name`` of ``module`` (an experts module).

    ``matrix()`` is a view [out, in] of that expert's slice: [index] of an [E, out, in] parameter,
    or its transpose when the parameter is stored [E, in, out] (``transposed``).
    """

    kind = "expert"

    def __init__(self, name: str, module: nn.Module, param_name: str, index: int, transposed: bool):
        self.name, self.module, self.param_name = name, module, param_name
        self.index, self.transposed = index, transposed

    def matrix(self) -> torch.Tensor:
        piece = getattr(self.module, self.param_name).data[self.index]
        return piece.T if self.transposed else piece

    @property
    def in_features(self) -> int:
        return self.matrix().shape[1]

    def parameter(self) -> nn.Parameter:
        return getattr(self.module, self.param_name)


def routes_tokens(module: nn.Module) -> bool:
    """Whether ``module``'s forward takes a routing decision besides the hidden states."""
    forward = getattr(type(module).forward, "__wrapped__", type(module).forward)
    try:
        names = list(inspect.signature(forward).parameters)[2:]  # past self and hidden_states
    except (TypeError, ValueError):
        return False
    return any(word in name for name in names for word in ROUTING_ARGS)


def stacked_transposed(module: nn.Module, param: torch.Tensor) -> bool:
    """Whether a fused [E, a, b] expert parameter is stored [E, in, out]. transformers' experts
    decorator records it as ``is_transposed``; without it, the [E, out, in] layout is assumed
    (and checked when the inputs are observed)."""
    return bool(getattr(module, "is_transposed", False))


# --------------------------------------------------------------------------- observing inputs


class _ExpertTap(TorchFunctionMode):
    """Calls ``listeners[(id(param), expert)](x)`` for each product of ``x`` with an expert's slice."""

    def __init__(self, params: dict[int, tuple[nn.Parameter, bool]], listeners: dict, seen: set):
        super().__init__()
        self.params, self.listeners, self.seen = params, listeners, seen

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear and len(args) >= 2:
            self._observe(args[0], args[1], transposed=False)
        elif func in (torch.matmul, torch.Tensor.__matmul__, torch.mm) and len(args) >= 2:
            self._observe(args[0], args[1], transposed=True)
        return func(*args, **kwargs)

    def _observe(self, x, weight, transposed: bool) -> None:
        base = getattr(weight, "_base", None)
        if not isinstance(weight, torch.Tensor) or base is None or id(base) not in self.params:
            return
        param, stored_transposed = self.params[id(base)]
        if transposed != stored_transposed:
            layout = "[E, in, out]" if transposed else "[E, out, in]"
            raise ConfigError(f"an expert parameter of shape {list(param.shape)} is used as {layout}, "
                              "not as its module declares; leave it dense with skip")
        index = (weight.storage_offset() - base.storage_offset()) // base.stride(0)
        self.seen.add(id(base))
        for listener in self.listeners.get((id(base), index), ()):
            listener(x)


@contextmanager
def observe_inputs(units: dict[str, object], listener):
    """While active, ``listener(name, x)`` is called with the input ``x`` [..., in] of every unit in
    ``units`` each time the block multiplies by its weight, in call order.

    Experts modules run their eager per-expert forward meanwhile (the loop of ``linear`` calls on
    slices that the tap can see); their outputs are the same up to float summation order.
    Yields the set of ``id``s of fused parameters whose products were seen.
    """
    handles, experts, seen = [], {}, set()
    for name, unit in units.items():
        if unit.kind == "linear":
            handles.append(unit.module.register_forward_pre_hook(lambda m, args, name=name: listener(name, args[0])))
        else:
            entry = experts.setdefault(id(unit.module), (unit.module, {}, {}))
            param = unit.parameter()
            entry[1][id(param)] = (param, unit.transposed)
            entry[2].setdefault((id(param), unit.index), []).append(lambda x, name=name: listener(name, x))
    for module, params, listeners in experts.values():
        eager = getattr(type(module).forward, "__wrapped__", type(module).forward)

        def tapped(self, *args, params=params, listeners=listeners, eager=eager, **kwargs):
            with _ExpertTap(params, listeners, seen):
                return eager(self, *args, **kwargs)

        module.forward = types.MethodType(tapped, module)
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()
        for module, _, _ in experts.values():
            del module.forward


# --------------------------------------------------------------------------- finding units


def skipped(name: str, patterns: tuple[str, ...]) -> bool:
    """A pattern matches a whole dotted segment run: 'down_proj', 'layers.3', 'model.layers.3.mlp'."""
    return any(f".{pattern}." in f".{name}." for pattern in patterns)


def _routers(block: nn.Module, experts_modules: set[int]) -> set[int]:
    """ids of the routing weights: the 2-D weights beside an experts module (same parent) with one
    row per expert, or one row (a shared expert's gate). They pick experts; they stay dense."""
    out = set()
    for parent in block.modules():
        children = list(parent.children())
        stacks = [c for c in children if id(c) in experts_modules]
        if not stacks:
            continue
        rows = {p.shape[0] for c in stacks for p in c.parameters(recurse=False) if p.dim() == 3} | {1}
        for child in children:
            for p in child.parameters(recurse=False):
                if p.dim() == 2 and p.shape[0] in rows:
                    out.add(id(p))
    return out


def block_units(block: nn.Module, prefix: str, skip: tuple[str, ...]) -> tuple[dict[str, object], list[dict]]:
    """The units to prune in one decoder block, and every other weight of the block with why it stays dense.

    Returns (full name -> unit, in definition order; [{"name", "params", "reason"}]) where reason is
    "skipped" (matched ``skip``), "router", or "vector" (norms, biases, scales: 1-D).
    Raises ConfigError naming any weight-shaped parameter (2-D or more) that is neither a linear
    layer, nor a fused expert stack of a module that receives routing, nor a router — unless
    ``skip`` names it.
    """
    experts_modules = {id(m) for m in block.modules()
                       if routes_tokens(m) and any(p.dim() == 3 for p in m.parameters(recurse=False))}
    routers = _routers(block, experts_modules)
    units: dict[str, object] = {}
    dense: list[dict] = []
    for module_name, module in block.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{prefix}.{module_name}.{param_name}" if module_name else f"{prefix}.{param_name}"
            owner = full.rpartition(".")[0]
            if param.dim() < 2:
                dense.append({"name": full, "params": param.numel(), "reason": "vector"})
            elif id(param) in routers:
                dense.append({"name": full, "params": param.numel(), "reason": "router"})
            elif is_linear(module) and param_name == "weight":
                if skipped(owner, skip):
                    dense.append({"name": full, "params": param.numel(), "reason": "skipped"})
                else:
                    units[owner] = LinearUnit(owner, module)
            elif param.dim() == 3 and id(module) in experts_modules:
                transposed = stacked_transposed(module, param)
                for e in range(param.shape[0]):
                    name = f"{full}.{e}"
                    if skipped(name, skip):
                        dense.append({"name": name, "params": param[e].numel(), "reason": "skipped"})
                    else:
                        units[name] = ExpertUnit(name, module, param_name, e, transposed)
            elif skipped(full, skip):
                dense.append({"name": full, "params": param.numel(), "reason": "skipped"})
            else:
                raise ConfigError(
                    f"{full} {list(param.shape)} ({type(module).__name__}) is a weight ptp does not know how to "
                    f"prune: not a linear layer, a fused expert stack or a router; leave it dense with "
                    f"skip={full!r} (--skip {full})"
                )
    return units, dense


def find_unit(model: nn.Module, name: str):
    """The unit called ``name`` in ``model`` (a module name, or a fused parameter's name + '.expert')."""
    try:
        module = model.get_submodule(name)
        if is_linear(module):
            return LinearUnit(name, module)
    except AttributeError:
        pass
    owner, _, index = name.rpartition(".")
    module_name, _, param_name = owner.rpartition(".")
    try:
        module = model.get_submodule(module_name)
        param = getattr(module, param_name)
    except AttributeError:
        raise KeyError(f"no weight unit {name!r} in {type(model).__name__}") from None
    if not index.isdigit() or not isinstance(param, torch.Tensor) or param.dim() != 3:
        raise KeyError(f"no weight unit {name!r} in {type(model).__name__}")
    return ExpertUnit(name, module, param_name, int(index), stacked_transposed(module, param))
