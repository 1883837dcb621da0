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
from oracle_kit import contracts, guards

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
# more: 2u = eps, but only for the outputs that the rounded base reaches (BASE_ROUNDED); the
# adapters' own gradients never see it and keep float32's tolerance.
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
# The outputs that pass through the 16-bit base's rounding: y and dL/dx (returned in x's dtype,
# the frozen GEMM in the weight's), and DoRA's dL/dm = sum G (V x) / n, whose V x holds the rounded
# W0 x. The others (dL/dA, dL/dB, dL/dlambda) are float32 sums of exact 16-bit values.
BASE_ROUNDED = {
    "lora_forward": ("y", "grad_x"),
    "dora_forward": ("y", "grad_x", "grad_magnitude"),
    "vera_forward": ("y", "grad_x"),
}


class Mismatch(AssertionError):
    """The candidate disagrees with the reference on one case."""


def run_contract(contract: str, fn, inputs: dict, gradients: bool = True) -> dict:
    """fn applied to `inputs` as the contract calls it: the outputs by name, as given.

    fn gets its own copies of the inputs; an input it changes (in the call or in the backward
    pass) is a Mismatch naming the input and its first changed element (oracle_kit/guards.py).
    """
    if contract in ("nf4_quantize", "nf4_dequantize"):
        given = {name: guards.candidate_copy(value) for name, value in inputs.items()}
        outputs = _run_nf4(contract, fn, given)
        _refuse_changed_inputs(inputs, given)
        return outputs
    if contract == "adamw_step":
        return run_adamw_calls(fn, inputs)[-1]
    trained = TRAINED[contract] if gradients else ()
    leaves = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().clone().requires_grad_(name in trained)
        leaves[name] = value
    y = fn(*(leaves[name] for name in ADAPTER_ARGS[contract]))
    _refuse_changed_inputs(inputs, leaves)
    if not trained or not isinstance(y, torch.Tensor):
        return {"y": y}
    x = inputs["x"]
    problem = guards.placement_problem("y", y, x.device, x.dtype, inputs["grad_out"].shape)
    if problem:
        # before the backward pass, which would only crash on it
        raise Mismatch(problem)
    if not y.requires_grad:
        raise Mismatch("y does not require grad: fn must be differentiable by torch.autograd (a "
                       "custom backward in a torch.autograd.Function), or pass gradients=False")
    y.backward(leaves["grad_out"])
    # a backward pass that writes into an input
    _refuse_changed_inputs(inputs, leaves)
    return {"y": y.detach(), **{f"grad_{name}": leaves[name].grad for name in trained}}


def _refuse_changed_inputs(originals: dict, copies: dict) -> None:
    problems = guards.changed_inputs(originals, copies)
    if problems:
        raise Mismatch(problems[0])


def _run_nf4(contract: str, fn, inputs: dict) -> dict:
    if contract == "nf4_quantize":
        result = fn(inputs["w"], blocksize=inputs["blocksize"], double_quant=inputs["double_quant"])
        if isinstance(result, nf4.NF4Weight):
            return result.tensors()
        if not isinstance(result, Mapping):
            raise Mismatch(f"returned {type(result).__name__}: expected an nf4.NF4Weight or a "
                           "mapping with packed, absmax, nested_absmax, offset")
        return {name: result[name] for name in nf4.NF4Weight.TENSOR_FIELDS
                if result.get(name) is not None}
    return {"dequantized": fn(inputs["q"], inputs["dtype"])}


def run_adamw_calls(fn, inputs: dict) -> list:
    """fn called once per row of inputs["grads"] on copies of the state: the state after each."""
    param = inputs["param"].clone()
    exp_avg = inputs["exp_avg"].clone()
    exp_avg_sq = inputs["exp_avg_sq"].clone()
    states = []
    # grads is (steps, *shape): one call per step
    for i, grad in enumerate(inputs["grads"]):
        # fn's own grad, compared after the call: it must not change it
        given = grad.clone()
        fn(param, given, exp_avg, exp_avg_sq, inputs["step"] + i, inputs["lr"],
           inputs["betas"], inputs["eps"], inputs["weight_decay"])
        name = f"grad (step {i + 1})"
        _refuse_changed_inputs({name: grad}, {name: given})
        states.append({"param_after": param.clone(), "exp_avg_after": exp_avg.clone(),
                       "exp_avg_sq_after": exp_avg_sq.clone()})
    return states


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


