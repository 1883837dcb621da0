"""Tests for nf4.py: properties of the format, the fast paths against the plain math, edge cases
and bad input, and bitsandbytes as the byte-level oracle.

Tolerances: bytes, indices, absmax, offsets and dequantized values that bitsandbytes also computes,
and the fast paths against the plain functions, are compared bit for bit by assert_same (after a
tolerance check that tells wrong math from other rounding; bytes and values name their block).
Error bounds are per element, in float64, with the slack of float32 arithmetic and of the output
dtype's rounding stated where they are used. Tests marked `exercise` check the functions a student
rebuilds (docs/exercises.md); they call the plain functions directly where they can, so that one
blanked function fails as few other exercises as possible.
"""
import contextlib
import copy
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import checks
import nf4
import oracle
from assertions import assert_same
from fast_paths import nf4_lookup

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# log10 of the weight scale per input dtype: wide for float32/bfloat16, and within float16's normal
# range (6e-5 .. 65504) so that neither the input nor code * absmax falls into float16's subnormals.
SCALE_EXPONENTS = {torch.float32: (-30, 30), torch.bfloat16: (-30, 30), torch.float16: (-2, 2)}

# bitsandbytes' NF4 table (get_4bit_type("nf4"), 0.50.2), its float32 values in hex: tested equal to
# bitsandbytes' below, and used by the tie tests so that they need no nf4.nf4_code().
NF4_TABLE = torch.tensor([float.fromhex(h) for h in (
    "-0x1p+0", "-0x1.647362p-1", "-0x1.0cd66p-1", "-0x1.94654p-2", "-0x1.23449ap-2",
    "-0x1.7a6a7ep-3", "-0x1.74f0e2p-4", "0x0p+0", "0x1.45f5fep-4", "0x1.4995c6p-3",
    "0x1.f809bap-3", "0x1.5a0674p-2", "0x1.c3497p-2", "0x1.200f56p-1", "0x1.722766p-1",
    "0x1p+0")], dtype=torch.float32)


