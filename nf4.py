"""NF4: 4-bit NormalFloat weights with blockwise absmax scales and double quantization.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314), section 3, stores frozen base weights in this
format. The bytes equal bitsandbytes' `quantize_4bit(w, quant_type="nf4")` (0.50.2, tested); where
it departs from the paper, the function that follows it says how. w: n values in blocks of B.

  NF4 code (sec. 3, "4-bit NormalFloat"), Phi^-1 the normal quantile function; 8 positive values,
  7 negative, an exact zero:
      p_j = delta + (1/2 - delta) j/8  (j = 0..7),  p'_j = delta + (1/2 - delta) j/7  (j = 0..6)
      q = sort{ Phi^-1(p_j) } U { -Phi^-1(p'_j) } U {0},  then q / max(q), in [-1, 1]
  blockwise absmax quantization (eq. 1):  c_b = max_{i in b} |w_i|,   s_i = w_i / c_b,
      k_i = #{ midpoints (q_k + q_k+1) / 2 below s_i }: the nearest code, a tie takes the lower
  dequantization (eq. 2):   w^_i = q[k_i] * c_b
  double quantization (sec. 3): the scales c2 = c are quantized once more,
      offset = mean(c2),   (codes, c1) = blockwise(c2 - offset, 8-bit dynamic map, 256)
      c2^ = dynamic[codes] * c1 + offset                                    (doubleDequant, eq. 6)

These are the references, written for reading. The same bits, faster (lookup tables, chunks that
stay in cache), are fast_paths/nf4_lookup.py's, checked against these through oracle.py.
Arguments are checked at the doors: quantize_nf4, dequantize_nf4 and NF4Weight (through
checks.py).
"""
import functools
import math
from dataclasses import InitVar, dataclass, fields, replace
from typing import ClassVar, Optional

import torch
from scipy.stats import norm

import checks

# Probability of the largest NF4 value (bitsandbytes `create_normal_map(offset=...)`; not in the
# paper): about the mean of 1 - 1/32 and 1 - 1/30, the centres of the last of 16 and of 15 bins.
NF4_OFFSET = 0.9677083
NF4_POSITIVE_VALUES = 8  # "2^(k-1)+1 for the positive part" (sec. 3), counting zero
NF4_NEGATIVE_VALUES = 7  # "2^(k-1) for the negative part", counting zero; one zero removed
NF4_ZERO_INDEX = 7  # index of the exact 0.0; bitsandbytes pads an odd count with it
NF4_BITS = 4  # bits of a code
DYNAMIC_BITS = 8  # bits of a nested (scale) code
FLOAT32_BITS = 32  # bits of a float32 scale
ALLOWED_BLOCKSIZES = tuple(2**k for k in range(5, 13))  # 32..4096, bitsandbytes' quantize_4bit
DEFAULT_BLOCKSIZE = 64  # "blocksize of 64 for W" (sec. 3)
NESTED_BLOCKSIZE = 256  # "blocksize of 256 for the second quantization" (sec. 3)
DYNAMIC_EXPONENT_BITS = 7  # bitsandbytes create_dynamic_map(signed=True, max_exponent_bits=7)
# bitsandbytes' CPU path scales by 1 / max(absmax, 1e-38), so an all-zero block gets index 7 (0.0),
# not 0 * inf = NaN; its 4-bit path stores absmax 0 for a full block, 1e-38 for a partial last one.
ABSMAX_FLOOR = 1e-38
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- 1. code tables

def linspace_float32(start: float, end: float, steps: int) -> torch.Tensor:
    """torch.linspace(start, end, steps) in float32, the same bits on every build: each of torch's
    points (start + i h, or end - (steps - 1 - i) h past the middle, h the float32 step) exact in
    float64, rounded once, as torch's fused multiply-add builds round it (docs/oracle.md).
    """
    first, last = (torch.tensor(v, dtype=torch.float32) for v in (start, end))
    step = ((last - first) / (steps - 1)).double()  # float32 h, exactly in float64
    i = torch.arange(steps, dtype=torch.float64)  # (steps,)
    points = torch.where(i < steps // 2, first.double() + i * step,
                         last.double() - (steps - 1 - i) * step)  # exact, no rounding yet
    return points.float()  # (steps,): rounded once


