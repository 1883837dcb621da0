"""Tests for papers/four_bit.py: FP4 and Int4 round trips, ties, bad input, and bitsandbytes' FP4.

Tolerances: none. Codes, bytes, absmax and dequantized values are compared bit for bit
(assert_same), since both formats are a lookup and one float32 product; the error bound of a
round trip is the half-gap to the nearest level, checked per element in float64.
"""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import nf4
from assertions import assert_same
from papers import four_bit

# bitsandbytes' FP4 table (get_4bit_type("fp4"), 0.50.2) in nibble order, written as fractions of
# 12 so that the test does not reuse four_bit.fp4_magnitude; nibble 0b1000 is +0.0 there too.
FP4_TABLE = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3],
                         dtype=torch.float32) / 12
INT4_TABLE = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1],
                          dtype=torch.float32) / 7
QUANTIZE = {"fp4": four_bit.quantize_fp4, "int4": four_bit.quantize_int4}
USED_NIBBLES = {"fp4": range(16), "int4": [n for n in range(16) if n != 8]}  # int4 writes no -8


def nibbles(q):
    return nf4.unpack_nibbles(q.packed, q.numel)


def test_code_tables():
    assert_same(four_bit.fp4_code(), FP4_TABLE)
    assert_same(four_bit.int4_code(), INT4_TABLE)
    assert not torch.signbit(four_bit.fp4_code()[8])  # +0.0, as bitsandbytes' table


@pytest.mark.parametrize("quant_type", QUANTIZE)
def test_every_code_value_maps_to_itself(quant_type):
    """A block holding every level (and +-1 so that c = 1) quantizes to those nibbles exactly."""
    table = FP4_TABLE if quant_type == "fp4" else INT4_TABLE
    used = list(USED_NIBBLES[quant_type])
    values = torch.cat([table[used], torch.tensor([1.0, -1.0])])  # c_b = 1: s = w exactly
    q = QUANTIZE[quant_type](values, blocksize=32)
    got = nibbles(q)[: len(used)]
    expected = torch.tensor(used, dtype=torch.uint8)
    if quant_type == "fp4":  # both zeros quantize to 0b0000 (s = 0 is at the midpoint 0: lower)
        expected[8] = 0
    assert_same(got, expected)
    assert_same(four_bit.dequantize_4bit(q), values)


@given(scale_exponent=st.integers(-40, 40), sign=st.sampled_from([1.0, -1.0]))
def test_every_code_value_maps_to_itself_at_any_scale(scale_exponent, sign):
    """Levels times c = 2^e: s is the level exactly, and dequantize returns the input's bits."""
    for quant_type, table in (("fp4", FP4_TABLE), ("int4", INT4_TABLE)):
        values = torch.cat([table[list(USED_NIBBLES[quant_type])], torch.tensor([sign])])
        w = values * 2.0**scale_exponent
        assert_same(four_bit.dequantize_4bit(QUANTIZE[quant_type](w, 32)), w)


def test_fp4_ties_go_to_the_lower_value_and_zero_sides():
    """s exactly on a float32 midpoint takes the lower value; tiny s of either sign: 0b1000 for
    s > 0 and 0b0000 for s <= 0 (bitsandbytes' sort puts 0b0000 first; both are 0)."""
    sorted_values = FP4_TABLE[[11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3]]
    midpoints = (sorted_values[:-1] + sorted_values[1:]) / 2
    lower = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2]  # the lower value's nibble
    w = torch.cat([midpoints, torch.tensor([1e-4, -1e-4, 0.0, -0.0, 1.0])])
    got = nibbles(four_bit.quantize_fp4(w, blocksize=32))[: len(midpoints) + 4]
    assert_same(got, torch.tensor(lower + [8, 0, 0, 0], dtype=torch.uint8))
    just_above = torch.cat([torch.nextafter(midpoints, torch.tensor(2.0)), torch.tensor([1.0])])
    got = nibbles(four_bit.quantize_fp4(just_above, blocksize=32))[:-1]
    upper = [10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3]  # just above 0: 0b1000
    assert_same(got, torch.tensor(upper, dtype=torch.uint8))


