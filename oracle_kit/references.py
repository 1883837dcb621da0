"""The contracts the oracle kit checks: each one's reference function, how a contract calls a
function on its inputs, the reference's expected outputs and their tolerances.

oracle.py (the checkers) and oracle_kit/golden.py (the golden files) both build on this module,
so neither imports the other. The references are the plain functions of the concept modules:
nf4.py (QLoRA, arXiv:2305.14314, sec. 3), lora.py (arXiv:2106.09685, eq. 3), dora.py
(arXiv:2402.09353, eq. 5, the norm detached as in sec. 4.3), vera.py (arXiv:2310.11454, eq. 2)
and paged_optim.py (AdamW, arXiv:1711.05101, Algorithm 2, in torch.optim.AdamW's order).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

import dora
import lora
import nf4
import paged_optim
import vera

# The reference of each contract, called directly.
REFERENCES = {
    "nf4_quantize": nf4.quantize_nf4,
    "nf4_dequantize": nf4.dequantize_nf4,
    "lora_forward": lora.lora_forward,
    "dora_forward": dora.dora_forward,
    "vera_forward": vera.vera_forward,
    "adamw_step": paged_optim.adamw_step,
}
# Its name, as messages and the golden files' manifest.json write it ("nf4.quantize_nf4").
FUNCTIONS = {contract: f"{fn.__module__}.{fn.__name__}" for contract, fn in REFERENCES.items()}

# Tolerance, a multiple of the largest sum of absolute terms of each output (the formula on the
# inputs' absolute values): n products summed in any order err by about sqrt(n) u that sum (u = eps
# / 2), whatever the cancellation. float32, n <= 13 here: ~2e-7; 1e-6 leaves room, while one stray
# 16-bit rounding (4e-3) fails. A 16-bit base: its GEMM rounds to 16 bits, the adapter sum once
# more: 2u = eps, for every output of the case (float32 gradients too: they see the rounded W0 x).
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}

ADAPTER_ARGS = {
    "lora_forward": ("x", "weight", "bias", "A", "B", "scaling"),
    "dora_forward": ("x", "weight", "bias", "A", "B", "magnitude", "scaling"),
    "vera_forward": ("x", "weight", "bias", "A", "B", "lambda_d", "lambda_b"),
}
# The inputs whose gradients are checked.
TRAINED = {
    "lora_forward": ("x", "A", "B"),
    "dora_forward": ("x", "A", "B", "magnitude"),
    "vera_forward": ("x", "lambda_d", "lambda_b"),
}


class Mismatch(AssertionError):
    """The candidate disagrees with the reference on one case."""


def run_contract(contract: str, fn, inputs: dict, gradients: bool = True) -> dict:
    """fn applied to `inputs` as the contract calls it: the outputs by name, as given."""
    if contract == "nf4_quantize":
        result = fn(inputs["w"], blocksize=inputs["blocksize"], double_quant=inputs["double_quant"])
        if isinstance(result, nf4.NF4Weight):
            return result.tensors()
        if not isinstance(result, Mapping):
            raise Mismatch(f"returned {type(result).__name__}: expected an nf4.NF4Weight or a "
                           "mapping with packed, absmax, nested_absmax, offset")
        return {name: result[name] for name in nf4.NF4Weight.TENSOR_FIELDS
                if result.get(name) is not None}
    if contract == "nf4_dequantize":
        return {"dequantized": fn(inputs["q"], inputs["dtype"])}
    if contract == "adamw_step":
        param = inputs["param"].clone()
        exp_avg = inputs["exp_avg"].clone()
        exp_avg_sq = inputs["exp_avg_sq"].clone()
        # grads is (steps, *shape): one call per step
        for i, grad in enumerate(inputs["grads"]):
            fn(param, grad.clone(), exp_avg, exp_avg_sq, inputs["step"] + i, inputs["lr"],
               inputs["betas"], inputs["eps"], inputs["weight_decay"])
        return {"param_after": param, "exp_avg_after": exp_avg, "exp_avg_sq_after": exp_avg_sq}
    trained = TRAINED[contract] if gradients else ()
    leaves = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().clone().requires_grad_(name in trained)
        leaves[name] = value
    y = fn(*(leaves[name] for name in ADAPTER_ARGS[contract]))
    if not trained or not isinstance(y, torch.Tensor):
        return {"y": y}
    if not y.requires_grad:
        raise Mismatch("y does not require grad: fn must be differentiable by torch.autograd (a "
                       "custom backward in a torch.autograd.Function), or pass gradients=False")
    y.backward(leaves["grad_out"])
    return {"y": y.detach(), **{f"grad_{name}": leaves[name].grad for name in trained}}


def exact_inputs(inputs: dict, absolute: bool = False) -> dict:
    """The inputs in float64 on the CPU (their absolute values if `absolute`)."""
    def convert(value):
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().double()
            return value.abs() if absolute else value
        if absolute and isinstance(value, (int, float)):
            return abs(value)
        return value

    return {name: convert(value) for name, value in inputs.items()}


def expected_outputs(contract: str, inputs: dict, gradients: bool = True) -> dict:
    """The reference's outputs on the CPU: float64 exact values for the adapters, else bits."""
    reference = REFERENCES[contract]
    if contract in ADAPTER_ARGS:
        return run_contract(contract, reference, exact_inputs(inputs), gradients)
    if contract == "adamw_step":
        # torch's operation order on the inputs' own device
        outputs = run_contract(contract, reference, inputs)
        return {name: value.cpu() for name, value in outputs.items()}
    on_cpu = {}
    for name, value in inputs.items():
        if isinstance(value, (torch.Tensor, nf4.NF4Weight)):
            value = value.to("cpu")
        on_cpu[name] = value
    return run_contract(contract, reference, on_cpu)


def adapter_tolerances(contract: str, inputs: dict, expected: dict, gradients=True) -> dict:
    """atol of each output: TOLERANCE[base dtype] x its largest sum of absolute terms (above); for
    DoRA also x the condition of the row norms, max ||(|W0| + s |B| |A|)_i|| / ||V_i||: cancellation
    in V = W0 + s B A leaves ||V|| relatively inexact, and it divides every output."""
    exact = exact_inputs(inputs)
    absolute = exact_inputs(inputs, absolute=True)
    on_absolute = run_contract(contract, REFERENCES[contract], absolute, gradients)
    tolerance = TOLERANCE[inputs["weight"].dtype]
    if contract == "dora_forward":
        # (out,) each; a zero row of V is 0 / 0 -> 0
        norms = [torch.linalg.vector_norm(t["weight"] + t["scaling"] * t["B"] @ t["A"], dim=1)
                 for t in (exact, absolute)]
        condition = norms[1] / norms[0].clamp_min(dora.DORA_NORM_EPS)
        tolerance *= max(1.0, condition.max().item())
    atol = {}
    for name in expected:
        if expected[name].numel():
            largest = max(expected[name].abs().max().item(),
                          on_absolute[name].abs().max().item(), 0.0)
            atol[name] = tolerance * largest
    return atol


def raw_bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of t, flattened, as int64: equal only where the bits are (-0.0 != 0.0)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    integer = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()]
    return t.view(integer).long()
