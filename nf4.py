"""NF4: 4-bit NormalFloat weights with blockwise absmax scales and double quantization.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314), section 3, stores frozen base weights in this format.
The definition here produces the same bytes as bitsandbytes' `quantize_4bit(w, quant_type="nf4")`
(read from bitsandbytes 0.50.2 and checked against it in tests/test_nf4.py), so it can serve as an
oracle for faster kernels. Notation: w flattened to n values, split into blocks of B (the last block
may be partial); Phi^-1 is the standard normal quantile function (scipy.stats.norm.ppf).

  NF4 code (sec. 3, "4-bit NormalFloat"), asymmetric: 8 positive values, 7 negative, an exact zero:
      p_j = delta + (1/2 - delta) j/8  (j = 0..7),    p'_j = delta + (1/2 - delta) j/7  (j = 0..6)
      q = sort{ Phi^-1(p_j) } U { -Phi^-1(p'_j) } U {0},  then q / max(q) in [-1, 1]
  blockwise absmax (eq. 1-2):  absmax_b = max_{i in b} |w_i|,   k_i = argmin_k |w_i / absmax_b - q_k|
      dequantize:              w^_i = q[k_i] * absmax_b
  double quantization (sec. 3, eq. 6): the scales c2 = absmax are quantized once more,
      offset = mean(c2),  (codes, c1) = blockwise(c2 - offset, 8-bit dynamic map, 256)
      c2^ = dynamic[codes] * c1 + offset
  storage: 4 + 32/B bits per parameter, or with double quantization 4 + 8/B + 32/(256 B);
      B = 64: 4.5 and 4.127 ("0.5 bits ... to 0.127 bits", sec. 3).

Deviations from the paper, and where bitsandbytes is followed instead (all to match its bytes):
- The table is bitsandbytes' construction above (quantiles at evenly spaced probabilities between
  delta and 1/2, rounded to float32 before the division by the largest), not the paper's eq. 4,
  which averages neighbouring quantiles. delta (NF4_OFFSET) is not derived in the paper.
- The paper says "8-bit Floats" for the second quantization; bitsandbytes uses its signed dynamic
  tree map (Dettmers 2015, arXiv:1511.04561), and so do we.
- Nearest 8-bit code is exact here (as bitsandbytes' CUDA path); its CPU path uses a 65,536-bin
  approximation, so about 0.15% of nested codes differ from it (tests check ours is the nearest).
- The partial last block is divided by its absmax instead of multiplied by the reciprocal, as
  bitsandbytes' CPU code does (its CUDA kernel multiplies; the two can differ in the last bit).
- packed is 1-D ((n+1)//2,); bitsandbytes stores the same bytes as a ((n+1)//2, 1) column, and
  dequantizes a 1-D tensor to shape (1, n) on CPU (its issue 2047); dequantize_nf4 returns q.shape.
Edge cases: an all-zero block gets index 7 and dequantizes to exact zeros (see ABSMAX_FLOOR); NaN or
Inf is a ValueError, a non-float dtype a TypeError, a blocksize outside ALLOWED_BLOCKSIZES a
ValueError; an empty tensor quantizes to empty tensors (offset 0 with double quantization).
"""
import functools
import math
from dataclasses import dataclass, fields, replace
from typing import ClassVar, Optional

import torch
from scipy.stats import norm

# ----------------------------------------------------------------------------- constants
# Probability at which the largest NF4 value sits (bitsandbytes `create_normal_map(offset=...)`).
# Phi^-1(1) is infinite, so the outermost quantile must stop short of 1: 1 - 1/32 = 1 - (1/2)/16 is
# the centre of the last of 16 equal-probability bins and 1 - 1/30 that of 15 bins; the constant is
# their mean, 0.96770833 (truncated). The paper does not derive it.
NF4_OFFSET = 0.9677083
NF4_POSITIVE_VALUES = 8  # "2^(k-1)+1 for the positive part" (sec. 3), counting zero
NF4_NEGATIVE_VALUES = 7  # "2^(k-1) for the negative part", counting zero; one zero removed
NF4_ZERO_INDEX = 7  # index of the exact 0.0; bitsandbytes pads an odd count with it
NF4_BITS = 4
ALLOWED_BLOCKSIZES = tuple(2**k for k in range(5, 13))  # 32..4096, bitsandbytes' quantize_4bit
DEFAULT_BLOCKSIZE = 64  # "blocksize of 64 for W" (sec. 3)
NESTED_BLOCKSIZE = 256  # "blocksize of 256 for the second quantization" (sec. 3)
DYNAMIC_EXPONENT_BITS = 7  # bitsandbytes create_dynamic_map(signed=True, max_exponent_bits=7)
DYNAMIC_BITS = 8
FLOAT32_BITS = 32
# bitsandbytes' CPU path scales by 1 / max(absmax, 1e-38): an all-zero block gets index 7 (0.0)
# and dequantizes to exact zeros instead of 0 * inf = NaN. Its 4-bit path stores absmax 0 for a full
# block but 1e-38 for a partial last one (its 8-bit path stores 0); quantize_nf4 does the same.
ABSMAX_FLOOR = 1e-38
LOOKUP_BINS = 64  # bins of [-1, 1] for the nearest-code lookup; a power of two keeps s*32+32 exact
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# dequantize_nf4 works through the packed bytes this many at a time (a multiple of every blocksize
# / 2, so chunks hold whole blocks): its temporaries, 12 bytes a packed byte, are then a few MiB reused
# chunk after chunk, not fresh memory for the whole tensor, whose first touch costs more than the
# arithmetic (4096x4096 on the CPU: float32 1.3-1.5x and bfloat16 2.5x faster than unchunked).
DEQUANTIZE_CHUNK_BYTES = 1 << 18


