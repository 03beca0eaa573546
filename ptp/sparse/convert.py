"""Swap the pruned linear layers of a model for ``SparseLinear``, and its pruned fused expert
stacks for ``SparseExperts``: a model in memory (``sparsify``), or a ptp checkpoint on disk
(``load_sparse``; a ``--format compressed`` one goes straight from its kept values and bitmask
to the packed form, never building a dense weight)."""

from __future__ import annotations

import contextlib
import json
import logging
import types
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError
from ..units import routes_tokens, stacked_transposed
from .format import pack, pack_compressed, pack_compressed_experts
from .module import DenseLinear, SparseExperts, SparseLinear

log = logging.getLogger("ptp.sparse")

COMPRESSED_SUFFIX = ".ptp.safetensors"  # ptp.io's compressed files (not imported: io imports the engine)
MIN_SPARSITY = 0.25


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # GPT-2: weight [in, out]


def _tied_to_input(model: nn.Module) -> set[int]:
    """ids of weights shared with the input embeddings (a tied LM head stays an embedding)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return {id(emb.weight)} if emb is not None else set()


def sparsify(model: nn.Module, min_sparsity: float = MIN_SPARSITY, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Replace, in place, every ``nn.Linear`` (and GPT-2 ``Conv1D``) whose weight has at least
    ``min_sparsity`` zeros by a ``SparseLinear`` with the same weight (bit for bit) and bias.
    Layers whose name ends with an entry of ``skip``, and weights tied to the embeddings, stay.
    Returns the names of the layers replaced.

    >>> ptp.prune(model, calib, ptp.PruneConfig(sparsity="2:4"))
    >>> ptp.sparse.sparsify(model); model.generate(ids)
    """
    tied, done = _tied_to_input(model), []
    for name, module in list(model.named_modules()):
        if not (isinstance(module, nn.Linear) or _is_conv1d(module)) or id(module.weight) in tied:
            continue
        if any(name == s or name.endswith("." + s) for s in skip) or module.weight.device.type != "cpu":
            continue
        weight = module.weight.detach()
        if float((weight == 0).float().mean()) < min_sparsity:
            continue
        _replace(model, name, SparseLinear.from_linear(module, transposed=_is_conv1d(module), name=name))
        done.append(name)
    stacks = []
    for name, module, param_name in _expert_stacks(model):
        full = f"{name}.{param_name}"
        stack = getattr(module, param_name).detach()
        if any(full == s or full.endswith("." + s) for s in skip) or stack.device.type != "cpu":
            continue
        if float((stack == 0).float().mean()) < min_sparsity:
            continue
        _put_stack(module, param_name, SparseExperts.from_stack(stack, stacked_transposed(module, stack), name=full))
        stacks.append(full)
    log.info("sparse runtime: %d linear layers%s packed%s", len(done),
             f" and {len(stacks)} expert stacks" if stacks else "", _dense_head(model))
    return done + stacks


def _expert_stacks(model: nn.Module):
    """(module name, experts module, parameter name) of every fused [E, a, b] expert parameter:
    a 3-D parameter of a module whose forward takes the routing decision (as ``ptp.units`` finds
    the experts it prunes)."""
    for name, module in list(model.named_modules()):
        if routes_tokens(module):
            for param_name, param in list(module.named_parameters(recurse=False)):
                if param.dim() == 3:
                    yield name, module, param_name


def _put_stack(module: nn.Module, param_name: str, stack: SparseExperts) -> None:
    """Put ``stack`` where ``module``'s fused parameter was, and run the module's own eager
    per-expert loop — transformers' experts decorator may otherwise pick a grouped-GEMM path
    that takes the whole 3-D tensor, which a packed stack is not."""
    module._parameters.pop(param_name, None)
    setattr(module, param_name, stack)
    module.forward = types.MethodType(getattr(type(module).forward, "__wrapped__", type(module).forward), module)


def _dense_head(model: nn.Module) -> str:
    """Put an fp32 LM head (left dense) on ptp's GEMV; returns what to add to the log line."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.weight.dtype != torch.float32 or head.weight.device.type != "cpu":
        return ""
    name = next(n for n, m in model.named_modules() if m is head)
    _replace(model, name, DenseLinear(head))
    return f"; the dense fp32 head {name} runs on ptp's GEMV"


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def load_sparse(folder: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """A ptp directory as a model whose pruned linears are ``SparseLinear``.

    Compressed (``--format compressed``): the model skeleton is built with its parameters on the
    meta device; every compressed weight is packed from its stored values and mask, CHUNK_ROWS
    rows at a time; the other tensors are assigned as loaded. Peak memory stays near the packed
    size. A dense directory is loaded dense, then ``sparsify``'d. ``dtype`` converts everything
    (packed values included) after loading.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"model path not found: {folder}")
    if not any(folder.glob(f"*{COMPRESSED_SUFFIX}")):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto").eval()
        sparsify(model)
        return model
    from safetensors import safe_open

    config = AutoConfig.from_pretrained(folder)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config)
    state, compressed = {}, []
    for file in sorted(folder.glob(f"*{COMPRESSED_SUFFIX}")):  # dense tensors first: a bias may sit in another file
        with safe_open(str(file), framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys() if not k.endswith((":values", ":mask"))})
            index = json.loads((f.metadata() or {}).get("ptp_compressed", "{}"))
            compressed += [(file, key, info) for key, info in index.items()]
    for file, key, info in compressed:
        # One opening per layer: the file's mapped pages are released after each, so at most
        # one layer's stored bytes are resident next to the packed model.
        with safe_open(str(file), framework="pt") as f:
            values, bits = f.get_tensor(f"{key}:values"), f.get_tensor(f"{key}:mask")
        if len(info["shape"]) == 3:  # a fused expert stack, stored whole as [E * out, in] rows
            module_name, _, param_name = key.rpartition(".")
            experts = pack_compressed_experts(values, bits, info["shape"])
            del values, bits
            _put_stack(model.get_submodule(module_name), param_name,
                       SparseExperts(experts, bool(info.get("transposed")), name=key))
            continue
        name = key.removesuffix(".weight")
        packed = pack_compressed(values, bits, info["shape"])
        del values, bits
        _replace(model, name, SparseLinear(packed, state.pop(f"{name}.bias", None), name=name))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if unexpected or left:
        raise ConfigError(f"{folder}: checkpoint does not fit the model: unexpected {unexpected[:5]}, "
                          f"not loaded {left[:5]}")
    model = model.eval()
    model = model.to(dtype) if dtype is not None else model
    log.info("sparse runtime: %d pruned weights loaded packed from %s%s", len(compressed), folder, _dense_head(model))
    return model


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter created inside goes to the meta device (no storage); buffers — rotary
    frequencies and the like, computed in ``__init__`` — stay real."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original
