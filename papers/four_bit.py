"""FP4 and Int4: the two 4-bit formats QLoRA compares NF4 with (arXiv:2305.14314, sec. 3, Fig. 3).

Tier 2, not tier 1: only the data-type experiment (papers/qlora_experiments.py) uses them, and they
reuse nf4.py's blockwise absmax, scaling and nibble packing unchanged; only the 16-value code and
its nearest-value rule differ. Both store what NF4 stores without double quantization: packed
nibbles (element 2j in the high nibble of byte j, an odd count padded) and one float32 absmax per
block of B weights, c_b = max |w_i|, s_i = w_i / c_b (nf4.scale_blocks' float32 rounding).

FP4, bitsandbytes' `quantize_4bit(..., quant_type="fp4")` (0.50.2, bytes tested equal on the CPU):
  nibble S E1 E0 M, value (-1)^S * f(E, M) / 12 in float32, where (bitsandbytes' own table)
      E = 0: M * 2^-4 (0 and 0.0625, "subnormal"),  E = 1, 2, 3: 2^(4 - E) * (1 + M / 2)
  so the magnitudes are 0, 0.0625, 2, 3, 4, 6, 8, 12, divided by the largest, 12.
  Nearest value by float32 midpoints of the sorted code, a tie to the lower value; the two zeros
  sort 0b0000 before 0b1000, and the midpoint between them is 0, so s in [-0.0026, 0]
  gets 0b0000 and s in (0, 0.0026] gets 0b1000; bitsandbytes' CPU bytes keep this quirk, and so do
  ours. Both dequantize to +0.0, the value in bitsandbytes' table (its C loop on the CPU, used when
  the last dimension is even, writes -0.0 for 0b1000; its torch route +0.0). A partial last block
  stores absmax >= nf4.ABSMAX_FLOOR.
Int4, symmetric absmax: levels k = -7..7, value k / 7 (float32), nibble k & 0xF (two's complement;
  0b1000, -8, is never written). k = sign(s) * #{float32 midpoints (j + 1/2) / 7 below |s|}: the
  nearest level, and a value exactly on a midpoint takes the level nearer zero, so quantizing -w
  gives the negated codes of w.
"""
import math
from dataclasses import dataclass

import torch

import nf4
from checks import check_blocksize, check_tensor

FP4_MAX = 12.0  # the largest magnitude: values are normalised to [-1, 1] by it
FP4_SIGN_BIT = 0b1000
INT4_LEVELS = 7  # levels -7..7: symmetric, so 15 of the 16 nibbles are used
QUANT_TYPES = ("fp4", "int4")


def fp4_magnitude(nibble: int) -> float:
    """f(E, M) for the three low bits 0bEEM (bitsandbytes' bias: E = 1 is the largest exponent)."""
    exponent, mantissa = (nibble >> 1) & 0b11, nibble & 1
    if exponent == 0:
        return mantissa * 2.0**-4
    return 2.0 ** (4 - exponent) * (1 + mantissa / 2)


def fp4_code() -> torch.Tensor:
    """The 16 FP4 values in nibble order (not sorted), float32, in [-1, 1]."""
    magnitudes = [fp4_magnitude(n & 0b111) for n in range(16)]
    # 0b1000 is +0.0 in bitsandbytes' table too (see the module doc)
    values = [-m if n & FP4_SIGN_BIT and m else m for n, m in enumerate(magnitudes)]
    return torch.tensor(values, dtype=torch.float32) / FP4_MAX  # float32 division, as bitsandbytes


def int4_code() -> torch.Tensor:
    """The 16 Int4 values in nibble order: nibble n is level n (n < 8) or n - 16, over 7."""
    levels = torch.arange(16, dtype=torch.float32)
    levels = torch.where(levels < 8, levels, levels - 16)  # two's complement
    return levels / INT4_LEVELS  # (16,) float32; nibble 8 (-8/7) is never written