# ----------------------------------------------------------------------------- code tables
@functools.lru_cache(maxsize=None)
def _nf4_code() -> torch.Tensor:
    def quantiles(count):  # Phi^-1 at `count` float32 probabilities from NF4_OFFSET towards 1/2
        probabilities = torch.linspace(NF4_OFFSET, 0.5, count + 1, dtype=torch.float32)[:-1]
        return torch.from_numpy(norm.ppf(probabilities.double().numpy())).float()

    positive = quantiles(NF4_POSITIVE_VALUES)  # (8,) Phi^-1(p_j)
    negative = -quantiles(NF4_NEGATIVE_VALUES)  # (7,) -Phi^-1(p'_j)
    values = torch.cat([negative, torch.zeros(1), positive]).sort().values  # (16,)
    return values / values.max()  # float32 division after float32 rounding, as bitsandbytes


def nf4_code() -> torch.Tensor:
    """The 16 NF4 values, float32, sorted, from -1.0 to 1.0 with 0.0 at NF4_ZERO_INDEX."""
    return _nf4_code().clone()


@functools.lru_cache(maxsize=None)
def _dynamic_code() -> torch.Tensor:
    values = [torch.tensor([0.0, 1.0])]
    for exponent in range(DYNAMIC_EXPONENT_BITS):  # decade 10^(exponent-6) holds 2^exponent fractions
        boundaries = torch.linspace(0.1, 1.0, 2**exponent + 1, dtype=torch.float32)
        fractions = (boundaries[:-1] + boundaries[1:]) / 2  # (2^exponent,) bin centres in (0.1, 1)
        decade = torch.tensor(10.0 ** (exponent - DYNAMIC_EXPONENT_BITS + 1), dtype=torch.float32)
        values += [fractions * decade, -(fractions * decade)]  # float32 product, as bitsandbytes
    return torch.cat(values).sort().values  # (256,) from -0.99296875 to 1.0


def dynamic_code() -> torch.Tensor:
    """Dettmers' signed 8-bit dynamic tree map: 256 float32 values, sorted, 0.0 and 1.0 included."""
    return _dynamic_code().clone()


def _check_code(code: torch.Tensor) -> None:
    if code.dtype != torch.float32 or code.dim() != 1 or not 2 <= code.numel() <= 256:
        raise ValueError(f"code must be a 1-D float32 tensor of 2..256 values, got {code.dtype} "
                         f"{tuple(code.shape)}")
    if not (bool((code[1:] > code[:-1]).all()) and code[0] >= -1 and code[-1] <= 1):
        raise ValueError("code must be strictly increasing within [-1, 1]")


# ----------------------------------------------------------------------------- nearest code
def _lookup_bin(scaled: torch.Tensor) -> torch.Tensor:
    half = LOOKUP_BINS // 2  # monotone map [-1, 1] -> 0..LOOKUP_BINS; s * 32 is exact
    bins = torch.add(torch.tensor(float(half), device=scaled.device), scaled, alpha=half)  # 32 s + 32
    return bins.clamp_(0, LOOKUP_BINS).to(torch.int32)  # clamp: any finite or infinite s has a bin


