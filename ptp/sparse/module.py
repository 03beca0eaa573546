"""``SparseLinear``: a drop-in ``nn.Linear`` whose weight lives in the packed format; and
``DenseLinear``: a kept-dense fp32 ``nn.Linear`` (the LM head) on ptp's own GEMV."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import kernels
from .format import PackedWeight, pack, unpack, validate


class SparseLinear(nn.Module):
    """y = x @ W.T + b with W [out, in] packed (see ``ptp.sparse.format``).

    Input ``x [..., in]`` of any float dtype and any leading shape; the kernels compute in fp32
    and the output ``[..., out]`` comes back in ``x``'s dtype (as ``nn.Linear`` would give for
    weights of that dtype). The packed tensors are buffers (``masks``, ``offsets``,
    ``values``), so they count in ``model.buffers()`` and in the state dict; the module has no
    ``weight`` parameter — ``dense_weight()`` unpacks one on demand.

    >>> layer = SparseLinear.from_linear(nn.Linear(64, 32))   # or from a pruned one
    >>> layer(torch.randn(2, 5, 64)).shape
    torch.Size([2, 5, 32])
    """

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None, name: str = "SparseLinear"):
        super().__init__()
        validate(packed, name=name)
        self.out_features, self.in_features = packed.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            from ..config import ConfigError

            raise ConfigError(f"{name}: bias {tuple(bias.shape)} does not match {self.out_features} outputs")
        self.register_buffer("masks", packed.masks)
        self.register_buffer("offsets", packed.offsets)
        self.register_buffer("values", packed.values)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Module, transposed: bool = False, name: str = "SparseLinear") -> "SparseLinear":
        """Pack an ``nn.Linear`` (or, ``transposed=True``, a GPT-2 ``Conv1D`` whose weight is
        [in, out]); the kept entries are its nonzero ones."""
        weight = linear.weight.detach()
        return cls(pack(weight.T if transposed else weight), linear.bias, name=name)

    @property
    def packed(self) -> PackedWeight:
        # Built once and reused while the buffers are the same tensors (decode calls every layer
        # once per token, and building it costs as much as a small layer's kernel); a buffer that
        # was replaced (``model.to``, assignment) gives a new one.
        buffers, cached = self._buffers, self.__dict__.get("_packed")
        if (cached is None or cached.masks is not buffers["masks"] or cached.offsets is not buffers["offsets"]
                or cached.values is not buffers["values"]):
            cached = PackedWeight((self.out_features, self.in_features), buffers["masks"], buffers["offsets"],
                                  buffers["values"])
            self.__dict__["_packed"] = cached
        return cached

    def dense_weight(self) -> torch.Tensor:
        """The dense [out, in] weight (zeros where pruned), in the values' dtype."""
        return unpack(self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call = self.__dict__.get("_call")
        if (call is not None and x.dtype is call.dtype and x.is_cpu and x.is_contiguous()
                and x.numel() <= call.max_numel and call.bound_to(self.packed, self._parameters.get("bias"))):
            return call(x)
        if x.device.type != "cpu":
            raise RuntimeError("SparseLinear runs on CPU only (the packed kernels are CPU kernels)")
        self._bind_small_batch_call()
        y = kernels.matmul(self.packed, x.reshape(-1, self.in_features), self.bias)
        return (y if y.dtype == x.dtype else y.to(x.dtype)).view(*x.shape[:-1], self.out_features)

    def _bind_small_batch_call(self) -> None:
        """Binds the decode fast path of ``forward`` (once per set of buffers and ISA choice)."""
        packed, call = self.packed, self.__dict__.get("_call")
        if call is not None and call.bound_to(packed, self.bias):
            return
        isa = kernels.selected_isa()
        if (isa == "torch" or packed.dtype not in (torch.float32, torch.bfloat16)
                or any(t.requires_grad for t in (packed.values, *([] if self.bias is None else [self.bias])))):
            self.__dict__.pop("_call", None)
            return
        self.__dict__["_call"] = kernels.SmallBatchCall(packed, self.bias, isa)

    def __getstate__(self):
        # The bound call holds raw data pointers of these buffers: a copy (deepcopy, pickle)
        # binds its own.
        return {k: v for k, v in super().__getstate__().items() if k != "_call"}

    def extra_repr(self) -> str:
        nnz = int(self.offsets[-1])
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"values={str(self.values.dtype).replace('torch.', '')}, "
                f"sparsity={1 - nnz / (self.in_features * self.out_features):.3f}")