def test_int4_ties_go_towards_zero_symmetrically():
    """s exactly on (k + 1/2) / 7 in float32 takes level k (towards zero), and -s level -k."""
    levels = torch.arange(8, dtype=torch.float32) / 7
    midpoints = (levels[:-1] + levels[1:]) / 2  # (7,) the float32 ties
    w = torch.cat([midpoints, -midpoints, torch.tensor([1.0])])
    got = nibbles(four_bit.quantize_int4(w, blocksize=32))[:-1]
    k = torch.arange(7)
    assert_same(got, torch.cat([k, (-k) & 0x0F]).to(torch.uint8))
    above = torch.nextafter(midpoints, torch.tensor(2.0))
    w = torch.cat([above, -above, torch.tensor([1.0])])
    got = nibbles(four_bit.quantize_int4(w, blocksize=32))[:-1]
    assert_same(got, torch.cat([k + 1, (-k - 1) & 0x0F]).to(torch.uint8))


@pytest.mark.parametrize("quant_type", QUANTIZE)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_are_refused(quant_type, bad):
    w = torch.randn(100)
    w[37] = bad
    with pytest.raises(ValueError, match="w contains NaN or Inf"):
        QUANTIZE[quant_type](w)


@pytest.mark.parametrize("quant_type", QUANTIZE)
def test_bad_arguments(quant_type):
    with pytest.raises(TypeError, match="w must have dtype"):
        QUANTIZE[quant_type](torch.arange(64))
    with pytest.raises(ValueError, match="blocksize"):
        QUANTIZE[quant_type](torch.randn(64), blocksize=48)
    with pytest.raises(TypeError, match="q must be a FourBitWeight"):
        four_bit.dequantize_4bit(nf4.quantize_nf4(torch.randn(64)))


@given(n=st.integers(1, 700), blocksize=st.sampled_from([32, 64, 128, 256]),
       seed=st.integers(0, 2**31 - 1), quant_type=st.sampled_from(list(QUANTIZE)))
def test_round_trip_error_within_half_a_gap(n, blocksize, seed, quant_type):
    """|w - w^| <= c_b * (half the largest gap between neighbouring levels) + float32 slack:
    the nearest level is never further than that (float64 check; slack 2^-22 c_b covers the
    float32 rounding of s and of code * c)."""
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    q = QUANTIZE[quant_type](w, blocksize)
    table = (FP4_TABLE if quant_type == "fp4" else INT4_TABLE).double().unique()
    half_gap = float(table.diff().max()) / 2
    c = q.absmax.double().repeat_interleave(blocksize)[:n]
    error = (w.double() - four_bit.dequantize_4bit(q).double()).abs()
    assert bool((error <= c * (half_gap + 2.0**-22)).all())


@given(shape=st.lists(st.integers(1, 24), min_size=1, max_size=3),
       blocksize=st.sampled_from([32, 64, 128, 256, 1024, 4096]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       scale_exponent=st.integers(-4, 4), seed=st.integers(0, 2**31 - 1),
       zero_run=st.booleans())
def test_fp4_bytes_and_values_equal_bitsandbytes(shape, blocksize, dtype, scale_exponent, seed,
                                                 zero_run):
    """packed, absmax and the dequantized values bit for bit against bitsandbytes on the CPU
    (its torch route for quantize_4bit, its C loop or torch route for dequantize_4bit), but for
    the sign of a zero."""
    functional = pytest.importorskip("bitsandbytes.functional")
    n = math.prod(shape)
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 10.0**scale_exponent
    if zero_run:  # whole zero blocks and tiny values round to the two zeros
        w[: n // 2] = 0.0
        w[n // 2:: 3] *= 1e-4
    w = w.to(dtype).reshape(shape)
    # bitsandbytes gets w flattened (the bytes do not depend on the shape): its AVX-512 CPU
    # dequantizer looks up the wrong scales when blocks cross rows (0.50.2; tests/test_nf4.py's
    # bnb_dequantize says how), and it fails on a 3-D shape (1, ...)
    packed, state = functional.quantize_4bit(w.reshape(-1), blocksize=blocksize,
                                             quant_type="fp4")
    q = four_bit.quantize_fp4(w, blocksize)
    assert_same(q.packed, packed.view(-1), blocksize=blocksize // 2)
    assert_same(q.absmax, state.absmax)
    # bitsandbytes compiles its torch route (odd last dimension) with torch.compile; eager mode
    # runs the same float32 operations without the compile time (as tests/test_nf4.py)
    with torch._dynamo.config.patch(disable=True):
        expected = functional.dequantize_4bit(packed, state).reshape(shape)
    # The sign of zero aside: for nibble 0b1000 bitsandbytes' C loop (an even last dimension)
    # writes -0.0, its torch route (odd) +0.0, the value in its table and in ours. + 0.0 makes
    # -0.0 into +0.0 and changes no other value.
    assert_same(four_bit.dequantize_4bit(q), expected + 0.0)