def nearest_code_index(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """uint8 index of the nearest value of `code` for each element of float32 `scaled`.

    The rule is bitsandbytes': k = #{float32 midpoints (code[k] + code[k+1]) / 2 below scaled}, so
    a value exactly on a midpoint takes the lower code. torch.bucketize computes exactly this, but its
    branchy binary search costs about 40 ns an element here. When no bin of _lookup_bin holds two
    midpoints (true for NF4, not for the dense 8-bit map), two table gathers and a compare do the same:
    the midpoints in lower bins are below s (the map is monotone), those in higher bins above it.
    """
    midpoints = (code[:-1] + code[1:]) / 2  # (K-1,)
    midpoint_bins = _lookup_bin(midpoints)  # (K-1,) non-decreasing
    if bool((midpoint_bins[1:] == midpoint_bins[:-1]).any()):
        return torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)
    all_bins = torch.arange(LOOKUP_BINS + 1, dtype=torch.int32, device=code.device)
    count_below = torch.searchsorted(midpoint_bins, all_bins).to(torch.uint8)  # (BINS+1,)
    midpoint_in_bin = torch.full((LOOKUP_BINS + 1,), math.inf, device=code.device)
    midpoint_in_bin[midpoint_bins.long()] = midpoints  # (BINS+1,) inf where a bin holds none
    bins = _lookup_bin(scaled)
    index = torch.index_select(count_below, 0, bins)  # midpoints in lower bins
    return index.add_(scaled > torch.index_select(midpoint_in_bin, 0, bins))  # + the one in this bin


# ----------------------------------------------------------------------------- blockwise absmax
def _check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in SUPPORTED_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a float32, float16 or bfloat16 tensor, got {got}")


