"""The kernels behind ``SparseLinear``: which one runs, and the calls into the C library.

ISA: ``$PTP_SPARSE_ISA`` = ``auto`` (default: the best this CPU supports, avx512 > avx2 >
scalar), ``avx512``, ``avx2``, ``scalar`` (the reference), or ``torch`` (no C library: unpack
in torch and use a dense matmul — the fallback, always correct, slow). The choice is logged once.
If the library cannot be built (no compiler, a compile error) the fallback is used, with one
warning that says why.

Two paths, both giving fp32 ``y [T, out] = x [T, in] @ W.T (+ bias)``:
- small batch (T <= ``SMALL_BATCH``): the sparse kernel streams the packed weight once and
  reuses every expanded weight vector for all T tokens — decode is bound by memory bandwidth,
  and the packed weight is 0.57× (bf16) / 0.54× (fp32) the bytes of the dense one at 50%;
- prefill (larger T, compute-bound): blocks of BLOCK_ROWS rows are unpacked into an fp32
  scratch buffer (transposed, [in, rows]) and multiplied by torch's dense GEMM.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

import torch

from ..config import ConfigError
from .build import BuildError, library_path
from .format import PackedWeight, layout

log = logging.getLogger("ptp.sparse")

ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}
VTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
SMALL_BATCH = 16
BLOCK_ROWS = 256  # prefill: rows unpacked per GEMM (a multiple of 16)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded C library, or None (with one warning) when it cannot be built or loaded."""
    try:
        lib = ctypes.CDLL(str(library_path()))
    except (BuildError, OSError) as err:
        log.warning("sparse runtime: C kernels unavailable (%s); falling back to torch (unpack + dense "
                    "matmul per call: correct, but slower than dense)", err)
        return None
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.ptp_sparse_supported.argtypes = [i32]
    lib.ptp_sparse_matmul.argtypes = [i32, i32, i32, ptr, ptr, ptr, i64, i64, i64, ptr, i64, ptr, ptr, i32]
    lib.ptp_sparse_unpack.argtypes = [i32, i32, i32, ptr, ptr, ptr, i64, i64, i64, i64, i64, ptr, i64, i32]
    lib.ptp_sparse_set_spin_us.argtypes = [i32]
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
        isa = next((name for name in ("avx512", "avx2", "scalar") if supported(name)), "torch")
    elif want != "torch" and not supported(want):
        raise ConfigError(f"PTP_SPARSE_ISA={want}: this CPU or build cannot run it "
                          f"(supported: {', '.join(n for n in ISAS if supported(n)) or 'none; torch only'})")
    else:
        isa = want
    log.info("sparse runtime: %s kernels%s", isa, "" if want == "auto" else " (PTP_SPARSE_ISA)")
    return isa


def matmul(packed: PackedWeight, x: torch.Tensor, bias: torch.Tensor | None = None,
           isa: str | None = None, threads: int | None = None) -> torch.Tensor:
    """x [T, in] -> fp32 [T, out] = x @ W.T + bias, W the packed weight [out, in].
    x and bias are converted to contiguous fp32."""
    isa = isa or selected_isa()
    out, inp = packed.shape
    x = x.to(torch.float32).contiguous()
    bias = None if bias is None else bias.to(torch.float32).contiguous()
    if isa == "torch":
        from .format import unpack

        return torch.nn.functional.linear(x, unpack(packed).to(torch.float32), bias)
    threads = threads or torch.get_num_threads()
    if x.shape[0] > SMALL_BATCH:
        return _prefill(packed, x, bias, isa, threads)
    y = torch.empty(x.shape[0], out, dtype=torch.float32)
    _check(library().ptp_sparse_matmul(
        ISAS[isa], VTYPES[packed.dtype], 0, packed.masks.data_ptr(), packed.offsets.data_ptr(),
        packed.values.data_ptr(), out, inp, packed.masks.shape[1], x.data_ptr(), x.shape[0], y.data_ptr(),
        0 if bias is None else bias.data_ptr(), threads))
    return y


def _prefill(packed, x, bias, isa, threads) -> torch.Tensor:
    out, inp = packed.shape
    tiles = packed.masks.shape[0]
    step = BLOCK_ROWS // 16
    y = torch.empty(x.shape[0], out, dtype=torch.float32)
    scratch = torch.empty(inp, BLOCK_ROWS, dtype=torch.float32)
    for t0 in range(0, tiles, step):
        t1 = min(t0 + step, tiles)
        rows = min(16 * t1, out) - 16 * t0
        _check(library().ptp_sparse_unpack(
            ISAS[isa], VTYPES[packed.dtype], 0, packed.masks.data_ptr(), packed.offsets.data_ptr(),
            packed.values.data_ptr(), out, inp, packed.masks.shape[1], t0, t1, scratch.data_ptr(), BLOCK_ROWS,
            threads))
        block = y[:, 16 * t0:16 * t0 + rows]
        if bias is None:
            block.copy_(x @ scratch[:, :rows])
        else:
            block.copy_(torch.addmm(bias[16 * t0:16 * t0 + rows], x, scratch[:, :rows]))
    return y


def unpack_block(packed: PackedWeight, t0: int, t1: int, isa: str | None = None) -> torch.Tensor:
    """The transposed fp32 rows of tiles [t0, t1): [in, 16*(t1 - t0)] (for tests and prefill)."""
    isa = isa or selected_isa()
    out, inp = packed.shape
    dst = torch.empty(inp, 16 * (t1 - t0), dtype=torch.float32)
    _check(library().ptp_sparse_unpack(
        ISAS[isa], VTYPES[packed.dtype], 0, packed.masks.data_ptr(), packed.offsets.data_ptr(),
        packed.values.data_ptr(), out, inp, packed.masks.shape[1], t0, t1, dst.data_ptr(), dst.shape[1], 1))
    return dst


def dense_bf16_matmul(values: torch.Tensor, shape: tuple[int, int], x: torch.Tensor,
                      isa: str | None = None, threads: int | None = None) -> torch.Tensor:
    """ptp's dense bf16 kernel — the sparse kernel's loop with every mask bit set — for the
    honest bf16 baseline of ``ptp bench --kernels``. values: ``format.pack_dense(W)``."""
    isa = isa or selected_isa()
    out, inp = shape
    words = layout(out, inp)[1]
    x = x.to(torch.float32).contiguous()
    y = torch.empty(x.shape[0], out, dtype=torch.float32)
    _check(library().ptp_sparse_matmul(ISAS[isa], VTYPES[torch.bfloat16], 1, None, None, values.data_ptr(), out, inp,
                                       words, x.data_ptr(), x.shape[0], y.data_ptr(), None, threads or torch.get_num_threads()))
    return y


def _check(rc: int) -> None:
    if rc != 0:
        raise RuntimeError(f"sparse kernel refused the call (code {rc}): ISA not supported by this CPU")
