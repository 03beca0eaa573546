"""The kernels behind ``SparseLinear``: which one runs, and the calls into the C library.

ISA: ``$PTP_SPARSE_ISA`` = ``auto`` (default: the best this CPU supports, amx > avx512 > avx2
> scalar), ``amx`` (the avx512 kernels, and AMX tiles for bf16 values with bf16 activations at
2 or more tokens), ``avx512``, ``avx2``, ``scalar`` (the reference), or ``torch`` (no C library:
unpack in torch and use a dense matmul — the fallback, always correct, slow). The choice is logged once.
If the library cannot be built (no compiler, a compile error) the fallback is used, with one
warning that says why.

Two paths, both giving ``y [T, out] = x [T, in] @ W.T (+ bias)``:
- small batch (T <= ``SMALL_BATCH``): the sparse kernel streams the packed weight once and
  reuses every expanded weight vector for all T tokens — decode is bound by memory bandwidth,
  and the packed weight is 0.57× (bf16) / 0.54× (fp32) the bytes of the dense one at 50%.
  bf16 activations with bf16 values use ``vdpbf16ps`` where the CPU has AVX512_BF16 (one
  instruction per word and token); otherwise activations are fp32 (bf16 ones widened exactly);
- prefill (larger T, compute-bound): up to SCRATCH_ELEMS weights at a time are unpacked into
  dense rows in a reused scratch buffer and multiplied by torch's linear — the call a dense
  model of that dtype makes, on the same weights: bf16 (x bf16, values bf16) or fp32. With
  ``amx``, bf16 x bf16 prefill is one C call instead: panels of the weight expanded into L2 and
  multiplied on AMX tiles (no dense scratch, no re-layout by oneDNN).

The output is bf16 when x is bf16 and the values are bf16 (as ``nn.Linear`` in bf16), else fp32.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading

import torch

from ..config import ConfigError
from .build import BuildError, library_path
from .format import PackedWeight, layout

log = logging.getLogger("ptp.sparse")

ISAS = {"scalar": 0, "avx2": 1, "avx512": 2, "amx": 4}
AVX512_BF16 = 3  # not a kernel variant: the CPU feature that enables avx512's vdpbf16ps path
VTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
SMALL_BATCH = 16
# Prefill: weights unpacked per GEMM. One GEMM per layer up to 16M weights (64 MB of fp32
# scratch): measured faster than 256-row blocks, which re-read x once per block.
SCRATCH_ELEMS = 1 << 24


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded C library, or None (with one warning) when it cannot be built or loaded."""
    try:
        lib = ctypes.CDLL(str(library_path()))
    except (BuildError, OSError) as err:
        log.warning("sparse runtime: C kernels unavailable (%s); falling back to torch (unpack + dense "
                    "matmul per call: correct, but slower than dense)", err)
        return None
    return bind(lib)


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` with the argument types of the C ABI set (scripts/ab_kernels.py loads two builds)."""
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.ptp_sparse_supported.argtypes = [i32]
    lib.ptp_sparse_matmul.argtypes = [i32, i32, i32, ptr, ptr, ptr, i64, i64, i64, ptr, i32, i64, ptr, i32, ptr, i32]
    lib.ptp_sparse_unpack.argtypes = [i32, i32, i32, ptr, ptr, ptr, i64, i64, i64, i64, i64, ptr, i32, i64, i32]
    lib.ptp_dense_matmul.argtypes = [i32, ptr, i64, i64, ptr, i64, ptr, ptr, i32]
    return lib


def supported(isa: str) -> bool:
    lib = library()
    return lib is not None and bool(lib.ptp_sparse_supported(ISAS[isa]))


def selected_isa() -> str:
    """The kernel variant to run: ``$PTP_SPARSE_ISA`` or the best supported. Raises ConfigError
    for an unknown name or a variant this CPU cannot run."""
    return _selected(os.environ.get("PTP_SPARSE_ISA", "auto").strip().lower() or "auto")


@functools.cache
def _selected(want: str) -> str:
    if want not in (*ISAS, "torch", "auto"):
        raise ConfigError(f"PTP_SPARSE_ISA={want!r}: choose auto, {', '.join(ISAS)} or torch")
    if want == "auto":
        isa = next((name for name in ("amx", "avx512", "avx2", "scalar") if supported(name)), "torch")
    elif want != "torch" and not supported(want):
        raise ConfigError(f"PTP_SPARSE_ISA={want}: this CPU or build cannot run it "
                          f"(supported: {', '.join(n for n in ISAS if supported(n)) or 'none; torch only'})")
    else:
        isa = want
    bf16 = isa in ("avx512", "amx") and bool(library().ptp_sparse_supported(AVX512_BF16))
    log.info("sparse runtime: %s kernels%s%s", isa, " with AVX512_BF16 for bf16 activations" if bf16 else "",
             "" if want == "auto" else " (PTP_SPARSE_ISA)")
    return isa


def matmul(packed: PackedWeight, x: torch.Tensor, bias: torch.Tensor | None = None,
           isa: str | None = None, threads: int | None = None) -> torch.Tensor:
    """x [T, in] -> y [T, out] = x @ W.T + bias, W the packed weight [out, in]; y is bf16 for
    bf16 x and bf16 values, else fp32 (x and bias are converted to contiguous fp32 unless so)."""
    isa = isa or selected_isa()
    out, inp = packed.shape
    bf16 = x.dtype == torch.bfloat16 and packed.values.dtype == torch.bfloat16
    if not (bf16 or x.dtype == torch.float32):
        x = x.to(torch.float32)
    if not x.is_contiguous():
        x = x.contiguous()
    if isa == "torch":
        from .format import unpack

        weight = unpack(packed) if bf16 else unpack(packed).to(torch.float32)
        return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(weight.dtype))
    threads = threads or torch.get_num_threads()
    if x.shape[0] > SMALL_BATCH and not (bf16 and isa == "amx"):  # AMX: its own prefill kernel
        return _prefill(packed, x, bias, isa, threads)
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.to(torch.float32).contiguous()
    y = torch.empty(x.shape[0], out, dtype=torch.bfloat16 if bf16 else torch.float32)
    _check(library().ptp_sparse_matmul(
        ISAS[isa], VTYPES[packed.dtype], 0, packed.masks.data_ptr(), packed.offsets.data_ptr(),
        packed.values.data_ptr(), out, inp, packed.masks.shape[1], x.data_ptr(), int(bf16), x.shape[0],
        y.data_ptr(), int(bf16), 0 if bias is None else bias.data_ptr(), threads))
    return y


class SmallBatchCall:
    """``matmul``'s C call for up to ``SMALL_BATCH`` tokens of x in the values' dtype (fp32 or
    bf16), with its constant arguments bound once. Decode calls every layer once per token, and
    ``matmul``'s argument handling cost as much as a small layer's kernel: on SmolLM2's 192 x 576
    at 2:4, 11 µs in C and 11 µs more through ``SparseLinear``. Valid while ``packed`` and the
    bias are the objects it was built from and ``$PTP_SPARSE_ISA`` is unchanged (``bound_to``;
    the caller checks).
    """

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None, isa: str):
        out, inp = packed.shape
        self.packed, self.bias, self.dtype, self.out, self._inp = packed, bias, packed.dtype, out, inp
        self.isa_env, self.max_numel = os.environ.get("PTP_SPARSE_ISA"), SMALL_BATCH * inp
        self._bias32 = None if bias is None else bias.detach().to(torch.float32).contiguous()  # kept alive
        self._head = (ISAS[isa], VTYPES[packed.dtype], 0, packed.masks.data_ptr(), packed.offsets.data_ptr(),
                      packed.values.data_ptr(), out, inp, packed.masks.shape[1])
        self._bf16 = int(packed.dtype == torch.bfloat16)
        self._bias_ptr = 0 if bias is None else self._bias32.data_ptr()

    def bound_to(self, packed: PackedWeight, bias: torch.Tensor | None) -> bool:
        return self.packed is packed and self.bias is bias and self.isa_env == os.environ.get("PTP_SPARSE_ISA")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] contiguous, CPU, of the values' dtype, at most SMALL_BATCH tokens ->
        y [..., out], same dtype."""
        y = x.new_empty(x.shape[:-1] + (self.out,))  # x has the values' dtype
        rc = library().ptp_sparse_matmul(*self._head, x.data_ptr(), self._bf16, x.numel() // self._inp, y.data_ptr(),
                                         self._bf16, self._bias_ptr, torch.get_num_threads())
        if rc:
            _check(rc)
        return y


_scratch = threading.local()


def _scratch_buffer(elems: int, dtype: torch.dtype) -> torch.Tensor:
    """A reused buffer of at least ``elems`` values (per thread and dtype): prefill allocates once."""
    key = f"buf_{dtype}".replace(".", "_")
    buf = getattr(_scratch, key, None)
    if buf is None or buf.numel() < elems:
        buf = torch.empty(elems, dtype=dtype)
        setattr(_scratch, key, buf)
    return buf


def _prefill(packed, x, bias, isa, threads) -> torch.Tensor:
    """Unpack up to SCRATCH_ELEMS weights at a time into dense rows and run torch's linear on
    them — the call a dense model makes, on the same weights: bf16 for bf16 x (except on avx2,
    which has no bf16 unpack and no fast bf16 GEMM), else fp32."""
    out, inp = packed.shape
    tiles = packed.masks.shape[0]
    dtype = x.dtype
    bf16 = dtype == torch.bfloat16 and isa != "avx2"
    x = x if bf16 else x.to(torch.float32)
    step = max(1, SCRATCH_ELEMS // (16 * inp))  # tiles per GEMM
    rows = 16 * min(step, tiles)
    scratch = _scratch_buffer(rows * inp, x.dtype)[:rows * inp].view(rows, inp)
    bias = None if bias is None else bias.to(x.dtype)
    blocks = []
    for t0 in range(0, tiles, step):
        t1 = min(t0 + step, tiles)
        n = min(16 * t1, out) - 16 * t0
        _check(library().ptp_sparse_unpack(
            ISAS[isa], VTYPES[packed.dtype], 0, packed.masks.data_ptr(), packed.offsets.data_ptr(),
            packed.values.data_ptr(), out, inp, packed.masks.shape[1], t0, t1, scratch.data_ptr(), int(bf16), inp,
            threads))
        blocks.append(torch.nn.functional.linear(x, scratch[:n], None if bias is None else bias[16 * t0:16 * t0 + n]))
    return (blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)).to(dtype)


def unpack_block(packed: PackedWeight, t0: int, t1: int, isa: str | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense rows of tiles [t0, t1): [16*(t1 - t0), in] in fp32, or bf16 (bf16 values;
    scalar and avx512 only) — for tests and prefill."""
    isa = isa or selected_isa()
    out, inp = packed.shape
    dst = torch.empty(16 * (t1 - t0), inp, dtype=dtype)
    _check(library().ptp_sparse_unpack(
        ISAS[isa], VTYPES[packed.dtype], 0, packed.masks.data_ptr(), packed.offsets.data_ptr(),
        packed.values.data_ptr(), out, inp, packed.masks.shape[1], t0, t1, dst.data_ptr(),
        int(dtype == torch.bfloat16), inp, 1))
    return dst


def dense_bf16_matmul(values: torch.Tensor, shape: tuple[int, int], x: torch.Tensor,
                      isa: str | None = None, threads: int | None = None) -> torch.Tensor:
    """ptp's dense bf16 kernel — the sparse kernel's loop with every mask bit set (for bf16 x,
    the vdpbf16ps loop where the CPU has it) — for the honest bf16 baseline of ``ptp bench
    --kernels``. values: ``format.pack_dense(W)``. Returns fp32."""
    isa = isa or selected_isa()
    out, inp = shape
    words = layout(out, inp)[1]
    bf16 = x.dtype == torch.bfloat16
    x = x.contiguous() if bf16 else x.to(torch.float32).contiguous()
    y = torch.empty(x.shape[0], out, dtype=torch.float32)
    _check(library().ptp_sparse_matmul(ISAS[isa], VTYPES[torch.bfloat16], 1, None, None, values.data_ptr(), out, inp,
                                       words, x.data_ptr(), int(bf16), x.shape[0], y.data_ptr(), 0, None,
                                       threads or torch.get_num_threads()))
    return y


def dense_linear(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None,
                 isa: str | None = None, threads: int | None = None) -> torch.Tensor:
    """x [T, in] -> y [T, out] = x @ W.T + bias for a dense row-major fp32 weight [out, in] — the
    tensor an ``nn.Linear`` holds, read in place — by ptp's GEMV (for the layers a pruned model
    keeps dense, e.g. the LM head: torch's fp32 GEMV reads a weight well below the bandwidth the
    sparse kernels reach). Returns fp32; needs the C kernels (not ``isa="torch"``)."""
    isa = isa or selected_isa()
    if isa == "torch" or weight.dtype != torch.float32 or not weight.is_contiguous():
        raise ValueError("dense_linear runs contiguous fp32 weights on the C kernels")
    out, inp = weight.shape
    x = x.to(torch.float32).contiguous()
    bias = None if bias is None else bias.to(torch.float32).contiguous()
    y = torch.empty(x.shape[0], out, dtype=torch.float32)
    _check(library().ptp_dense_matmul(ISAS[isa], weight.data_ptr(), out, inp, x.data_ptr(), x.shape[0], y.data_ptr(),
                                      0 if bias is None else bias.data_ptr(), threads or torch.get_num_threads()))
    return y


def _check(rc: int) -> None:
    if rc == -2:
        raise RuntimeError("sparse kernel refused the call: a bf16 block needs bf16 values and the scalar or avx512 kernels")
    if rc != 0:
        raise RuntimeError(f"sparse kernel refused the call (code {rc}): ISA not supported by this CPU")
