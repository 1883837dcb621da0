"""oracle_kit/guards.py through the checkers: the round-2 probes. A candidate that returns right
outputs but writes into its inputs fails, naming the input and its first changed element; an
output on the wrong device, of the wrong shape or on the meta device is named as such (not as
"fn raised"); device="cuda" without CUDA is the caller's error, raised before any candidate runs."""
import pytest
import torch

import lora
import nf4
import oracle
import paged_optim
from oracle_kit import guards

FAST = dict(examples=0)  # the explicit cases only: each probe fails on the first of them


def test_quantize_that_zeroes_its_input_fails_naming_w():
    def zeroes_w(w, blocksize, double_quant):
        result = nf4.quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
        w.zero_()
        return result
    with pytest.raises(AssertionError,
                       match=r"fn changed its input w: at index \(0,\) it was 0.0625, now 0.0"):
        oracle.check_nf4_quantize(zeroes_w, **FAST)


def test_dequantize_that_zeroes_absmax_fails_naming_q_absmax():
    def zeroes_absmax(q, dtype):
        result = nf4.dequantize_nf4(q, dtype)
        q.absmax.zero_()
        return result
    with pytest.raises(AssertionError, match=r"fn changed its input q\.absmax: at index \(0,\)"):
        oracle.check_nf4_dequantize(zeroes_absmax, **FAST)


@pytest.mark.parametrize("gradients", [True, False])
def test_lora_that_fills_its_bias_with_nan_fails_naming_bias(gradients):
    def nan_bias(x, weight, bias, A, B, scaling):
        y = lora.lora_forward(x, weight, bias, A, B, scaling)
        if bias is not None:
            bias.fill_(float("nan"))
        return y
    with pytest.raises(AssertionError, match=r"fn changed its input bias: at index \(0,\) it was "
                                             r"[-0-9.e]+, now nan"):
        oracle.check_lora_forward(nan_bias, gradients=gradients, **FAST)


def test_lora_that_zeroes_its_weight_without_gradients_fails_naming_weight():
    def zero_weight(x, weight, bias, A, B, scaling):
        y = lora.lora_forward(x, weight, bias, A, B, scaling)
        weight.zero_()
        return y
    with pytest.raises(AssertionError, match="fn changed its input weight: at index"):
        oracle.check_lora_forward(zero_weight, gradients=False, **FAST)


def test_adamw_that_nans_grad_fails_naming_the_step():
    def nan_grad(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
        paged_optim.adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps,
                               weight_decay)
        grad.fill_(float("nan"))
    with pytest.raises(AssertionError, match=r"fn changed its input grad \(step 1\): at index"):
        oracle.check_adamw_step(nan_grad, **FAST)


def test_outputs_are_checked_for_device_and_shape_before_values():
    def on_meta(x, weight, bias, A, B, scaling):
        return lora.lora_forward(x, weight, bias, A, B, scaling).to("meta")

    def flattened(x, weight, bias, A, B, scaling):
        return lora.lora_forward(x, weight, bias, A, B, scaling).reshape(-1)
    for fn, where in ((on_meta, "on meta"), (flattened, "on cpu")):
        for gradients in (True, False):
            with pytest.raises(AssertionError) as error:
                oracle.check_lora_forward(fn, gradients=gradients, **FAST)
            assert "fn raised" not in str(error.value)
            assert "y: expected " in str(error.value) and where in str(error.value)

    def dequantize_on_meta(q, dtype):
        return nf4.dequantize_nf4(q, dtype).to("meta")
    with pytest.raises(AssertionError, match=r"dequantized: expected on cpu, where the inputs "
                                             r"are, got torch\.\w+ \([\d, ]+\) on meta"):
        oracle.check_nf4_dequantize(dequantize_on_meta, **FAST)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_setup_error_before_any_candidate_runs():
    called = []

    def candidate(q, dtype):
        called.append(1)
        return nf4.dequantize_nf4(q, dtype)
    for check in (oracle.check_nf4_dequantize, lambda fn, **options: oracle.check_case(
            "nf4_dequantize", fn, {"rows": 1, "cols": 64, "blocksize": 64, "double_quant": False,
                                   "dtype": "float32", "values": "normal", "seed": 0}, **options)):
        with pytest.raises(RuntimeError, match="device 'cuda': CUDA is not available on this "
                                               "machine; this is the checker's setup"):
            check(candidate, device="cuda")
    assert not called


def test_first_change_compares_bits_and_the_reference_passes_untouched():
    original = torch.tensor([0.0, 1.0, float("nan")])
    assert guards.first_change("t", original, original.clone()) is None  # NaN equals its bits
    changed = original.clone()
    changed[0] = -0.0
    assert guards.first_change("t", original, changed).startswith(
        "fn changed its input t: at index (0,) it was 0.0, now -0.0 (1 of 3 elements changed)")
    oracle.check_lora_forward(lora.lora_forward, **FAST)
    oracle.check_adamw_step(paged_optim.adamw_step, **FAST)
