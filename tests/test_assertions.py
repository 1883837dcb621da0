"""The comparison helper tells wrong math from other rounding, and says where and by how much."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from assertions import assert_same, ulps


@given(st.floats(-2.0**100, 2.0**100, width=32).map(float), st.integers(1, 300))
def test_ulps_counts_the_floats_between(x, steps):
    a = torch.tensor([x], dtype=torch.float32)
    b = a.clone()
    for _ in range(steps):
        b = torch.nextafter(b, torch.tensor([math.inf]))
    assert int(ulps(a, b)) == steps


def test_ulps_across_zero():
    tiny = torch.nextafter(torch.tensor([0.0]), torch.tensor([1.0]))
    assert int(ulps(tiny, -tiny)) == 2
    assert int(ulps(torch.tensor([0.0]), torch.tensor([-0.0]))) == 0


def test_other_rounding_is_named_as_such():
    expected = torch.tensor([1.0, 2.0, 3.0])
    actual = expected.clone()
    actual[1] = torch.nextafter(actual[1], torch.tensor(5.0))
    with pytest.raises(AssertionError, match=r"(?s)right math, other rounding.*index \(1,\).*"
                                             r"1 ulps apart at most \(ulp: "):
        assert_same(actual, expected, "y")
    assert_same(actual, expected, "y", exact=False)  # within tolerance


def test_wrong_math_reports_index_values_and_largest_difference():
    expected = torch.zeros(2, 3)
    actual = expected.clone()
    actual[1, 2] = 0.5
    with pytest.raises(AssertionError, match=r"(?s)y: wrong.*1 of 6 elements differ; the first at "
                                             r"index \(1, 2\): got 0.5, expected 0.0.*largest "
                                             r"difference 0.5"):
        assert_same(actual, expected, "y")


def test_bytes_report_the_block():
    expected = torch.zeros(256, dtype=torch.uint8)
    actual = expected.clone()
    actual[100] = 7
    with pytest.raises(AssertionError, match=r"index \(100,\): got 7 \(0x07\), expected 0 "
                                             r"\(0x00\) \(block 3 of 32"):
        assert_same(actual, expected, "packed", blocksize=32)


def test_floats_report_the_block_too():
    expected = torch.ones(200)
    actual = expected.clone()
    actual[130] = torch.nextafter(actual[130], torch.tensor(2.0))  # other rounding: block 2 of 64
    with pytest.raises(AssertionError,
                       match=r"(?s)other rounding.*index \(130,\).*\(block 2 of 64"):
        assert_same(actual, expected, "w^", blocksize=64)
    actual[70] = 3.0  # wrong math, block 1 of 64
    with pytest.raises(AssertionError, match=r"(?s)wrong.*index \(70,\).*\(block 1 of 64"):
        assert_same(actual, expected, "w^", blocksize=64)


def test_shape_dtype_and_nan_handling():
    with pytest.raises(AssertionError, match=r"shape \(2,\), expected \(3,\)"):
        assert_same(torch.zeros(2), torch.zeros(3))
    with pytest.raises(AssertionError, match="dtype torch.float64, expected torch.float32"):
        assert_same(torch.zeros(2, dtype=torch.float64), torch.zeros(2))
    nan = torch.tensor([math.nan, 1.0])
    assert_same(nan, nan.clone())
    with pytest.raises(AssertionError, match="wrong"):
        assert_same(torch.tensor([math.nan, 1.0]), torch.tensor([0.0, 1.0]))