@functools.lru_cache(maxsize=None)
def _nf4_code() -> torch.Tensor:
    def quantiles(count):
        # Phi^-1 at `count` float32 probabilities from NF4_OFFSET towards 1/2
        probabilities = linspace_float32(NF4_OFFSET, 0.5, count + 1)[:-1]
        return torch.from_numpy(norm.ppf(probabilities.double().numpy())).float()

    positive = quantiles(NF4_POSITIVE_VALUES)  # (8,) Phi^-1(p_j)
    negative = -quantiles(NF4_NEGATIVE_VALUES)  # (7,) -Phi^-1(p'_j)
    values = torch.cat([negative, torch.zeros(1), positive]).sort().values  # (16,)
    # bitsandbytes' construction, not the paper's eq. 4 (which averages neighbouring quantiles):
    return values / values.max()  # float32 division after float32 rounding


def nf4_code() -> torch.Tensor:
    """The 16 NF4 values, float32, sorted, from -1.0 to 1.0 with 0.0 at NF4_ZERO_INDEX."""
    return _nf4_code().clone()


@functools.lru_cache(maxsize=None)
def _dynamic_code() -> torch.Tensor:
    values = [torch.tensor([0.0, 1.0])]
    for exponent in range(DYNAMIC_EXPONENT_BITS):  # decade 10^(exponent-6) holds 2^exponent values
        boundaries = linspace_float32(0.1, 1.0, 2**exponent + 1)  # (2^exponent + 1,)
        fractions = (boundaries[:-1] + boundaries[1:]) / 2  # (2^exponent,) bin centres in (0.1, 1)
        decade = torch.tensor(10.0 ** (exponent - DYNAMIC_EXPONENT_BITS + 1), dtype=torch.float32)
        values += [fractions * decade, -(fractions * decade)]  # float32 product, as bitsandbytes
    return torch.cat(values).sort().values  # (256,) from -0.99296875 to 1.0


def dynamic_code() -> torch.Tensor:
    """Dettmers' signed 8-bit dynamic tree map: 256 float32 values, sorted, 0.0 and 1.0 included."""
    return _dynamic_code().clone()


# ----------------------------------------------------------------------------- 2. blockwise absmax