def expected_outputs(contract: str, inputs: dict, gradients: bool = True, exact: bool = True,
                     got: dict | None = None) -> dict:
    """The reference's outputs on the CPU: float64 exact values for the adapters (and for AdamW
    with exact=False), else bits. NF4 double quantization: the nested codes and nested_absmax the
    reference makes of the offset in `got` (a candidate's), where it holds a float32 scalar."""
    reference = REFERENCES[contract]
    if contract in ADAPTER_ARGS:
        return run_contract(contract, reference, exact_inputs(inputs), gradients)
    if contract == "adamw_step":
        if not exact:
            final = contracts.adamw_exact_calls(inputs)[-1]
            return {name: value for name, (value, _) in final.items()}
        # torch's operation order on the inputs' own device
        outputs = run_contract(contract, reference, inputs)
        return {name: value.cpu() for name, value in outputs.items()}
    on_cpu = {}
    for name, value in inputs.items():
        if isinstance(value, (torch.Tensor, nf4.NF4Weight)):
            value = value.to("cpu")
        on_cpu[name] = value
    expected = run_contract(contract, reference, on_cpu)
    offset = (got or {}).get("offset")
    if contract == "nf4_quantize" and "offset" in expected and isinstance(offset, torch.Tensor) \
            and offset.dtype == torch.float32 and offset.numel() == 1:
        expected.update(contracts.nested_given_offset(on_cpu["w"], on_cpu["blocksize"], offset))
    return expected


def output_rules(contract: str, inputs: dict, expected: dict, gradients: bool = True,
                 exact: bool = True) -> dict:
    """How each output is compared, as the golden manifest states it: {"rule": "exact"} (bit for
    bit), {"rule": "exact_given_offset"} (bit for bit against what the reference makes of the
    candidate's offset), {"rule": "mean", "ulps": k} (within k ulps of the correctly rounded mean
    of the block scales), {"rule": "atol", "atol": a} (|got - exact| <= a); each with the dtype
    the candidate returns."""
    rules = {}
    if contract in ADAPTER_ARGS:
        atol = adapter_tolerances(contract, inputs, expected, gradients)
        for name in expected:
            source = inputs["x"] if name == "y" else inputs[name[len("grad_"):]]
            rules[name] = {"rule": "atol", "atol": atol.get(name, 0.0),
                           "dtype": str(source.dtype).replace("torch.", "")}
        return rules
    if contract == "adamw_step" and not exact:
        final = contracts.adamw_exact_calls(inputs)[-1]
        return {name: {"rule": "atol", "atol": bound.max().item() if bound.numel() else 0.0,
                       "dtype": "float32"} for name, (_, bound) in final.items()}
    for name, value in expected.items():
        rules[name] = {"rule": "exact", "dtype": str(value.dtype).replace("torch.", "")}
    if contract == "nf4_quantize" and "offset" in expected:
        w = inputs["w"].cpu()
        scales = nf4.quantize_nf4(w, inputs["blocksize"], double_quant=False).absmax
        rules["offset"].update(rule="mean", mean=contracts.correctly_rounded_mean(scales),
                               ulps=contracts.offset_tolerance_ulps(scales.numel()))
        rules["absmax"]["rule"] = rules["nested_absmax"]["rule"] = "exact_given_offset"
    return rules


def adapter_tolerances(contract: str, inputs: dict, expected: dict, gradients=True) -> dict:
    """atol of each output: TOLERANCE[base dtype] (float32's for an output the base's rounding does
    not reach, BASE_ROUNDED) x its largest sum of absolute terms (above); for
    DoRA also x the condition of the row norms, max ||(|W0| + s |B| |A|)_i|| / ||V_i||: cancellation
    in V = W0 + s B A leaves ||V|| relatively inexact, and it divides every output."""
    exact = exact_inputs(inputs)
    absolute = exact_inputs(inputs, absolute=True)
    on_absolute = run_contract(contract, REFERENCES[contract], absolute, gradients)
    base = TOLERANCE[inputs["weight"].dtype]
    condition = 1.0
    if contract == "dora_forward":
        # (out,) each; a zero row of V is 0 / 0 -> 0
        norms = [torch.linalg.vector_norm(t["weight"] + t["scaling"] * t["B"] @ t["A"], dim=1)
                 for t in (exact, absolute)]
        ratio = norms[1] / norms[0].clamp_min(dora.DORA_NORM_EPS)
        condition = max(1.0, ratio.max().item())
    atol = {}
    for name in expected:
        if expected[name].numel():
            largest = max(expected[name].abs().max().item(),
                          on_absolute[name].abs().max().item(), 0.0)
            rounded = name in BASE_ROUNDED[contract]
            atol[name] = (base if rounded else TOLERANCE[torch.float32]) * condition * largest
    return atol
