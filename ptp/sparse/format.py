"""The packed sparse weight format: pure functions ``pack`` / ``unpack``, bit-exact round trip.

A weight ``W [out, in]`` (any mask: unstructured at any ratio, N:M, or none) is cut into
**row tiles** of ``ROWS = 16`` output rows; each row tile is walked in **column pairs** of
``COLS = 2`` inputs. One 32-bit mask word covers one (row tile, column pair) cell — 16 rows × 2
inputs, the SparAMX tile — and its kept values are stored back to back:

    mask word, bit b = 2*r + c   (r in 0..15: row in the tile, c in 0..1: column in the pair)
        set  <=>  W[16*t + r, 2*p + c] is stored
    values of the cell, in increasing bit order (row 0 col 0, row 0 col 1, row 1 col 0, ...)

so the kernel loads the cell's values with one plain vector load and expands them under the
mask word into the 16×2 register layout (AVX-512: ``vpexpandw`` of 32 bf16; AVX2: one byte of
the mask = 4 rows × 2 inputs = one 8-lane register, expanded with a ``vpshufb`` table).

The tensors of a ``PackedWeight`` (all contiguous, little-endian, CPU):

    masks    int32 [tiles, words]            tiles = ceil(out/16); words = ceil(ceil(in/2)/GROUP)*GROUP
                                             (bit pattern of the uint32 mask word; rows past
                                             ``out`` and columns past ``in`` are 0 bits)
    offsets  int64 [tiles*words/GROUP + 1]   index into ``values`` of the first value of every
                                             group of GROUP = 16 consecutive words of a tile,
                                             then the total count: a thread or a vector lane
                                             starts any group without a popcount chain
    values   bf16|fp16|fp32 [nnz + PAD]      the kept values, tile by tile, word by word, in bit
                                             order; PAD = 32 trailing zeros so that a full
                                             32-value load at the last word stays in bounds

Bytes per weight at sparsity s: (1-s)·itemsize + 1/8 (+ 1/64 for the offsets): 0.57× of dense
bf16 at 50%, 0.54× of fp32. A value is "kept" where the mask says so. Packing a dense tensor
keeps its nonzero entries (``weight != 0``: NaN and inf are kept, both signed zeros dropped — a
pruned weight's zeros are often -0.0, and storing them would cost a value each); the round
trip ``unpack(pack(W))`` is then bit-exact except that a -0.0 comes back +0.0. With an explicit
mask (``pack(W, keep)``, ``pack_compressed``) it is bit-exact for every entry, and the mask may
keep zeros (an N:M checkpoint stores exactly N values per group, some of which may be 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import ConfigError

ROWS = 16
COLS = 2
GROUP = 16
PAD = 32
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Rows packed per step: bounds the transient [chunk, in] copies made while packing.
CHUNK_ROWS = 256
_BIT = torch.arange(ROWS * COLS, dtype=torch.int64)


@dataclass
class PackedWeight:
    """A weight [out, in] in the packed layout above (see the module docstring)."""

    shape: tuple[int, int]
    masks: torch.Tensor
    offsets: torch.Tensor
    values: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nnz(self) -> int:
        return int(self.offsets[-1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.masks, self.offsets, self.values))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"masks": self.masks, "offsets": self.offsets, "values": self.values}


def layout(out: int, inp: int) -> tuple[int, int]:
    """(tiles, words per tile) for a weight [out, in]."""
    pairs = -(-inp // COLS)
    return -(-out // ROWS), -(-pairs // GROUP) * GROUP


def pack(weight: torch.Tensor, keep: torch.Tensor | None = None) -> PackedWeight:
    """Pack ``weight [out, in]`` (fp32/bf16/fp16) under ``keep [out, in]`` (bool; default:
    ``weight != 0``).

    >>> p = pack(torch.tensor([[1.0, 0.0, 2.0]]))
    >>> p.nnz, int(p.masks[0, 0]), int(p.masks[0, 1]), p.values[:2].tolist()   # col 2: word 1, bit 0
    (2, 1, 1, [1.0, 2.0])
    """
    if weight.dim() != 2 or weight.dtype not in DTYPES:
        raise ConfigError(f"pack needs a 2-D float32/bfloat16/float16 weight, got {tuple(weight.shape)} {weight.dtype}")
    weight = weight.detach().cpu()
    if keep is None:
        keep = weight != 0
    elif keep.shape != weight.shape:
        raise ConfigError(f"mask shape {tuple(keep.shape)} does not match weight {tuple(weight.shape)}")
    return _pack_rows(weight.shape, weight.dtype, int(keep.sum()),
                      ((weight[r:r + CHUNK_ROWS], keep[r:r + CHUNK_ROWS]) for r in range(0, weight.shape[0], CHUNK_ROWS)))


def pack_compressed(values: torch.Tensor, bits: torch.Tensor, shape: tuple[int, int]) -> PackedWeight:
    """Pack straight from ptp's ``--format compressed`` encoding (``ptp.io.compress_weight``:
    kept values in row-major order, and a row-major bitmask packed 8 per byte), CHUNK_ROWS rows
    at a time, so the dense [out, in] weight never exists."""
    out, inp = (int(s) for s in shape)
    bits_np = bits.numpy()
    if bits_np.size != -(-out * inp // 8):
        raise ConfigError(f"compressed mask holds {bits_np.size} bytes, a [{out}, {inp}] weight needs {-(-out * inp // 8)}")
    values = values.reshape(-1)
    keep_all = np.unpackbits(bits_np, count=out * inp).reshape(out, inp)  # 1 byte/weight, uint8
    if int(keep_all.sum(dtype=np.int64)) != values.numel():
        raise ConfigError(f"compressed weight has {values.numel()} values but its mask keeps "
                          f"{int(keep_all.sum(dtype=np.int64))}")
    return _pack_keep(values, keep_all)


def pack_compressed_experts(values: torch.Tensor, bits: torch.Tensor, shape: tuple[int, int, int]) -> list[PackedWeight]:
    """``pack_compressed`` for a fused expert stack stored whole ([E * out, in] rows, as
    ``ptp.io.compress_dir`` writes it): one PackedWeight per expert, each unpacking only its own
    bits, so at most one expert's mask is expanded at a time."""
    experts, out, inp = (int(s) for s in shape)
    bits_np, values = bits.numpy(), values.reshape(-1)
    if bits_np.size != -(-experts * out * inp // 8):
        raise ConfigError(f"compressed mask holds {bits_np.size} bytes, a [{experts}, {out}, {inp}] stack needs "
                          f"{-(-experts * out * inp // 8)}")
    packed, at = [], 0
    for e in range(experts):
        first, last = e * out * inp, (e + 1) * out * inp  # this expert's bits, from any bit of a byte
        window = np.unpackbits(bits_np[first // 8:-(-last // 8)])
        keep = window[first % 8:first % 8 + out * inp].reshape(out, inp)
        kept = int(keep.sum(dtype=np.int64))
        if at + kept > values.numel():
            raise ConfigError(f"compressed stack has {values.numel()} values but its mask keeps more")
        packed.append(_pack_keep(values[at:at + kept], keep))
        at += kept
    if at != values.numel():
        raise ConfigError(f"compressed stack has {values.numel()} values but its mask keeps {at}")
    return packed


def _pack_keep(values: torch.Tensor, keep_all: np.ndarray) -> PackedWeight:
    """Pack the row-major kept ``values`` (1-D) of a weight whose mask is ``keep_all`` (uint8 [out, in])."""
    out, inp = keep_all.shape
    starts = np.concatenate([[0], np.cumsum(keep_all.sum(1, dtype=np.int64))])

    def chunks():
        for r in range(0, out, CHUNK_ROWS):
            keep = torch.from_numpy(keep_all[r:r + CHUNK_ROWS].astype(bool))
            dense = torch.zeros(keep.shape, dtype=values.dtype)
            dense[keep] = values[starts[r]:starts[min(r + CHUNK_ROWS, out)]]
            yield dense, keep

    return _pack_rows((out, inp), values.dtype, values.numel(), chunks())


def _pack_rows(shape, dtype, nnz, chunks) -> PackedWeight:
    """Pack CHUNK_ROWS-row slices (weight, keep) of a [out, in] weight into one PackedWeight."""
    if dtype not in DTYPES:
        raise ConfigError(f"packed values must be float32, bfloat16 or float16, not {dtype}")
    out, inp = shape
    tiles, words = layout(out, inp)
    masks = torch.empty(tiles, words, dtype=torch.int32)
    counts = torch.empty(tiles, words // GROUP, dtype=torch.int64)
    values = torch.zeros(nnz + PAD, dtype=dtype)
    tile, at = 0, 0
    for weight, keep in chunks:
        cells_w, cells_k = _cells(weight, words), _cells(keep, words)  # [t, words, 32]
        t = cells_k.shape[0]
        word = (cells_k.to(torch.int64) << _BIT).sum(-1)
        masks[tile:tile + t] = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
        counts[tile:tile + t] = cells_k.sum(-1).reshape(t, -1, GROUP).sum(-1)
        kept = cells_w[cells_k]
        values[at:at + kept.numel()] = kept
        tile, at = tile + t, at + kept.numel()
    offsets = torch.zeros(tiles * (words // GROUP) + 1, dtype=torch.int64)
    torch.cumsum(counts.reshape(-1), 0, out=offsets[1:])
    return PackedWeight((out, inp), masks, offsets, values)


def pack_dense(weight: torch.Tensor) -> torch.Tensor:
    """Every cell of ``weight [out, in]`` in full, in the packed order (32 values per word, zeros
    for the padding) + PAD: the values of ptp's dense baseline kernel, the sparse loop with every
    mask bit set. 1-D [tiles*words*32 + PAD]."""
    _, words = layout(*weight.shape)
    return torch.cat([_cells(weight.detach().cpu(), words).reshape(-1), torch.zeros(PAD, dtype=weight.dtype)])


def _cells(t: torch.Tensor, words: int) -> torch.Tensor:
    """[r, in] -> [ceil(r/16), words, 32]: zero-padded, cell (tile, pair), bit 2*row + col."""
    rows, inp = t.shape
    padded = torch.zeros(-(-rows // ROWS) * ROWS, words * COLS, dtype=t.dtype)
    padded[:rows, :inp] = t
    return padded.reshape(-1, ROWS, words, COLS).permute(0, 2, 1, 3).reshape(-1, words, ROWS * COLS)


def _bits(masks: torch.Tensor) -> torch.Tensor:
    """bool [tiles, words, ROWS, COLS] of int32 mask words [tiles, words]."""
    bits = ((masks.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> _BIT) & 1
    return bits.bool().reshape(*masks.shape, ROWS, COLS)


def keep_mask(packed: PackedWeight) -> torch.Tensor:
    """bool [out, in]: where ``packed`` stores a value."""
    out, inp = packed.shape
    tiles, words = packed.masks.shape
    return _bits(packed.masks).permute(0, 2, 1, 3).reshape(tiles * ROWS, words * COLS)[:out, :inp]


def unpack(packed: PackedWeight) -> torch.Tensor:
    """The dense weight [out, in], zeros where nothing is stored (inverse of ``pack``).
    Works 16 tiles at a time so the transient bit tensors stay small."""
    out, inp = packed.shape
    tiles, words = packed.masks.shape
    dense = torch.empty(tiles * ROWS, inp, dtype=packed.dtype)
    step = 16
    starts = packed.offsets[::words // GROUP]  # first value of every tile, then the total
    for t in range(0, tiles, step):
        bits = _bits(packed.masks[t:t + step])                         # [s, words, 16, 2]
        cells = torch.zeros(bits.shape, dtype=packed.dtype)
        cells[bits] = packed.values[int(starts[t]):int(starts[min(t + step, tiles)])]
        dense[t * ROWS:(t + step) * ROWS] = cells.permute(0, 2, 1, 3).reshape(-1, words * COLS)[:, :inp]
    return dense[:out]


def validate(packed: PackedWeight, shape: tuple[int, int] | None = None, name: str = "packed weight") -> None:
    """Refuse (ConfigError) a packed weight whose tensors are inconsistent: wrong dtypes or
    sizes for its shape, bits set outside the weight, offsets that disagree with the masks, or
    too few values. The kernels trust what passes, so this runs before any of them sees it."""
    out, inp = packed.shape
    if shape is not None and tuple(shape) != (out, inp):
        raise ConfigError(f"{name}: packed shape {(out, inp)} does not match the layer's {tuple(shape)}")
    tiles, words = layout(out, inp)
    m, o, v = packed.masks, packed.offsets, packed.values
    if m.dtype != torch.int32 or tuple(m.shape) != (tiles, words):
        raise ConfigError(f"{name}: masks must be int32 [{tiles}, {words}] for shape {(out, inp)}, got {m.dtype} {tuple(m.shape)}")
    if o.dtype != torch.int64 or tuple(o.shape) != (tiles * words // GROUP + 1,):
        raise ConfigError(f"{name}: offsets must be int64 [{tiles * words // GROUP + 1}], got {o.dtype} {tuple(o.shape)}")
    if v.dtype not in DTYPES or v.dim() != 1:
        raise ConfigError(f"{name}: values must be 1-D float32/bfloat16/float16, got {v.dtype} {tuple(v.shape)}")
    if not all(t.is_contiguous() and t.device.type == "cpu" for t in (m, o, v)):
        raise ConfigError(f"{name}: packed tensors must be contiguous CPU tensors")
    outside = (packed.masks.to(torch.int64) & 0xFFFFFFFF) & ~_allowed_bits(out, inp)
    if bool(outside.any()):
        raise ConfigError(f"{name}: mask bits set outside the [{out}, {inp}] weight (corrupt or mismatched)")
    counts = _popcount(packed.masks).reshape(-1, GROUP).sum(-1)
    if int(o[0]) != 0 or not torch.equal(o[1:] - o[:-1], counts):
        raise ConfigError(f"{name}: offsets disagree with the mask popcounts (corrupt or mismatched)")
    if v.numel() < int(o[-1]) + PAD:
        raise ConfigError(f"{name}: {v.numel()} values stored, the mask needs {int(o[-1])} + {PAD} padding")


def _allowed_bits(out: int, inp: int) -> torch.Tensor:
    """int64 [tiles, words]: the bits a mask word may set (rows < out, columns < in)."""
    tiles, words = layout(out, inp)
    rows = (out - ROWS * torch.arange(tiles)).clamp(0, ROWS)            # valid rows per tile
    cols = (inp - COLS * torch.arange(words)).clamp(0, COLS)            # valid columns per pair
    row_bits = (1 << (2 * rows)) - 1                                    # both columns of those rows
    col_bits = torch.tensor([0, 0x55555555, 0xFFFFFFFF])[cols]          # column 0 only = even bits
    return row_bits[:, None] & col_bits[None, :]


def _popcount(words: torch.Tensor) -> torch.Tensor:
    """Set bits of each int32 word (as uint32), int64; SWAR, no per-bit tensor."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = w - ((w >> 1) & 0x55555555)
    w = (w & 0x33333333) + ((w >> 2) & 0x33333333)
    w = (w + (w >> 4)) & 0x0F0F0F0F
    return (w * 0x01010101 & 0xFFFFFFFF) >> 24