def _check_blocksize(blocksize: int, name: str = "blocksize") -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in ALLOWED_BLOCKSIZES:
        raise ValueError(f"{name} must be a power of two in [32, 4096], got {blocksize!r}")


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int, *, name: str = "x"):
    """Blockwise absmax quantization of x, flattened, to the nearest value of `code` (eq. 1).

    Returns (indices uint8 of x's shape, absmax float32 of ceil(n / blocksize) values; the last block
    may be partial and gets the absmax of its own elements). Raises ValueError if x has NaN or Inf.
    """
    _check_float(x, name)
    _check_blocksize(blocksize)
    _check_code(code)
    flat = x.detach().reshape(-1)  # (n,) in x's dtype; arithmetic below promotes to float32
    n = flat.numel()
    full = n - n % blocksize
    block_min, block_max = torch.aminmax(flat[:full].view(-1, blocksize), dim=1)  # (nblocks_full,)
    absmax = torch.maximum(-block_min, block_max).float()  # absmax_b = max |x_i|, NaN propagates
    if full < n:
        absmax = torch.cat([absmax, flat[full:].abs().amax().float().view(1)])  # (nblocks,)
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    safe_absmax = absmax.clamp(min=ABSMAX_FLOOR)
    scaled = torch.empty(n, dtype=torch.float32, device=flat.device)
    reciprocal = safe_absmax[: full // blocksize].reciprocal().unsqueeze(1)  # (nblocks_full, 1)
    # s = x * (1 / absmax_b) in float32     (nblocks_full, blocksize) * (nblocks_full, 1)
    torch.mul(flat[:full].view(-1, blocksize), reciprocal, out=scaled[:full].view(-1, blocksize))
    # s = x / absmax_b in the partial last block, as bitsandbytes' CPU path computes it
    torch.div(flat[full:], safe_absmax[full // blocksize:], out=scaled[full:])
    indices = nearest_code_index(scaled, code.to(flat.device))  # k_i = argmin_k |s_i - q_k|
    return indices.view(x.shape), absmax


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int, n: int, dtype) -> torch.Tensor:
    """Multiply the first n float32 `values` (a fresh buffer, scaled in place) by their block's absmax."""
    full = n - n % blocksize
    # x^ = q[k] * absmax_b     (nblocks_full, blocksize) * (nblocks_full, 1)
    values[:full].view(-1, blocksize).mul_(absmax[: full // blocksize].unsqueeze(1))
    values[full:n].mul_(absmax[full // blocksize:])  # partial last block, one scale
    return values[:n].to(dtype)  # float32 product rounded once to dtype (no copy for float32)


def dequantize_blockwise(indices: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x^_i = code[k_i] * absmax_b (eq. 2), computed in float32, returned in `dtype`, indices' shape."""
    _check_blocksize(blocksize)
    values = code.to(indices.device)[indices.reshape(-1).long()]  # (n,) float32 code values
    return _scale_blocks(values, absmax.float(), blocksize, indices.numel(), dtype).view(indices.shape)


# ----------------------------------------------------------------------------- nibble packing
def pack_nibbles(indices: torch.Tensor, pad_index: int = NF4_ZERO_INDEX) -> torch.Tensor:
    """Two 4-bit indices a byte, byte j = indices[2j] << 4 | indices[2j+1] (even element in the high
    nibble); an odd count is padded with pad_index (the NF4 zero, as bitsandbytes). ((n+1)//2,) uint8."""
    flat = indices.reshape(-1).to(torch.uint8)  # (n,)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_full((1,), pad_index)])  # (n+1,)
    pairs = flat.view(-1, 2)  # ((n+1)//2, 2): column 0 the even elements, column 1 the odd ones
    return (pairs[:, 0] << 4) | pairs[:, 1]  # ((n+1)//2,)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_nibbles: the first n indices, uint8, shape (n,)."""
    if packed.dtype != torch.uint8 or not 0 <= n <= 2 * packed.numel():
        raise ValueError(f"packed must be uint8 with at least n/2 bytes, got {packed.dtype} "
                         f"with {packed.numel()} for n={n}")
    flat = packed.reshape(-1)  # (npacked,)
    return torch.stack([flat >> 4, flat & 0x0F], dim=1).view(-1)[:n]  # (npacked, 2) -> (n,)


# ----------------------------------------------------------------------------- double quantization
def double_quantize(absmax: torch.Tensor):
    """(codes uint8, nested_absmax float32 per 256 scales, offset float32 scalar) for the scales.

    "Since c2 are positive, we subtract the mean from c2 before quantization to center the values
    around zero and make use of symmetric quantization" (sec. 3, Double Quantization).
    """
    offset = absmax.mean() if absmax.numel() else absmax.new_zeros(())  # () float32
    centred = absmax - offset  # (nblocks,)
    codes, nested_absmax = quantize_blockwise(centred, _dynamic_code(), NESTED_BLOCKSIZE, name="absmax")
    return codes, nested_absmax, offset


def double_dequantize(codes: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """c2^ = dynamic[codes] * c1 + offset (eq. 6), float32, two separately rounded operations."""
    return dequantize_blockwise(codes, nested_absmax, _dynamic_code(), NESTED_BLOCKSIZE) + offset


def nf4_bits_per_parameter(blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True) -> float:
    """Storage per weight of a large tensor, ignoring the odd-count pad and the one float32 offset."""
    if not double_quant:
        return NF4_BITS + FLOAT32_BITS / blocksize  # 4 + 32/64 = 4.5
    # 4 + 8/64 + 32/(64 * 256) = 4.127
    return NF4_BITS + DYNAMIC_BITS / blocksize + FLOAT32_BITS / (blocksize * NESTED_BLOCKSIZE)


# ----------------------------------------------------------------------------- NF4 weight
@dataclass(frozen=True, eq=False)
class NF4Weight:
    """A quantized tensor. To keep it in an nn.Module, so that .to() and state_dict() carry it:

        names, metadata = list(q.tensors()), q.metadata()  # keep these (plain Python values)
        for name, tensor in q.tensors().items():
            module.register_buffer(name, tensor)
        q = NF4Weight.from_tensors({name: getattr(module, name) for name in names}, **metadata)
    """
    packed: torch.Tensor  # ((n+1)//2,) uint8; element 2j in the high nibble of byte j, 2j+1 in the low
    absmax: torch.Tensor  # (nblocks,) float32 scales, or uint8 dynamic-map codes with double quant
    nested_absmax: Optional[torch.Tensor]  # (ceil(nblocks/256),) float32, or None
    offset: Optional[torch.Tensor]  # () float32 mean of the scales, or None
    shape: torch.Size  # original shape; n = prod(shape)
    dtype: torch.dtype  # original dtype, the default of dequantize_nf4
    blocksize: int  # weights per absmax scale
    nested_blocksize: Optional[int]  # scales per nested absmax (NESTED_BLOCKSIZE), or None

    TENSOR_FIELDS: ClassVar[tuple] = ("packed", "absmax", "nested_absmax", "offset")

    def __post_init__(self):
        object.__setattr__(self, "shape", torch.Size(self.shape))
        _check_blocksize(self.blocksize)
        nblocks, double_quant = -(-self.numel // self.blocksize), self.nested_blocksize is not None
        if self.packed.dtype != torch.uint8 or self.packed.numel() != (self.numel + 1) // 2:
            raise ValueError(f"packed must hold {(self.numel + 1) // 2} uint8 bytes for shape "
                             f"{tuple(self.shape)}, got {self.packed.dtype} {self.packed.numel()}")
        expected = torch.uint8 if double_quant else torch.float32
        if self.absmax.dtype != expected or self.absmax.numel() != nblocks:
            raise ValueError(f"absmax must hold {nblocks} {expected} values, got {self.absmax.dtype} "
                             f"{self.absmax.numel()}")
        nested = (self.nested_absmax, self.offset)
        if double_quant and (self.nested_blocksize != NESTED_BLOCKSIZE or None in nested
                             or self.nested_absmax.numel() != -(-nblocks // NESTED_BLOCKSIZE)):
            raise ValueError(f"nested_absmax and offset do not fit nested_blocksize={self.nested_blocksize}")
        if not double_quant and nested != (None, None):
            raise ValueError("nested_absmax and offset need nested_blocksize=256")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def tensors(self) -> dict:
        """The stored tensors by field name (None fields left out), e.g. to register as buffers."""
        return {name: getattr(self, name) for name in self.TENSOR_FIELDS if getattr(self, name) is not None}

    def metadata(self) -> dict:
        """The non-tensor fields: shape, dtype, blocksize, nested_blocksize."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.TENSOR_FIELDS}

    @classmethod
    def from_tensors(cls, tensors: dict, shape, dtype, blocksize, nested_blocksize=None) -> "NF4Weight":
        return cls(tensors["packed"], tensors["absmax"], tensors.get("nested_absmax"), tensors.get("offset"),
                   shape, dtype, blocksize, nested_blocksize)

    def to(self, device) -> "NF4Weight":
        return replace(self, **{name: t.to(device) for name, t in self.tensors().items()})

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_parameter(self) -> float:
        """Measured storage, 8 * nbytes / numel (NaN for an empty tensor)."""
        return 8 * self.nbytes / self.numel if self.numel else math.nan


def quantize_nf4(w: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True) -> NF4Weight:
    """NF4-quantize w (any shape; float32, float16 or bfloat16): bitsandbytes' bytes, see the module doc."""
    indices, absmax = quantize_blockwise(w, _nf4_code(), blocksize, name="w")
    if w.numel() % blocksize:  # bitsandbytes' 4-bit path clamps the stored absmax of a partial block
        absmax[-1:].clamp_(min=ABSMAX_FLOOR)
    packed = pack_nibbles(indices)
    if not double_quant:
        return NF4Weight(packed, absmax, None, None, w.shape, w.dtype, blocksize, None)
    codes, nested_absmax, offset = double_quantize(absmax)
    return NF4Weight(packed, codes, nested_absmax, offset, w.shape, w.dtype, blocksize, NESTED_BLOCKSIZE)


def nf4_absmax(q: NF4Weight) -> torch.Tensor:
    """The float32 per-block scales of q, double-dequantized when stored that way."""
    if q.nested_blocksize is None:
        return q.absmax
    return double_dequantize(q.absmax, q.nested_absmax, q.offset)


@functools.lru_cache(maxsize=None)
def _nf4_pair_table(device: torch.device) -> torch.Tensor:
    byte = torch.arange(256)
    pairs = torch.stack([_nf4_code()[byte >> 4], _nf4_code()[byte & 0x0F]], dim=1)  # (256, 2) float32
    return pairs.view(torch.int64).view(256).to(device)  # (256,) each entry the 8 bytes of one pair


def dequantize_nf4(q: NF4Weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """w^_i = q[k_i] * absmax_b, computed in float32 and rounded once to dtype (default q.dtype, the
    input's dtype, as bitsandbytes). Shape q.shape."""
    dtype = q.dtype if dtype is None else dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    pair_table, absmax = _nf4_pair_table(q.packed.device), nf4_absmax(q)
    out = torch.empty(q.numel, dtype=dtype, device=q.packed.device)  # (n,)
    for start in range(0, q.packed.numel(), DEQUANTIZE_CHUNK_BYTES):  # whole blocks per chunk
        packed = q.packed[start:start + DEQUANTIZE_CHUNK_BYTES]  # (k,): elements [2 start, 2 start + 2k)
        # one gather a byte fetches both of its values: (k,) int64 -> (2k,) float32
        values = torch.index_select(pair_table, 0, packed.to(torch.int32)).view(torch.float32)
        first, stop = 2 * start, min(2 * (start + packed.numel()), q.numel)  # stop < 2(start+k): pad
        scales = absmax[first // q.blocksize: -(-stop // q.blocksize)]  # this chunk's blocks
        out[first:stop] = _scale_blocks(values, scales, q.blocksize, stop - first, torch.float32)
    return out.view(q.shape)
