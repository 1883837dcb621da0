"""The shared argument checkers: accepted values pass through, refused ones name the argument."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import checks


@given(st.integers(-5, 5))
def test_check_int_bounds(value):
    if value >= 1:
        assert checks.check_int(value, "r", low=1) == value
    else:
        with pytest.raises(ValueError, match=r"^r must be an int >= 1, got"):
            checks.check_int(value, "r", low=1)


@pytest.mark.parametrize("bad", [True, 1.0, "1", None])
def test_check_int_refuses_non_ints(bad):
    with pytest.raises(ValueError, match="steps must be an int"):
        checks.check_int(bad, "steps")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, True, "0.1", None])
def test_check_number_refuses_non_finite_and_non_numbers(bad):
    with pytest.raises(ValueError, match=r"lr must be a finite number in \[0, inf\)"):
        checks.check_number(bad, "lr", low=0)


def test_check_number_open_and_closed_bounds():
    assert checks.check_number(0.0, "x", low=0) == 0.0
    with pytest.raises(ValueError, match=r"x must be a finite number in \(0, inf\)"):
        checks.check_number(0.0, "x", low=0, low_open=True)
    assert checks.check_probability(0.0, "dropout") == 0.0
    with pytest.raises(ValueError, match=r"dropout must be a finite number in \[0.0, 1.0\)"):
        checks.check_probability(1.0, "dropout")


def test_check_bool_and_choice():
    assert checks.check_bool(False, "double_quant") is False
    with pytest.raises(TypeError, match="double_quant must be a bool"):
        checks.check_bool("yes", "double_quant")
    assert checks.check_choice("adamw", "optimizer", ("adamw", "paged")) == "adamw"
    with pytest.raises(ValueError, match="optimizer must be one of 'adamw', 'paged'; got 'sgd'"):
        checks.check_choice("sgd", "optimizer", ("adamw", "paged"))


def test_check_tensor():
    t = torch.ones(2, 3)
    assert checks.check_tensor(t, "w", dtypes=(torch.float32,), ndim=2, finite=True) is t
    with pytest.raises(TypeError, match="w must be a torch.Tensor, got list"):
        checks.check_tensor([1.0], "w")
    with pytest.raises(TypeError, match="w must have dtype torch.float16, got torch.float32"):
        checks.check_tensor(t, "w", dtypes=(torch.float16,))
    with pytest.raises(ValueError, match=r"w must be 1-D, got shape \(2, 3\)"):
        checks.check_tensor(t, "w", ndim=1)
    with pytest.raises(ValueError, match="w contains NaN or Inf"):
        checks.check_tensor(torch.tensor([1.0, math.nan]), "w", finite=True)
    with pytest.raises(ValueError, match="w is a meta tensor"):
        checks.check_tensor(torch.empty(2, device="meta"), "w")


def test_check_int_with_both_bounds_names_the_interval():
    assert checks.check_int(3, "top_k", low=1, high=5) == 3
    with pytest.raises(ValueError, match=r"^top_k must be an int in \[1, 5\], got 6$"):
        checks.check_int(6, "top_k", low=1, high=5)
    with pytest.raises(ValueError, match=r"^n must be an int <= 5, got 6$"):
        checks.check_int(6, "n", high=5)


@pytest.mark.parametrize("x, error, message", [
    (torch.tensor(1.0), ValueError, r"x must be a tensor of shape \(\.\.\., in_features=4\), got "
                                    r"shape \(\)"),
    (torch.ones(2, 3), ValueError, r"in_features=4\), got shape \(2, 3\)"),
    (torch.ones(2, 4, dtype=torch.long), TypeError, "floating-point tensor .* got torch.int64"),
    ([1.0] * 4, TypeError, "floating-point tensor .* got list")])
def test_check_features_names_the_shape_a_linear_layer_takes(x, error, message):
    with pytest.raises(error, match=message):
        checks.check_features(x, 4)
    assert checks.check_features(torch.ones(3, 2, 4), 4).shape == (3, 2, 4)