@dataclass(frozen=True, eq=False)
class FourBitWeight:
    """A weight in FP4 or Int4: the bytes bitsandbytes keeps for quant_type="fp4" without
    compress_statistics, and the metadata to undo it."""
    packed: torch.Tensor  # ((n+1)//2,) uint8
    absmax: torch.Tensor  # (ceil(n / B),) float32
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str  # "fp4" or "int4"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _scaled(w: torch.Tensor, blocksize: int):
    """(s, c): s_i = w_i / c_b (n,) float32 and the absmax c; NaN or Inf is a ValueError."""
    check_tensor(w, "w", dtypes=nf4.SUPPORTED_DTYPES)
    check_blocksize(blocksize, nf4.ALLOWED_BLOCKSIZES)
    absmax = nf4.blockwise_absmax(w.detach(), blocksize)  # NaN or Inf reaches its block's absmax
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("w contains NaN or Inf")
    return nf4.scale_blocks(w.detach(), absmax, blocksize), absmax


def _pack(indices, absmax, w, blocksize, quant_type) -> FourBitWeight:
    if w.numel() % blocksize:  # bitsandbytes clamps a partial last block's stored absmax
        absmax[-1:].clamp_(min=nf4.ABSMAX_FLOOR)
    return FourBitWeight(nf4.pack_nibbles(indices, pad_index=0), absmax, w.shape, w.dtype,
                         blocksize, quant_type)


def fp4_nearest(scaled: torch.Tensor) -> torch.Tensor:
    """The FP4 nibble nearest each s: midpoints of the sorted code, a tie to the lower value."""
    code = fp4_code()
    # stable: of the two zeros, +0 (nibble 0) sorts first
    order = torch.sort(code, stable=True).indices  # (16,) nibbles by value
    sorted_code = code[order]
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2  # (15,) float32
    position = torch.bucketize(scaled, midpoints, right=False)  # midpoints strictly below s
    return order[position].to(torch.uint8)


def int4_nearest(scaled: torch.Tensor) -> torch.Tensor:
    """The Int4 nibble nearest each s: |k| = #{midpoints below |s|}, a tie towards zero."""
    positive = torch.arange(INT4_LEVELS + 1, dtype=torch.float32) / INT4_LEVELS  # 0, 1/7 .. 1
    midpoints = (positive[:-1] + positive[1:]) / 2  # (7,) float32
    magnitude = torch.bucketize(scaled.abs(), midpoints, right=False)  # (n,) 0..7
    level = torch.where(scaled < 0, -magnitude, magnitude)  # (n,) -7..7
    return (level & 0x0F).to(torch.uint8)  # two's complement nibble


def quantize_fp4(w: torch.Tensor, blocksize: int = nf4.DEFAULT_BLOCKSIZE) -> FourBitWeight:
    """FP4-quantize w (any shape; float32, float16 or bfloat16), bitsandbytes' bytes."""
    scaled, absmax = _scaled(w, blocksize)
    return _pack(fp4_nearest(scaled), absmax, w, blocksize, "fp4")


def quantize_int4(w: torch.Tensor, blocksize: int = nf4.DEFAULT_BLOCKSIZE) -> FourBitWeight:
    """Int4-quantize w: symmetric absmax, levels -7..7, round to nearest (ties towards zero)."""
    scaled, absmax = _scaled(w, blocksize)
    return _pack(int4_nearest(scaled), absmax, w, blocksize, "int4")


def dequantize_4bit(q: FourBitWeight, dtype=None) -> torch.Tensor:
    """w^_i = code[k_i] * c_b in float32, rounded once to dtype (default q.dtype); q.shape."""
    if not isinstance(q, FourBitWeight):
        raise TypeError(f"q must be a FourBitWeight, got {type(q).__name__}")
    code = {"fp4": fp4_code, "int4": int4_code}[q.quant_type]()
    indices = nf4.unpack_nibbles(q.packed, q.numel)  # (n,) uint8
    values = nf4.dequantize_blockwise(indices, q.absmax, code, q.blocksize, dtype or q.dtype)
    return values.view(q.shape)