class DenseLinear(nn.Module):
    """An fp32 ``nn.Linear`` that a pruned model keeps dense (the LM head), run by ptp's row-major
    GEMV for up to ``kernels.SMALL_BATCH`` tokens — decode, where torch's fp32 GEMV reads the
    weight at about half the bandwidth the sparse kernels reach — and by ``F.linear`` otherwise
    (prefill, gradients, other devices). It holds the linear's own ``weight`` and ``bias``
    parameters, not copies, so a head tied to the embeddings stays tied and costs no memory.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // self.in_features
        if (tokens > kernels.SMALL_BATCH or x.device.type != "cpu" or self.weight.dtype != torch.float32
                or not self.weight.is_contiguous() or (torch.is_grad_enabled() and self.weight.requires_grad)
                or kernels.selected_isa() == "torch"):
            return F.linear(x, self.weight, self.bias)
        y = kernels.dense_linear(self.weight, x.reshape(-1, self.in_features), self.bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, dense fp32"


class SparseExperts(nn.Module):
    """A fused expert stack — transformers 5's ``experts.gate_up_proj`` [E, out, in] (or, with
    ``transposed``, gpt-oss's [E, in, out]) — packed expert by expert, standing in the experts
    module where the parameter was. The module's own per-expert loop runs unchanged: ``stack[e]``
    is expert e's weight as a tensor-like that ``F.linear(x, stack[e])`` (or ``x @ stack[e]``
    when transposed) multiplies on the sparse kernels; x [..., in] -> [..., out], in x's dtype.

    Buffers: ``masks`` int32 [E, tiles, words] and ``offsets`` int64 [E, n] (the same layout for
    every expert), ``values`` every expert's packed values back to back, ``starts`` int64 [E + 1]
    where each expert's begin.
    """

    def __init__(self, packed: list[PackedWeight], transposed: bool = False, name: str = "SparseExperts"):
        super().__init__()
        if not packed or len({p.shape for p in packed}) != 1 or len({p.dtype for p in packed}) != 1:
            from ..config import ConfigError

            raise ConfigError(f"{name}: an expert stack needs experts of one shape and dtype")
        for e, p in enumerate(packed):
            validate(p, name=f"{name}[{e}]")
        self.num_experts, self.transposed = len(packed), transposed
        self.out_features, self.in_features = packed[0].shape
        self.register_buffer("masks", torch.stack([p.masks for p in packed]))
        self.register_buffer("offsets", torch.stack([p.offsets for p in packed]))
        self.register_buffer("values", torch.cat([p.values for p in packed]))
        sizes = torch.tensor([p.values.numel() for p in packed])
        self.register_buffer("starts", torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)]))

    @classmethod
    def from_stack(cls, stack: torch.Tensor, transposed: bool = False, name: str = "SparseExperts") -> "SparseExperts":
        """Pack a fused [E, out, in] parameter ([E, in, out] with ``transposed``); kept = nonzero."""
        stack = stack.detach()
        return cls([pack(w.T if transposed else w) for w in stack], transposed, name=name)

    def expert(self, index: int) -> PackedWeight:
        """Expert ``index``'s packed weight [out, in] (views of the buffers)."""
        start, stop = int(self.starts[index]), int(self.starts[index + 1])
        return PackedWeight((self.out_features, self.in_features), self.masks[index], self.offsets[index],
                            self.values[start:stop])

    def __getitem__(self, index) -> "PackedExpert":
        index = int(index)
        if not 0 <= index < self.num_experts:
            raise IndexError(f"expert {index} of {self.num_experts}")
        return PackedExpert(self.expert(index), self.transposed)

    def dense_weight(self) -> torch.Tensor:
        """The stack as it was stored: [E, out, in], or [E, in, out] when transposed."""
        stack = torch.stack([unpack(self.expert(e)) for e in range(self.num_experts)])
        return stack.transpose(1, 2) if self.transposed else stack

    def extra_repr(self) -> str:
        nnz = sum(int(self.offsets[e, -1]) for e in range(self.num_experts))
        return (f"experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
                f"transposed={self.transposed}, values={str(self.values.dtype).replace('torch.', '')}, "
                f"sparsity={1 - nnz / (self.num_experts * self.in_features * self.out_features):.3f}")


# what ``x @ w`` and ``torch.matmul(x, w)`` reach __torch_function__ as
_MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch._C.TensorBase.matmul)


class PackedExpert:
    """One expert's packed weight as the experts loop sees it: torch calls ``__torch_function__``
    for ``F.linear(x, w[, b])`` ([out, in] stacks) and ``x @ w`` ([in, out] stacks); anything
    else the loop might do with a weight is refused by name rather than computed wrongly."""

    def __init__(self, packed: PackedWeight, transposed: bool):
        self.packed, self.transposed = packed, transposed

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and isinstance(args[1], cls) and not args[1].transposed:
            x, w, bias = args[0], args[1], args[2] if len(args) > 2 else kwargs.get("bias")
            return w._apply_to(x, bias)
        if (func in _MATMULS and len(args) == 2 and isinstance(args[1], cls)
                and args[1].transposed and isinstance(args[0], torch.Tensor)):
            return args[1]._apply_to(args[0], None)
        name = getattr(func, "__name__", str(func))
        raise TypeError(f"a packed expert weight supports F.linear (or x @ w for [E, in, out] stacks), not {name}: "
                        "run this model on the dense runtime")

    def _apply_to(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError("packed experts run on CPU only (the packed kernels are CPU kernels)")
        out, inp = self.packed.shape
        y = kernels.matmul(self.packed, x.reshape(-1, inp), bias)
        return (y if y.dtype == x.dtype else y.to(x.dtype)).view(*x.shape[:-1], out)