@st.composite
def weights(draw, max_numel=600):
    """A random weight: 1-3 dims, any dtype, normal values at a random scale, some blocks zeroed."""
    dims = []
    for _ in range(draw(st.integers(1, 3))):
        dims.append(draw(st.integers(1, min(40, max_numel // math.prod(dims)))))
    dtype = draw(st.sampled_from(DTYPES))
    low, high = SCALE_EXPONENTS[dtype]
    scale = 10.0 ** draw(st.integers(low, high))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(math.prod(dims), generator=generator, dtype=torch.float64) * scale
    if draw(st.booleans()):  # an all-zero run, which covers whole blocks for the small blocksizes
        start = draw(st.integers(0, w.numel() - 1))
        w[start:start + draw(st.integers(1, 128))] = 0.0
    return w.to(dtype).reshape(dims)


# 2^e scales of tie_weights: float16 keeps the smallest tie value (~0.04 2^-8) a normal number
TIE_EXPONENTS = {torch.float32: (-60, 60), torch.bfloat16: (-60, 60), torch.float16: (-8, 8)}


def tie_values(dtype):
    """The NF4 midpoints in `dtype` and their neighbours either side, the code values and -0.0.
    float32 holds each midpoint exactly (a tie); float16 and bfloat16 hold none of them, so their
    values are the nearest 16-bit ones either side of each midpoint."""
    midpoints = ((NF4_TABLE[:-1] + NF4_TABLE[1:]) / 2).to(dtype)
    up, down = torch.tensor(2.0, dtype=dtype), torch.tensor(-2.0, dtype=dtype)
    return torch.cat([midpoints, torch.nextafter(midpoints, up), torch.nextafter(midpoints, down),
                      NF4_TABLE.to(dtype), torch.tensor([-0.0], dtype=dtype)])


def tie_weight(n, blocksize, dtype, exponent, generator, zero_block=None):
    """n values of tie_values(dtype), each block led by +-1, times 2^exponent: c_b = 2^e and
    s = w / 2^e exactly, in full blocks (w * 2^-e) and a partial last one (w / 2^e) alike; block
    `zero_block` all zero."""
    pool = tie_values(dtype)
    w = pool[torch.randint(len(pool), (n,), generator=generator)]
    signs = torch.rand(w[::blocksize].shape, generator=generator) < 0.5
    w[::blocksize] = torch.where(signs, -1.0, 1.0).to(dtype)  # each block's absmax: exactly 1
    if zero_block is not None:
        w[zero_block * blocksize:(zero_block + 1) * blocksize] = 0.0
    return w * 2.0 ** exponent


@st.composite
def tie_weights(draw):
    """(w, blocksize): tie_weight of up to 2.5 blocks of any allowed size, in any input dtype;
    with more than one block, one of them all zero."""
    blocksize = draw(st.sampled_from(nf4.ALLOWED_BLOCKSIZES))
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(1, 2 * blocksize + blocksize // 2))
    zero_block = draw(st.integers(0, (n - 1) // blocksize)) if n > blocksize else None
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    exponent = draw(st.integers(*TIE_EXPONENTS[dtype]))
    return tie_weight(n, blocksize, dtype, exponent, generator, zero_block), blocksize


@contextlib.contextmanager
def chunk_sizes(quantize_values, dequantize_bytes):
    """The lookup kernels work through chunks larger than these tests' weights: make them small."""
    original = nf4_lookup.QUANTIZE_CHUNK_VALUES, nf4_lookup.DEQUANTIZE_CHUNK_BYTES
    nf4_lookup.QUANTIZE_CHUNK_VALUES = quantize_values
    nf4_lookup.DEQUANTIZE_CHUNK_BYTES = dequantize_bytes
    try:
        yield
    finally:
        nf4_lookup.QUANTIZE_CHUNK_VALUES, nf4_lookup.DEQUANTIZE_CHUNK_BYTES = original


def tables_on(device):
    return nf4_lookup.lookup_tables(nf4.nf4_code(), nf4.dynamic_code(), device)


def fast_quantize(w, blocksize=nf4.DEFAULT_BLOCKSIZE, double_quant=True):
    """fast_paths/nf4_lookup.py's quantizer, its tensors as an NF4Weight (as nf4.quantize_nf4)."""
    tensors = nf4_lookup.quantize_nf4_chunked(w, blocksize, double_quant, tables_on(w.device))
    nested_blocksize = nf4.NESTED_BLOCKSIZE if double_quant else None
    return nf4.NF4Weight.from_tensors(tensors, w.shape, w.dtype, blocksize, nested_blocksize)


def fast_dequantize(q, dtype=None, *, out=None):
    """fast_paths/nf4_lookup.py's dequantizer (nf4.dequantize_nf4's twin)."""
    return nf4_lookup.dequantize_nf4_chunked(q, dtype, tables_on(q.packed.device), out=out)


blocksizes = st.sampled_from(nf4.ALLOWED_BLOCKSIZES)
chunks = st.sampled_from([(32, 16), (64, 48), (96, 2048), (4096, 64), (1 << 15, 1 << 16)])
small_blocksizes = st.sampled_from((32, 64, 128))  # several blocks even in a small tensor


def per_element_absmax(absmax, blocksize, n):
    return absmax.repeat_interleave(blocksize)[:n]  # (n,) the scale of each element's block


# ----------------------------------------------------------------------------- code tables
@pytest.mark.exercise("nf4.nf4_code")
def test_nf4_code_structure_and_quantiles():
    code = nf4.nf4_code()
    assert code.dtype == torch.float32 and code.shape == (16,)
    assert bool((code[1:] > code[:-1]).all()), f"not strictly increasing: {code.tolist()}"
    ends = torch.stack([code[0], code[nf4.NF4_ZERO_INDEX], code[-1]])
    assert_same(ends, torch.tensor([-1.0, 0.0, 1.0]), "code[0], code[7], code[15]: -1, 0, 1")
    # an independent float64 route: Phi^-1 at evenly spaced probabilities from the offset to 1/2,
    # normalised by Phi^-1(offset). It differs from bitsandbytes' float32 route by rounding only.
    from scipy.stats import norm
    top = norm.ppf(nf4.NF4_OFFSET)

    def probabilities(count):
        return torch.linspace(nf4.NF4_OFFSET, 0.5, count + 1, dtype=torch.float64)[:-1].numpy()
    positive = norm.ppf(probabilities(8)) / top
    negative = -norm.ppf(probabilities(7)) / top
    # rtol 1e-6: the float32 route rounds p before Phi^-1 and divides in float32 (it lands up to 6
    # ulps, 3.6e-7 relative, from the float64 values)
    assert_same(code[8:].double(), torch.tensor(positive).flip(0), "positive values",
                exact=False, rtol=1e-6, atol=0)
    assert_same(code[:7].double(), torch.tensor(negative), "negative values", exact=False,
                rtol=1e-6, atol=0)
    code.zero_()  # callers get copies: the cached table stays intact
    assert nf4.nf4_code()[0] == -1.0 and nf4.dynamic_code()[0] != 0


@pytest.mark.exercise("nf4.nf4_code")
def test_nf4_code_has_bitsandbytes_float32_bits():
    """The quantiles in float32 as bitsandbytes computes them, then divided by the largest in
    float32: the same formula in float64, rounded at the end, is off by up to 6 ulps in 10 of the 16
    values, and every quantized byte depends on these bits."""
    assert_same(nf4.nf4_code(), NF4_TABLE, "NF4 code")


def test_dynamic_code_structure():
    code = nf4.dynamic_code()
    assert code.dtype == torch.float32 and code.shape == (256,)
    assert bool((code[1:] > code[:-1]).all())  # 256 distinct values
    assert code[-1] == 1.0 and 0.0 in code.tolist() and code[0] == torch.tensor(-0.99296875)
    # seven decades of linear fractions: 2^i values in [10^(i-7), 10^(i-6)) for i = 0..6
    positive = code[code > 0][:-1]
    decades = torch.floor(torch.log10(positive.double())).long()
    assert torch.bincount(decades + 7).tolist() == [2**i for i in range(7)]


def test_storage_formula():
    assert nf4.nf4_bits_per_parameter(64, double_quant=False) == 4.5  # 4 + 32/64
    # sec. 3: "0.127 bits"
    assert round(nf4.nf4_bits_per_parameter(64, double_quant=True), 3) == 4.127


# ----------------------------------------------------------------------------- nearest code
@pytest.mark.exercise("nf4.nearest_code_index")
def test_midpoints_take_the_lower_code():
    """The float32 midpoint (q_k + q_k+1) / 2 itself takes the lower code k, as bitsandbytes (its
    comparisons are strict). The naive argmin |s - q| gets 6 of the 15 NF4 midpoints wrong: there
    the two float32 distances are not equal, and the smaller one is the upper code's."""
    nearest_nf4 = {"nearest_code_index": lambda s, code: nf4.nearest_code_index(s, code),
                   "nearest_nf4_index_lookup": lambda s, code: nf4_lookup.nearest_nf4_index_lookup(
                       s, nf4_lookup.lookup_tables(code, nf4.dynamic_code(), "cpu"))}
    for table, code in (("NF4", NF4_TABLE), ("dynamic", nf4.dynamic_code())):
        midpoints = (code[:-1] + code[1:]) / 2
        below = torch.nextafter(midpoints, torch.tensor(-2.0))
        above = torch.nextafter(midpoints, torch.tensor(2.0))
        lower = torch.arange(code.numel() - 1, dtype=torch.uint8)
        for rule, nearest in nearest_nf4.items():
            if table == "dynamic" and rule != "nearest_code_index":
                continue  # the lookup holds the NF4 table only
            assert_same(nearest(midpoints, code), lower, f"{rule}: k at the {table} midpoints")
            assert_same(nearest(below, code), lower, f"{rule}: k just below the {table} midpoints")
            assert_same(nearest(above, code), lower + 1,
                        f"{rule}: k just above the {table} midpoints")


def test_naive_argmin_misses_6_of_the_15_nf4_midpoints():
    """What the docs and the exercise say of argmin |s - q| (a known wrong answer), kept true."""
    midpoints = (NF4_TABLE[:-1] + NF4_TABLE[1:]) / 2
    naive = (midpoints.unsqueeze(1) - NF4_TABLE).abs().argmin(dim=1)  # (15, 16) -> (15,)
    assert int((naive != torch.arange(15)).sum()) == 6


@pytest.mark.exercise("nf4.nearest_code_index")
@given(st.lists(st.floats(-1, 1, width=32), min_size=2, max_size=40, unique=True),
       st.lists(st.floats(-2, 2, width=32), min_size=1, max_size=30))
def test_nearest_code_index_counts_the_midpoints_below(values, scaled):
    code = torch.tensor(sorted(values), dtype=torch.float32)
    assume(bool((code[1:] > code[:-1]).all()))  # -0.0 and 0.0 are one value
    midpoints = ((code[:-1] + code[1:]) / 2).tolist()  # float32 values, exactly as Python floats
    scaled += midpoints + [-math.inf, math.inf, -0.0]
    expected = [sum(m < s for m in midpoints) for s in scaled]  # the rule, one value at a time
    assert_same(nf4.nearest_code_index(torch.tensor(scaled), code),
                torch.tensor(expected, dtype=torch.uint8), "k = #{midpoints below s}, random code")


def test_each_lookup_bin_holds_at_most_one_nf4_midpoint():
    code = nf4.nf4_code()
    midpoints = (code[:-1] + code[1:]) / 2
    half = nf4_lookup.LOOKUP_BINS // 2
    bins = midpoints.mul(half).add(half).int()  # trunc(32 m + 32)
    assert bool((bins[1:] > bins[:-1]).all())  # what nearest_nf4_index_lookup relies on
    tables = nf4_lookup.lookup_tables(code, nf4.dynamic_code(), "cpu")
    count_below, midpoint_in_bin = tables["count_below"].long(), tables["midpoint_in_bin"]
    expected = [int((bins < b).sum()) for b in range(nf4_lookup.LOOKUP_BINS + 1)]
    assert count_below.tolist() == expected
    assert_same(midpoint_in_bin[bins.long()], midpoints, "the midpoint held in each bin")
    assert int(torch.isfinite(midpoint_in_bin).sum()) == 15  # +inf in the other 50 bins


@given(st.lists(st.floats(-1 - 2.0**-22, 1 + 2.0**-22, width=32), max_size=200),
       st.integers(0, 2**31 - 1))
def test_nf4_lookup_equals_nearest_code_index(values, seed):
    # s is float32 whatever w's dtype (scale_blocks multiplies by float32 reciprocals): the lookup
    # sees float32 only; 16-bit inputs reach it through the fast = plain tests below
    code = nf4.nf4_code()
    midpoints = (code[:-1] + code[1:]) / 2
    generator = torch.Generator().manual_seed(seed)
    edge = torch.tensor(1 + 2.0**-22)
    scaled = torch.cat([torch.tensor(values, dtype=torch.float32), midpoints, code, -code,
                        torch.nextafter(midpoints, torch.tensor(2.0)), torch.tensor([-0.0]),
                        torch.nextafter(midpoints, torch.tensor(-2.0)), edge.view(1), -edge.view(1),
                        torch.rand(300, generator=generator) * 2 - 1])
    tables = nf4_lookup.lookup_tables(code, nf4.dynamic_code(), "cpu")
    assert_same(nf4_lookup.nearest_nf4_index_lookup(scaled, tables),
                nf4.nearest_code_index(scaled, code), "k")


# ----------------------------------------------------------------------------- blockwise absmax
@pytest.mark.exercise("nf4.blockwise_absmax")
@pytest.mark.parametrize("dtype", DTYPES)
def test_blockwise_absmax_is_each_blocks_largest_magnitude(dtype):
    """Blocks of 32 over the flattened (5, 21): three full, one all zero, a partial last one of 9;
    the largest magnitude is negative in some blocks. float16 and bfloat16 values are float32s."""
    x = torch.randn(105, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[10], x[40], x[100] = 5.0, -7.0, -3.0  # blocks 1 and 3 led by a negative value
    x[64:96] = 0.0  # block 2
    expected = torch.stack([block.abs().max() for block in x.float().split(32)])  # (4,)
    assert_same(nf4.blockwise_absmax(x.view(5, 21), 32), expected, "c_b = max |x_i| in block b")


@pytest.mark.exercise("nf4.blockwise_absmax")
@given(weights(), blocksizes)
def test_blockwise_absmax_equals_a_loop_over_blocks(w, blocksize):
    expected = torch.stack([block.abs().max() for block in w.reshape(-1).float().split(blocksize)])
    assert_same(nf4.blockwise_absmax(w, blocksize), expected, "c_b = max |x_i| in block b")


@given(weights(), small_blocksizes, st.sampled_from(["nf4", "dynamic"]))
def test_quantize_blockwise_picks_nearest_code(w, blocksize, table):
    code = nf4.nf4_code() if table == "nf4" else nf4.dynamic_code()
    indices, absmax = nf4.quantize_blockwise(w, code, blocksize)
    assert indices.shape == w.shape and indices.dtype == torch.uint8
    assert int(indices.max()) < code.numel()
    x = w.reshape(-1).double()
    # a Python loop over blocks: the reference
    blocks_absmax = torch.stack([b.abs().max() for b in x.split(blocksize)])
    assert_same(absmax.double(), blocks_absmax, "absmax")
    scaled = x / per_element_absmax(blocks_absmax, blocksize, x.numel()).clamp(min=nf4.ABSMAX_FLOOR)
    distance = (scaled.unsqueeze(1) - code.double()).abs()  # (n, K)
    chosen = distance.gather(1, indices.reshape(-1, 1).long()).squeeze(1)
    # nearest up to float32 scaling (2^-23 relative) and the float32 rounding of midpoints (2^-24)
    assert bool((chosen <= distance.min(dim=1).values + 2.0**-21 * scaled.abs()).all())


# ----------------------------------------------------------------------------- NF4 properties
@given(weights(), blocksizes, st.booleans())
def test_dequantized_values_are_block_scaled_code_values(w, blocksize, double_quant):
    q = nf4.quantize_nf4(w, blocksize, double_quant)
    indices = nf4.unpack_nibbles(q.packed, w.numel())
    assert int(indices.max()) <= 15 and q.absmax.numel() == -(-w.numel() // blocksize)
    scales = per_element_absmax(nf4.block_scales(q), blocksize, w.numel())
    values = nf4.nf4_code()[indices.long()] * scales  # float32 product
    expected = values.to(w.dtype)  # one rounding
    for dequantize in (nf4.dequantize_nf4, fast_dequantize):
        out = dequantize(q)
        assert out.dtype == w.dtype and out.shape == w.shape
        assert_same(out.reshape(-1), expected, f"{dequantize.__name__}: q[k] c_b in one rounding",
                    blocksize=blocksize)
        assert_same(dequantize(q, torch.float32).reshape(-1), values,
                    f"{dequantize.__name__}: q[k] c_b in float32", blocksize=blocksize)


# ----------------------------------------------------------------------------- kernels = reference
def assert_same_weight(actual, expected, what=""):
    """Every field bit for bit; a differing packed byte is named with its block of weights."""
    assert actual.metadata() == expected.metadata(), what
    assert actual.tensors().keys() == expected.tensors().keys(), what
    for name, tensor in expected.tensors().items():  # B weights are B / 2 packed bytes
        per_block = {"packed": actual.blocksize // 2}.get(name)  # absmax: one element a block
        assert_same(actual.tensors()[name], tensor, f"{what}{name}", blocksize=per_block)


@given(st.one_of(st.tuples(weights(), blocksizes), tie_weights()), st.booleans(), chunks)
def test_lookup_quantize_equals_the_reference(weight_and_blocksize, double_quant, chunk):
    w, blocksize = weight_and_blocksize
    with chunk_sizes(*chunk):  # chunks of whole blocks, the last one partial
        assert_same_weight(fast_quantize(w, blocksize, double_quant),
                           nf4.quantize_nf4(w, blocksize, double_quant))


@given(st.one_of(st.tuples(weights(), blocksizes), tie_weights()), st.booleans(), chunks,
       st.sampled_from([None, *DTYPES]))
def test_lookup_dequantize_equals_the_reference(weight_and_blocksize, double_quant, chunk, dtype):
    w, blocksize = weight_and_blocksize
    q = nf4.quantize_nf4(w, blocksize, double_quant)
    expected = nf4.dequantize_nf4(q, dtype)
    out = torch.full(q.shape, math.nan, dtype=expected.dtype)  # every element must be written
    with chunk_sizes(*chunk):
        assert_same(fast_dequantize(q, dtype), expected, "w^")
        assert fast_dequantize(q, dtype, out=out) is out
    assert_same(out, expected, "w^ into out")


def test_dequantize_into_out_checks_it_and_takes_its_dtype():
    q = nf4.quantize_nf4(torch.randn(4, 64))
    out = torch.empty(4, 64, dtype=torch.bfloat16)
    assert_same(fast_dequantize(q, out=out), nf4.dequantize_nf4(q, torch.bfloat16))
    for bad in (torch.empty(64, 4), torch.empty(4, 64, dtype=torch.float16),
                torch.empty(64, 4).t(), torch.empty(4, 64, device="meta")):
        with pytest.raises(ValueError, match=r"out (must be contiguous, torch.float32, \(4, 64\)"
                                             r"|is a meta tensor)"):
            fast_dequantize(q, torch.float32, out=bad)
    with pytest.raises(TypeError, match="out must be a torch.Tensor, got list"):
        fast_dequantize(q, out=[0.0] * 256)


@pytest.mark.parametrize("blocksize", nf4.ALLOWED_BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lookup_kernels_equal_the_references_at_every_blocksize_and_input_dtype(blocksize, dtype):
    """Each allowed blocksize with each input dtype for sure (the properties above draw them): an
    odd count (two full blocks, the second all zero, and a partial one of B/2 + 1) of midpoint ties
    or their nearest 16-bit values; chunks of one block, so that every chunk boundary is crossed."""
    generator = torch.Generator().manual_seed(blocksize)
    w = tie_weight(2 * blocksize + blocksize // 2 + 1, blocksize, dtype, -3, generator, 1)
    with chunk_sizes(blocksize, blocksize // 2):  # B values, B / 2 bytes: one block a chunk
        for double_quant in (False, True):
            q = nf4.quantize_nf4(w, blocksize, double_quant)
            assert_same_weight(fast_quantize(w, blocksize, double_quant), q,
                               f"double_quant={double_quant}: ")
            assert_same(fast_dequantize(q), nf4.dequantize_nf4(q), "w^",
                        blocksize=blocksize)


def test_lookup_kernels_pass_the_oracle():
    """The project's own fast paths are the oracle's first clients (quantize: a mapping of the
    stored tensors; dequantize: a tensor), through the checkers any other implementation uses."""
    def quantize(w, blocksize, double_quant):
        return nf4_lookup.quantize_nf4_chunked(w, blocksize, double_quant, tables_on(w.device))
    assert oracle.check_nf4_quantize(quantize, examples=10)
    assert oracle.check_nf4_dequantize(fast_dequantize, examples=10)


def test_kernel_constants_agree_with_the_reference():
    assert nf4_lookup.ABSMAX_FLOOR == nf4.ABSMAX_FLOOR
    assert nf4_lookup.NESTED_BLOCKSIZE == nf4.NESTED_BLOCKSIZE


@given(st.integers(1, 3000), blocksizes, st.integers(0, 2**31 - 1), chunks)
def test_lookup_dequantize_of_any_bytes_equals_the_reference(n, blocksize, seed, chunk):
    # every byte and nested code, not only those a quantization produces; scales of either sign
    generator = torch.Generator().manual_seed(seed)
    nblocks = -(-n // blocksize)

    def random_bytes(count):
        return torch.randint(0, 256, (count,), generator=generator, dtype=torch.uint8)
    nested_absmax = torch.randn(-(-nblocks // 256), generator=generator)
    q = nf4.NF4Weight(random_bytes((n + 1) // 2), random_bytes(nblocks), nested_absmax,
                      torch.randn((), generator=generator), (n,), torch.float32, blocksize,
                      nf4.NESTED_BLOCKSIZE)
    with chunk_sizes(*chunk):
        for dtype in DTYPES:
            assert_same(fast_dequantize(q, dtype), nf4.dequantize_nf4(q, dtype), "w^")


@given(weights(), blocksizes)
def test_largest_magnitude_in_each_block_is_exact(w, blocksize):
    q = nf4.quantize_nf4(w, blocksize, double_quant=False)
    x, out = w.reshape(-1), nf4.dequantize_nf4(q).reshape(-1)
    for start in range(0, x.numel(), blocksize):  # a loop over blocks is fine in a test
        block = x[start:start + blocksize].float()
        largest = start + int(block.abs().argmax())
        assert out[largest] == x[largest]


@given(weights(), blocksizes, st.booleans())
def test_quantize_of_dequantize_is_a_fixed_point(w, blocksize, double_quant):
    q = nf4.quantize_nf4(w, blocksize, double_quant)
    # a scale that double quantization pushed to <= 0 flips its block: no fixed point
    if double_quant:
        true_absmax = nf4.quantize_nf4(w, blocksize, False).absmax
        assume(bool((nf4.block_scales(q)[true_absmax > 0] > 0).all()))
    again = nf4.quantize_nf4(nf4.dequantize_nf4(q), blocksize, double_quant)
    assert_same(again.packed, q.packed, "packed after a round trip", blocksize=blocksize // 2)
    if not double_quant:
        assert_same(again.absmax, q.absmax, "absmax after a round trip")


@given(weights(), blocksizes, st.booleans())
def test_round_trip_error_is_bounded(w, blocksize, double_quant):
    code = nf4.nf4_code().double()
    half_widest_gap = (code[1:] - code[:-1]).max() / 2  # 0.1519, between -1.0 and -0.6962
    true_absmax = nf4.quantize_nf4(w, blocksize, False).absmax.double()
    true_absmax = per_element_absmax(true_absmax, blocksize, w.numel())
    q = nf4.quantize_nf4(w, blocksize, double_quant)
    used_absmax = per_element_absmax(nf4.block_scales(q).double(), blocksize, w.numel())
    error = (w.reshape(-1).double() - nf4.dequantize_nf4(q).reshape(-1).double()).abs()
    # |w - q_k a'| <= |w - q_k a| + |q_k| |a - a'| <= gap/2 a + |a - a'|, plus float32 scaling
    # (2^-22 a), the float32 product (2^-24 a') and the output dtype's rounding (eps/2 of a value at
    # most a', or half a subnormal step)
    finfo = torch.finfo(w.dtype)
    bound = (half_widest_gap + 2.0**-22) * true_absmax + (true_absmax - used_absmax).abs()
    bound += (2.0**-24 + finfo.eps / 2) * used_absmax.abs() + finfo.tiny * finfo.eps
    assert bool((error <= bound).all())


@pytest.mark.exercise("nf4.pack_nibbles")
def test_pack_nibbles_puts_the_even_element_high_and_pads_with_the_zero_code():
    """bitsandbytes' layout: byte j = k[2j] << 4 | k[2j+1]; an odd count ends with the index of
    0.0 (7) in the low nibble of the last byte, so the pad dequantizes to 0."""
    indices = torch.tensor([[1, 2, 15], [0, 9, 4]], dtype=torch.uint8)  # flattened: 1 2 15 0 9 4
    assert_same(nf4.pack_nibbles(indices), torch.tensor([0x12, 0xF0, 0x94], dtype=torch.uint8),
                "bytes of 1 2 | 15 0 | 9 4")
    assert_same(nf4.pack_nibbles(indices.view(-1)[:5]),
                torch.tensor([0x12, 0xF0, 0x90 | nf4.NF4_ZERO_INDEX], dtype=torch.uint8),
                "bytes of 1 2 | 15 0 | 9, padded with the index of 0.0")


@pytest.mark.exercise("nf4.pack_nibbles")
@given(st.lists(st.integers(0, 15), max_size=300))
def test_pack_unpack_round_trip_and_layout(values):
    indices = torch.tensor(values, dtype=torch.uint8)
    packed = nf4.pack_nibbles(indices)
    padded = values + [nf4.NF4_ZERO_INDEX] * (len(values) % 2)
    # the even element in the high nibble
    expected = [16 * padded[i] + padded[i + 1] for i in range(0, len(padded), 2)]
    assert_same(packed, torch.tensor(expected, dtype=torch.uint8), "packed bytes")
    assert_same(nf4.unpack_nibbles(packed, len(values)), indices, "unpacked indices")


@given(weights(max_numel=480), blocksizes, st.booleans())
def test_results_depend_only_on_flattened_values(w, blocksize, double_quant):
    n = w.numel()
    other_shape = (n,) if w.dim() > 1 else (1, n, 1)
    q = nf4.quantize_nf4(w, blocksize, double_quant)
    r = nf4.quantize_nf4(w.reshape(other_shape), blocksize, double_quant)
    for name, tensor in q.tensors().items():
        assert_same(r.tensors()[name], tensor, f"{name} of w reshaped to {other_shape}")
    assert_same(nf4.dequantize_nf4(r).reshape(w.shape), nf4.dequantize_nf4(q),
                "dequantized from the reshaped weight", blocksize=blocksize)
    non_contiguous = w.t().contiguous().t() if w.dim() == 2 else w
    transposed = nf4.quantize_nf4(non_contiguous, blocksize, double_quant)
    # a non-contiguous input with the same flattened values
    assert_same(transposed.packed, q.packed, "packed of a non-contiguous w",
                blocksize=blocksize // 2)


@pytest.mark.exercise("nf4.double_quantize")
def test_double_quantize_centres_the_scales_then_quantizes_them_in_blocks_of_256():
    """sec. 3: subtract the mean of the scales c2, then absmax-quantize them with the 8-bit dynamic
    map in blocks of 256. 600 scales: nested blocks of 256, 256 and a partial 88."""
    absmax = torch.rand(600, generator=torch.Generator().manual_seed(4)) * 3 + 0.5  # c_b > 0
    codes, nested_absmax, offset = nf4.double_quantize(absmax)
    assert_same(offset, absmax.mean(), "offset = mean(c2)")
    centred = absmax - absmax.mean()
    assert_same(nested_absmax, torch.stack([b.abs().max() for b in centred.split(256)]),
                "c1 = max |c2 - offset| of each 256 scales")
    assert codes.dtype == torch.uint8 and codes.shape == (600,)
    # each code is the dynamic value nearest to (c2 - offset) / c1; 2^-22: float32 scaling
    dynamic = nf4.dynamic_code().double()
    target = centred.double() / per_element_absmax(nested_absmax.double(), 256, 600)
    distance = (target.unsqueeze(1) - dynamic).abs()  # (600, 256)
    chosen = distance.gather(1, codes.long().unsqueeze(1)).squeeze(1)
    assert_same(chosen, distance.min(dim=1).values, "|dynamic[code] - target|, nearest",
                exact=False, rtol=0, atol=2.0**-22)


@given(weights(), small_blocksizes)
def test_double_quantized_absmax_within_dynamic_resolution(w, blocksize):
    true_absmax = nf4.quantize_nf4(w, blocksize, False).absmax
    q = nf4.quantize_nf4(w, blocksize, True)
    assert q.absmax.dtype == torch.uint8 and q.offset.dtype == torch.float32
    assert_same(q.offset, true_absmax.mean(), "offset")  # "subtract the mean" (sec. 3)
    dynamic = nf4.dynamic_code().double()
    half_widest_gap = (dynamic[1:] - dynamic[:-1]).max() / 2  # 0.00703, near +-1
    nested = per_element_absmax(q.nested_absmax.double(), nf4.NESTED_BLOCKSIZE, true_absmax.numel())
    error = (nf4.block_scales(q).double() - true_absmax.double()).abs()
    # plus float32 rounding of the scaling, the product and the sum (a few ulps of the operands;
    # subnormal results: a few of the smallest steps, 2^-149)
    rounding = 2.0**-22 * (nested + true_absmax.double() + q.offset.double().abs()) + 4 * 2.0**-149
    # a nested absmax c1 below ABSMAX_FLOOR scales by 1 / floor but dequantizes by c1 (as
    # bitsandbytes): |x - q(x / floor) c1| <= |x| (1 - c1 / floor) + ..., with |x| <= c1
    floored = nested * (1 - nested / nf4.ABSMAX_FLOOR).clamp(min=0)
    bound = (half_widest_gap + 2.0**-22) * nested + rounding + floored
    assert bool((error <= bound).all())


# ----------------------------------------------------------------------------- storage and plumbing
@pytest.mark.parametrize("double_quant", [False, True])
def test_storage_accounting(double_quant):
    rows, cols, blocksize = 64, 512, 64  # 32768 weights: 512 blocks, 2 nested blocks
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    q = nf4.quantize_nf4(w, blocksize, double_quant)
    n, nblocks = rows * cols, rows * cols // blocksize
    expected_bytes = n // 2 + (nblocks + 4 * (nblocks // 256) + 4 if double_quant else 4 * nblocks)
    assert q.numel == n and q.nbytes == expected_bytes
    theory = nf4.nf4_bits_per_parameter(blocksize, double_quant)
    offset_bits = 32 / n if double_quant else 0
    assert q.bits_per_parameter == pytest.approx(theory + offset_bits, rel=1e-12)


def test_tensors_buffers_state_dict_round_trip():
    w = torch.randn(40, 50, generator=torch.Generator().manual_seed(1), dtype=torch.bfloat16)
    q = nf4.quantize_nf4(w, 32)
    assert set(q.tensors()) == {"packed", "absmax", "nested_absmax", "offset"}
    assert set(nf4.quantize_nf4(w, 32, double_quant=False).tensors()) == {"packed", "absmax"}
    module, fresh = torch.nn.Module(), torch.nn.Module()
    for name, tensor in q.tensors().items():
        module.register_buffer(name, tensor)
        fresh.register_buffer(name, torch.zeros_like(tensor))
    fresh.load_state_dict(module.state_dict())
    buffers = {name: getattr(fresh, name) for name in q.tensors()}
    restored = nf4.NF4Weight.from_tensors(buffers, **q.metadata())
    assert_same_weight(restored, q, "restored from a state dict: ")
    moved = q.to("cpu")
    assert moved is not q
    assert_same_weight(moved, q, "moved: ")


def test_inconsistent_fields_are_rejected():
    q = nf4.quantize_nf4(torch.randn(100), 32)
    with pytest.raises(ValueError, match="packed"):
        nf4.NF4Weight.from_tensors({**q.tensors(), "packed": q.packed[:-1]}, **q.metadata())
    with pytest.raises(ValueError, match="absmax"):
        nf4.NF4Weight.from_tensors({**q.tensors(), "absmax": q.absmax.float()}, **q.metadata())
    with pytest.raises(ValueError, match="nested"):
        nf4.NF4Weight.from_tensors({"packed": q.packed, "absmax": q.absmax}, **q.metadata())


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_all_zero_blocks_dequantize_to_exact_zeros(dtype, double_quant):
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    w[1] = 0.0
    for tensor in (w, torch.zeros(3, 70, dtype=dtype)):
        q = nf4.quantize_nf4(tensor, 64, double_quant)
        out = nf4.dequantize_nf4(q)
        assert not bool(out.isnan().any())
        assert bool((out[tensor == 0] == 0).all())
    assert nf4.quantize_nf4(w, 64, False).absmax[1].item() == 0.0


def test_tiny_blocks_stay_finite_and_bounded():
    w = torch.tensor([1e-40, -3e-41, 0.0, 2e-39] * 8)  # subnormals, below ABSMAX_FLOOR
    out = nf4.dequantize_nf4(nf4.quantize_nf4(w, 32, False))
    assert bool(out.isfinite().all()) and bool((out.abs() <= w.abs().max()).all())


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_is_rejected(bad):
    w = torch.randn(3, 70)
    w[2, 5] = bad
    for dtype in DTYPES:
        with pytest.raises(ValueError, match="w contains NaN or Inf"):
            nf4.quantize_nf4(w.to(dtype))


@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_empty_tensor(shape, double_quant):
    q = nf4.quantize_nf4(torch.empty(shape, dtype=torch.float16), 64, double_quant)
    assert q.numel == 0 and q.packed.numel() == 0 and q.absmax.numel() == 0
    out = nf4.dequantize_nf4(q)
    assert out.shape == shape and out.dtype == torch.float16
    assert math.isnan(q.bits_per_parameter)


def test_scalar_and_requires_grad_inputs():
    w = torch.nn.Parameter(torch.tensor(-2.5))
    out = nf4.dequantize_nf4(nf4.quantize_nf4(w))
    assert out.shape == () and out.item() == -2.5 and not out.requires_grad


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.uint8, torch.bool, torch.float64])
def test_unsupported_dtype_is_a_type_error(dtype):
    expected = "w must have dtype torch.float32 or torch.float16 or torch.bfloat16"
    with pytest.raises(TypeError, match=expected):
        nf4.quantize_nf4(torch.ones(64, dtype=dtype))
    with pytest.raises(TypeError, match="dtype"):
        nf4.dequantize_nf4(nf4.quantize_nf4(torch.ones(64)), dtype)


@pytest.mark.parametrize("blocksize, message", [
    (100, r"blocksize must be one of 32, 64, 128, 256, 512, 1024, 2048, 4096; got 100"),
    (16, r"blocksize must be an int.*32.*4096.*, got 16"), (8192, "got 8192"), (0, "got 0"),
    (-64, "got -64"), (64.0, r"blocksize must be an int.*, got 64\.0"), (True, "got True")])
def test_disallowed_blocksize_is_a_value_error(blocksize, message):
    with pytest.raises(ValueError, match=message):
        nf4.quantize_nf4(torch.ones(64), blocksize)
    with pytest.raises(ValueError, match="my_blocksize must be"):
        checks.check_blocksize(blocksize, nf4.ALLOWED_BLOCKSIZES, "my_blocksize")
    assert checks.check_blocksize(64, nf4.ALLOWED_BLOCKSIZES) == 64


def test_both_code_tables_are_what_quantize_blockwise_assumes():
    """quantize_blockwise is the math alone (no checks): its `code` must be float32 and strictly
    increasing, which the two tables the module passes it are (it takes no other from a user)."""
    for code in (nf4.nf4_code(), nf4.dynamic_code()):
        assert code.dtype == torch.float32 and code.dim() == 1
        assert bool((code.diff() > 0).all())


# ----------------------------------------------------------------------------- bad input (issue 17)
def test_meta_tensors_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match="w is a meta tensor"):
        nf4.quantize_nf4(torch.empty(4, 64, device="meta"))
    q = nf4.quantize_nf4(torch.randn(4, 64))
    meta = {name: torch.empty_like(t, device="meta") for name, t in q.tensors().items()}
    with pytest.raises(ValueError, match="packed is a meta tensor"):
        nf4.NF4Weight.from_tensors(meta, **q.metadata())
    unchecked = nf4.NF4Weight.from_tensors(meta, **q.metadata(), check_values=False)
    with pytest.raises(ValueError, match="q.packed is a meta tensor"):
        nf4.dequantize_nf4(unchecked)


@pytest.mark.parametrize("double_quant", ["yes", 1, None, 0.0])
def test_double_quant_must_be_a_bool(double_quant):
    with pytest.raises(TypeError, match="double_quant must be a bool"):
        nf4.quantize_nf4(torch.randn(64), 64, double_quant)


@pytest.mark.parametrize("q", [torch.zeros(64, dtype=torch.uint8), None, {"packed": 1}])
def test_dequantize_needs_an_nf4_weight(q):
    with pytest.raises(TypeError,
                       match="q must be an instance of NF4Weight \\(from quantize_nf4\\), got"):
        nf4.dequantize_nf4(q)


@pytest.mark.parametrize("name", ["absmax", "nested_absmax", "offset"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_stored_scales_are_refused_naming_the_tensor(name, bad):
    double_quant = name != "absmax"
    q = nf4.quantize_nf4(torch.randn(3, 100), 64, double_quant)
    tensors = {k: t.clone() for k, t in q.tensors().items()}
    tensors[name].view(-1)[-1] = bad
    with pytest.raises(ValueError, match=f"^{name} contains NaN or Inf"):
        nf4.NF4Weight.from_tensors(tensors, **q.metadata())
    with pytest.raises(ValueError, match=f"^{name} contains NaN or Inf"):
        nf4.NF4Weight(*(tensors.get(k) for k in nf4.NF4Weight.TENSOR_FIELDS), **q.metadata())
    # a caller that checked the tensors when they entered can skip the check on a rebuild
    assert nf4.NF4Weight.from_tensors(tensors, **q.metadata(), check_values=False).numel == 300


def test_wrong_nested_blocksize_is_refused():
    q = nf4.quantize_nf4(torch.randn(100), 32)
    with pytest.raises(ValueError, match="nested_blocksize must be one of None, 256"):
        nf4.NF4Weight.from_tensors(q.tensors(), **{**q.metadata(), "nested_blocksize": 128})


# ----------------------------------------------------------------------------- bitsandbytes oracle
@pytest.fixture(scope="module")
def bnb():
    bnb = pytest.importorskip("bitsandbytes")
    # bitsandbytes wraps its fallback 4-bit dequantizer (odd last dimension) in torch.compile; eager
    # mode runs the same float32 operations, without compile time that would dominate this file.
    with torch._dynamo.config.patch(disable=True):
        yield bnb


def bnb_quantize(bnb, w, blocksize, double_quant):
    packed, state = bnb.functional.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                                 compress_statistics=double_quant)
    return packed, state


def bnb_dequantize(bnb, packed, state, shape):
    """bitsandbytes' dequantization of the flattened tensor, reshaped.

    Its AVX-512 CPU kernel (taken when the last dimension is a multiple of 16) looks up the scale of
    row r, column c at absmax[r * (cols // blocksize) + c // blocksize], which is wrong when blocks
    cross rows: (8, 32) with blocksize 64 comes back with the wrong scales (bitsandbytes 0.50.2).
    On a single row that lookup is right, so the oracle is bnb's dequantization of the flattened
    tensor.
    """
    flat_state = copy.copy(state)
    flat_state.shape = torch.Size([math.prod(shape)])
    return bnb.functional.dequantize_4bit(packed, flat_state).reshape(shape)


def bnb_handles_shape(shape, blocksize):
    """Where bitsandbytes' own n-D dequantization is right on every CPU (see bnb_dequantize)."""
    return len(shape) > 0 and (shape[-1] % blocksize == 0 or shape[-1] % 16 != 0)


def nf4_weight_from_bnb(packed, state, shape, double_quant):
    nested = (None,) * 3
    if double_quant:
        nested = (state.state2.absmax, state.offset, nf4.NESTED_BLOCKSIZE)
    return nf4.NF4Weight(packed.reshape(-1), state.absmax, nested[0], nested[1], shape, state.dtype,
                         state.blocksize, nested[2])


def assert_nested_codes_nearest(ours, theirs, scales, q):
    """bitsandbytes' CPU code picks the 8-bit code through a 65,536-bin table, which misses the
    exact nearest code for about 0.15% of scales: ours must be at least as near everywhere."""
    dynamic = nf4.dynamic_code().double()
    nested = per_element_absmax(q.nested_absmax.double(), nf4.NESTED_BLOCKSIZE, scales.numel())
    target = (scales.double() - q.offset.double()) / nested.clamp(min=nf4.ABSMAX_FLOOR)
    our_distance = (dynamic[ours.long()] - target).abs()
    their_distance = (dynamic[theirs.long()] - target).abs()
    assert bool((our_distance <= their_distance + 2.0**-22).all())
    # where a nested block's absmax is 0 (all its scales equal the mean) bnb writes code 0 and we
    # the code of 0.0; both dequantize to exactly the offset
    differ = (ours != theirs) & (nested != 0)
    return differ.double().mean().item()


def assert_same_as_bnb(q, packed, state, double_quant):
    """Our stored tensors against bitsandbytes': a differing byte is named with its block."""
    assert_same(q.packed, packed.reshape(-1), "packed bytes vs bitsandbytes",
                blocksize=q.blocksize // 2)  # B weights are B / 2 bytes
    if double_quant:
        assert_same(q.offset, state.offset, "offset vs bitsandbytes")
        # one per 256 scales: the index is the nested block
        assert_same(q.nested_absmax, state.state2.absmax, "nested_absmax vs bitsandbytes")
    else:
        assert_same(q.absmax, state.absmax, "absmax vs bitsandbytes (the index is the block)")


def test_code_tables_match_bitsandbytes(bnb):
    nf4_table = bnb.functional.get_4bit_type("nf4", device="cpu")[:16]
    assert_same(nf4.nf4_code(), nf4_table, "NF4 code vs bitsandbytes")
    assert_same(NF4_TABLE, nf4_table, "this file's NF4 table vs bitsandbytes")
    assert_same(nf4.dynamic_code(), bnb.functional.create_dynamic_map(signed=True),
                "dynamic map vs bitsandbytes")
    _, state = bnb_quantize(bnb, torch.randn(64), 64, True)
    assert_same(nf4.nf4_code(), state.code[:16], "NF4 code vs bitsandbytes' state")
    assert_same(nf4.dynamic_code(), state.state2.code, "dynamic map vs bitsandbytes' state")


# sizes below, equal to and not a multiple of the blocksize; odd and even last dimensions (bnb takes
# different dequantization paths for them); 1-D (bnb returns (1, n) there, its issue 2047) to 3-D
ORACLE_CASES = [((64,), 64), ((7,), 32), ((3, 100), 64), ((33, 65), 128), ((5, 4, 27), 32),
                ((3, 100), 4096), ((130, 64), 256), ((2, 2049), 2048)]


@pytest.mark.parametrize("shape, blocksize", ORACLE_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_same_bytes_as_bitsandbytes(bnb, shape, blocksize, dtype, double_quant):
    generator = torch.Generator().manual_seed(sum(shape) + blocksize)
    w = torch.randn(shape, generator=generator).to(dtype)
    packed, state = bnb_quantize(bnb, w, blocksize, double_quant)
    q = nf4.quantize_nf4(w, blocksize, double_quant)
    assert_same_as_bnb(q, packed, state, double_quant)
    if double_quant:
        scales = nf4.quantize_nf4(w, blocksize, False).absmax
        assert_nested_codes_nearest(q.absmax, state.absmax, scales, q)
    expected = bnb_dequantize(bnb, packed, state, shape)
    if not double_quant:
        assert_same(nf4.dequantize_nf4(q), expected, "dequantized vs bitsandbytes",
                    blocksize=blocksize)
    # our dequantizer on bitsandbytes' own state, nested codes included, gives its values exactly
    ours = nf4.dequantize_nf4(nf4_weight_from_bnb(packed, state, shape, double_quant))
    assert_same(ours, expected, "dequantized bnb state vs bitsandbytes", blocksize=blocksize)
    if bnb_handles_shape(shape, blocksize):
        assert_same(ours, bnb.functional.dequantize_4bit(packed, state).reshape(shape),
                    "dequantized bnb state vs bitsandbytes' n-D dequantization",
                    blocksize=blocksize)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_medium_matrix_matches_bitsandbytes(bnb, dtype):
    generator = torch.Generator().manual_seed(3)
    rows = torch.rand(256, 1, generator=generator) * 4 + 0.1  # varied row scales: varied absmax
    # 4000 blocks, 16 nested blocks, the last partial
    w = (torch.randn(256, 1000, generator=generator) * rows).to(dtype)
    packed, state = bnb_quantize(bnb, w, 64, True)
    q = nf4.quantize_nf4(w, 64, True)
    assert_same_as_bnb(q, packed, state, double_quant=True)
    scales = nf4.quantize_nf4(w, 64, False).absmax
    mismatch = assert_nested_codes_nearest(q.absmax, state.absmax, scales, q)
    assert mismatch < 0.01  # bitsandbytes reports ~0.15%
    expected = bnb.functional.dequantize_4bit(packed, state)  # 1000 % 16 != 0: bnb's scalar path
    ours = nf4.dequantize_nf4(nf4_weight_from_bnb(packed, state, w.shape, True))
    assert_same(ours, expected, "dequantized bnb state vs bitsandbytes", blocksize=64)


def test_ties_zero_blocks_and_partial_block_division_match_bitsandbytes(bnb):
    code = nf4.nf4_code()
    midpoints = (code[:-1] + code[1:]) / 2
    # absmax 1.0 makes the scaled values the midpoints themselves: each must take the lower code
    ties = torch.cat([torch.tensor([1.0]), midpoints, -midpoints, torch.zeros(64 - 32),
                      torch.tensor([-0.0])])
    # a partial last block where x * (1/a) and x / a fall on opposite sides of the lowest midpoint
    a, x = float.fromhex("0x1.400f4ep+2"), -float.fromhex("0x1.0f7108p+2")
    a32, x32 = torch.tensor(a), torch.tensor(x)
    assert bool(x32 * a32.reciprocal() <= midpoints[0]) != bool(x32 / a32 <= midpoints[0])
    w = torch.cat([ties, torch.zeros(64), torch.tensor([a, x, a, x]), torch.zeros(60),
                   torch.tensor([a, x])])
    packed, state = bnb_quantize(bnb, w, 64, False)
    q = nf4.quantize_nf4(w, 64, False)
    assert_same_as_bnb(q, packed, state, double_quant=False)
    indices = nf4.unpack_nibbles(q.packed, w.numel())
    assert_same(indices[1:16].long(), torch.arange(15), "k of the midpoints (the lower code)")
    assert indices[129] != indices[193]  # same values, full block multiplies, partial block divides
    assert state.absmax[1] == 0 and bool((nf4.dequantize_nf4(q)[64:128] == 0).all())
    # all-zero blocks: bnb's 4-bit path stores absmax 0 for a full block, 1e-38 for a partial one
    zeros = torch.zeros(3, 70)
    packed, state = bnb_quantize(bnb, zeros, 64, False)
    q = nf4.quantize_nf4(zeros, 64, False)
    assert_same_as_bnb(q, packed, state, double_quant=False)
    assert q.absmax.tolist() == [0.0, 0.0, 0.0, torch.tensor(nf4.ABSMAX_FLOOR).item()]
    packed, state = bnb_quantize(bnb, zeros, 64, True)
    q = nf4.quantize_nf4(zeros, 64, True)
    assert_same(q.packed, packed.reshape(-1), "packed bytes vs bitsandbytes", blocksize=32)
    assert_same(q.offset, state.offset, "offset vs bitsandbytes")
    assert bool((nf4.dequantize_nf4(q) == 0).all())


@settings(max_examples=15)
@given(weights(max_numel=2000), blocksizes, st.booleans())
def test_random_weights_match_bitsandbytes(bnb, w, blocksize, double_quant):
    packed, state = bnb_quantize(bnb, w, blocksize, double_quant)
    q = nf4.quantize_nf4(w, blocksize, double_quant)
    assert_same_as_bnb(q, packed, state, double_quant)
    expected = bnb_dequantize(bnb, packed, state, w.shape)
    ours = nf4.dequantize_nf4(nf4_weight_from_bnb(packed, state, w.shape, double_quant))
    assert_same(ours, expected, "dequantized bnb state vs bitsandbytes", blocksize=blocksize)