def nearest_code_index(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """k = #{float32 midpoints (code[k] + code[k+1]) / 2 below s} (bucketize, right=False), uint8:
    the nearest code; a value exactly on a midpoint takes the lower one (bitsandbytes' strict >)."""
    midpoints = (code[:-1] + code[1:]) / 2  # (K-1,) float32
    return torch.bucketize(scaled, midpoints, right=False).to(torch.uint8)


def blockwise_absmax(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """c_b = max_{i in b} |x_i| over x flattened: float32 (ceil(n / B),), the last block partial."""
    flat = x.reshape(-1)  # (n,)
    full = flat.numel() - flat.numel() % blocksize
    absmax = flat[:full].view(-1, blocksize).abs().amax(dim=1)  # (n_full / B, B) -> (n_full / B,)
    if full < flat.numel():
        absmax = torch.cat([absmax, flat[full:].abs().amax().view(1)])  # (nblocks,)
    return absmax.float()  # exact: every float16 and bfloat16 value is a float32


def scale_blocks(x: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """s_i = x_i * (1 / c_b) in float32, and x_i / c_b in a partial last block (bitsandbytes' CPU
    code; the two can differ in the last bit); c is clamped to ABSMAX_FLOOR. (n,) float32."""
    flat = x.reshape(-1)  # (n,)
    safe_absmax = absmax.clamp(min=ABSMAX_FLOOR)
    full = flat.numel() - flat.numel() % blocksize
    reciprocal = safe_absmax[: full // blocksize].reciprocal().unsqueeze(1)  # (n_full / B, 1)
    scaled_full = flat[:full].view(-1, blocksize) * reciprocal  # (n_full / B, B) * (n_full / B, 1)
    scaled_last = flat[full:] / safe_absmax[full // blocksize:]  # (n - n_full,) / (0 or 1,)
    return torch.cat([scaled_full.view(-1), scaled_last])  # (n,)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    """Blockwise absmax quantization of x to the nearest value of `code` (eq. 1): (indices uint8 of
    x's shape, absmax float32 (ceil(n / B),)). `code` sorted, strictly increasing, float32."""
    absmax = blockwise_absmax(x.detach(), blocksize)  # c_b
    scaled = scale_blocks(x.detach(), absmax, blocksize)  # s_i = x_i / c_b
    indices = nearest_code_index(scaled, code.to(x.device))  # k_i
    return indices.view(x.shape), absmax


def dequantize_blockwise(indices: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         blocksize: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x^_i = code[k_i] * c_b (eq. 2), a float32 product rounded once to `dtype`; indices' shape."""
    values = code.to(indices.device)[indices.reshape(-1).long()]  # (n,) float32 q[k_i]
    scales = absmax.float().repeat_interleave(blocksize)[: values.numel()]  # (n,) c_b per element
    return (values * scales).to(dtype).view(indices.shape)


# ----------------------------------------------------------------------------- 3. nibble packing

def pack_nibbles(indices: torch.Tensor, pad_index: int = NF4_ZERO_INDEX) -> torch.Tensor:
    """Two 4-bit indices a byte: byte j = indices[2j] << 4 | indices[2j+1] (the even element in the
    high nibble); an odd count is padded with pad_index (the NF4 zero, as bitsandbytes)."""
    flat = indices.reshape(-1).to(torch.uint8)  # (n,)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_full((1,), pad_index)])  # (n+1,)
    pairs = flat.view(-1, 2)  # ((n+1)//2, 2): column 0 the even elements, column 1 the odd ones
    return (pairs[:, 0] << 4) | pairs[:, 1]  # ((n+1)//2,)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_nibbles: the first n indices, uint8, shape (n,)."""
    flat = packed.reshape(-1)  # (npacked,)
    return torch.stack([flat >> 4, flat & 0x0F], dim=1).view(-1)[:n]  # (npacked, 2) -> (n,)


# ----------------------------------------------------------------------------- 4. double quant

def double_quantize(absmax: torch.Tensor):
    """(codes uint8, nested_absmax float32 per 256 scales, offset float32 ()) for the scales c2.

    "Since c2 are positive, we subtract the mean from c2 before quantization to center the values
    around zero and make use of symmetric quantization" (sec. 3). For the paper's "8-bit Floats",
    bitsandbytes' dynamic tree map (arXiv:1511.04561) with the exact nearest code (its CPU path
    approximates that: about 0.15% of its nested codes differ from ours)."""
    offset = absmax.mean() if absmax.numel() else absmax.new_zeros(())  # () float32
    codes, nested_absmax = quantize_blockwise(absmax - offset, _dynamic_code(), NESTED_BLOCKSIZE)
    return codes, nested_absmax, offset


def dequantize_scales(codes, nested_absmax, offset) -> torch.Tensor:
    """The inverse of double_quantize, dequant(c1, c2) inside eq. 6: the block scales
    c2^ = dynamic[codes] * c1 + offset, float32, two separately rounded operations."""
    return dequantize_blockwise(codes, nested_absmax, _dynamic_code(), NESTED_BLOCKSIZE) + offset


def nf4_bits_per_parameter(blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True) -> float:
    """Storage per weight of a large tensor (no odd-count pad, no offset): 4 + 32/64 = 4.5 bits,
    or with double quantization 4 + 8/64 + 32/(64 * 256) = 4.127 ("0.127 bits", sec. 3)."""
    scale_bits = DYNAMIC_BITS + FLOAT32_BITS / NESTED_BLOCKSIZE if double_quant else FLOAT32_BITS
    return NF4_BITS + scale_bits / blocksize  # bits of one weight + its share of its scale's


# ----------------------------------------------------------------------------- 5. the NF4 weight

@dataclass(frozen=True, eq=False)
class NF4Weight:
    """A quantized tensor: in a module, register q.tensors() as buffers and keep q.metadata().
    Building one checks the fields fit and (unless check_values=False) the scales are finite."""
    packed: torch.Tensor  # ((n+1)//2,) uint8; element 2j in the high nibble of byte j, 2j+1 low
    absmax: torch.Tensor  # (nblocks,) float32 scales, or uint8 dynamic-map codes with double quant
    nested_absmax: Optional[torch.Tensor]  # (ceil(nblocks/256),) float32, or None
    offset: Optional[torch.Tensor]  # () float32 mean of the scales, or None
    shape: torch.Size  # original shape; n = prod(shape)
    dtype: torch.dtype  # original dtype, the default of dequantize_nf4
    blocksize: int  # weights per absmax scale
    nested_blocksize: Optional[int]  # scales per nested absmax (NESTED_BLOCKSIZE), or None
    check_values: InitVar[bool] = True
    TENSOR_FIELDS: ClassVar[tuple] = ("packed", "absmax", "nested_absmax", "offset")

    def __post_init__(self, check_values):
        object.__setattr__(self, "shape", torch.Size(self.shape))
        checks.check_blocksize(self.blocksize, ALLOWED_BLOCKSIZES)
        checks.check_choice(self.nested_blocksize, "nested_blocksize", (None, NESTED_BLOCKSIZE))
        nblocks = -(-self.numel // self.blocksize)
        nested = self.nested_blocksize is not None
        # name: (dtype, numel), or False where the field must be None
        expected = {"packed": (torch.uint8, (self.numel + 1) // 2),
                    "absmax": (torch.uint8 if nested else torch.float32, nblocks),
                    "nested_absmax": nested and (torch.float32, -(-nblocks // NESTED_BLOCKSIZE)),
                    "offset": nested and (torch.float32, 1)}
        stored = {name: getattr(self, name) for name in expected}
        checks.check_stored(stored, expected, self.metadata(), finite=check_values)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def tensors(self) -> dict:
        """The stored tensors by field name (None fields left out), e.g. to register as buffers."""
        return {name: getattr(self, name) for name in self.TENSOR_FIELDS
                if getattr(self, name) is not None}

    def metadata(self) -> dict:
        """The non-tensor fields: shape, dtype, blocksize, nested_blocksize."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in self.TENSOR_FIELDS}

    @classmethod
    def from_tensors(cls, tensors: dict, shape, dtype, blocksize, nested_blocksize=None,
                     check_values: bool = True) -> "NF4Weight":
        return cls(tensors["packed"], tensors["absmax"], tensors.get("nested_absmax"),
                   tensors.get("offset"), shape, dtype, blocksize, nested_blocksize, check_values)

    def to(self, device) -> "NF4Weight":
        return replace(self, **{name: t.to(device) for name, t in self.tensors().items()})

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_parameter(self) -> float:
        """Measured storage, 8 * nbytes / numel (NaN for an empty tensor)."""
        return 8 * self.nbytes / self.numel if self.numel else math.nan


def quantize_nf4(w: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE,
                 double_quant: bool = True) -> NF4Weight:
    """NF4-quantize w (any shape; float32, float16 or bfloat16, finite): eq. 1 with the NF4 code,
    nibble packing, then double quantization of the scales."""
    checks.check_tensor(w, "w", dtypes=SUPPORTED_DTYPES, finite=True)
    checks.check_blocksize(blocksize, ALLOWED_BLOCKSIZES)
    checks.check_bool(double_quant, "double_quant")
    indices, absmax = quantize_blockwise(w, _nf4_code(), blocksize)  # k_i, c_b
    if w.numel() % blocksize:
        # bitsandbytes' 4-bit path stores a partial last block's absmax clamped
        absmax[-1:].clamp_(min=ABSMAX_FLOOR)
    no_nesting = (absmax, None, None)
    scales, nested_absmax, offset = double_quantize(absmax) if double_quant else no_nesting
    nested_blocksize = NESTED_BLOCKSIZE if double_quant else None
    return NF4Weight(pack_nibbles(indices), scales, nested_absmax, offset, w.shape, w.dtype,
                     blocksize, nested_blocksize, check_values=False)


def block_scales(q: NF4Weight) -> torch.Tensor:
    """The float32 block scales c_b of q, dequantized from their codes (eq. 6) when stored so."""
    if q.nested_blocksize is None:
        return q.absmax
    return dequantize_scales(q.absmax, q.nested_absmax, q.offset)


def dequantize_nf4(q: NF4Weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """doubleDequant(c1, c2, W) (eq. 6), w^_i = q[k_i] * c_b: unpack, look up, scale; in float32,
    rounded once to dtype (default q.dtype, as bitsandbytes), in q.shape (bitsandbytes: (1, n)
    for 1-D on the CPU, issue 2047)."""
    checks.check_instance(q, NF4Weight, "q", made_by="quantize_nf4")
    checks.check_tensor(q.packed, "q.packed")  # a meta tensor has no data to dequantize
    dtype = checks.check_dtype(q.dtype if dtype is None else dtype, "dtype", SUPPORTED_DTYPES)
    indices = unpack_nibbles(q.packed, q.numel)  # (n,) uint8 k_i
    values = dequantize_blockwise(indices, block_scales(q), _nf4_code(), q.blocksize, dtype)
    return values.view(q.shape)
