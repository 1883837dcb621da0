"""The oracle kit: check a faster implementation against this project's reference, in any language.

One checker per contract draws cases with Hypothesis (oracle_kit/cases.py; the cases that catch
known mistakes run first, whatever `examples` says), runs fn on inputs made on `device`, and raises
AssertionError with the failing case (a drawn one shrunk), the first differing element and the
lines that reproduce it; on success it returns what it tried. `derandomize=False`: new draws.
The contracts, their references and tolerances: oracle_kit/references.py. Golden files for other
languages: `python oracle.py golden DIR` and `verify DIR` (oracle_kit/golden.py). How to use it,
the tolerances and the traps: docs/oracle.md. The references are nf4.py (QLoRA, arXiv:2305.14314,
sec. 3), lora.py (arXiv:2106.09685, eq. 3: h = W0 x + b + s B A x), dora.py (arXiv:2402.09353,
eq. 5, the norm detached as in sec. 4.3), vera.py (arXiv:2310.11454, eq. 2:
h = W0 x + b + Λ_b B Λ_d A x) and AdamW (arXiv:1711.05101, Algorithm 2, torch.optim.AdamW's order).
"""
from __future__ import annotations

import sys

from hypothesis import HealthCheck, Phase, Verbosity, example, given, settings

from checks import check_bool, check_int
from oracle_kit import contracts, golden, guards
from oracle_kit.cases import EXAMPLES, STRATEGIES, case_inputs
from oracle_kit.comparing import compare_outputs, describe
from oracle_kit.references import (
    FUNCTIONS,
    REFERENCES,
    Mismatch,
    expected_outputs,
    output_rules,
    run_adamw_calls,
    run_contract,
)


# ----------------------------------------------------------------------------- one case
def _run(contract, fn, inputs, gradients):
    """The candidate's outputs on `inputs`, or the one line that says why there are none."""
    try:
        return run_contract(contract, fn, inputs, gradients), None
    except Mismatch as error:
        return None, str(error)
    except Exception as error:  # a crash on this case is a finding too
        return None, f"fn raised {type(error).__name__}: {error}".splitlines()[0]


def _diverged_call(fn, inputs, exact) -> str:
    """Which AdamW call of the case first breaks the contract (the state after each compared)."""
    theirs = run_adamw_calls(fn, inputs)
    if exact:
        ours = [{k: v.cpu() for k, v in state.items()}
                for state in run_adamw_calls(REFERENCES["adamw_step"], inputs)]
    else:
        ours = [{k: value for k, (value, _) in call.items()}
                for call in contracts.adamw_exact_calls(inputs)]
    for i, (want, have) in enumerate(zip(ours, theirs)):
        rules = output_rules("adamw_step", {**inputs, "grads": inputs["grads"][: i + 1]}, want,
                             exact=exact)
        if compare_outputs("adamw_step", want, have, inputs, rules):
            return (f"call {i + 1} of {len(theirs)} (step {inputs['step'] + i}) is the first "
                    f"whose state differs")
    return "every call alone agrees"  # only a candidate that behaves differently when re-run


def check_case(contract: str, fn, case: dict, device="cpu", gradients=True, exact=True) -> None:
    """Run one case of `contract` on fn; raise Mismatch (an AssertionError) if it disagrees."""
    device = guards.check_device(device)  # the caller's setup: an error, not a finding
    inputs = case_inputs(contract, case, device)
    got, problem = _run(contract, fn, inputs, gradients)
    expected = expected_outputs(contract, inputs, gradients, exact, got)
    rules = output_rules(contract, inputs, expected, gradients, exact)
    problems = [problem] if problem else compare_outputs(contract, expected, got, inputs, rules)
    if problems and contract == "adamw_step" and not problem:
        problems.append(_diverged_call(fn, inputs, exact))
        port = expected_outputs(contract, inputs, exact=False)
        if exact and not compare_outputs(contract, port, got, inputs,
                                         output_rules(contract, inputs, port, exact=False)):
            problems.append("within the port contract's bound (another order, float32 "
                            "hyperparameters, FMAs?): check_adamw_step(exact=False) accepts it")
    if problems:
        options = "" if gradients and exact else (
            f", exact={exact}" if contract == "adamw_step" else f", gradients={gradients}")
        raise Mismatch("\n  ".join([
            f"{FUNCTIONS[contract]} contract: the candidate differs on this case", f"case: {case}",
            "inputs: " + "; ".join(f"{k}: {describe(v)}" for k, v in inputs.items()),
            *problems, "reproduce:", "import oracle",
            f"inputs = oracle.case_inputs({contract!r}, {case}, device={device!r})",
            f"expected = oracle.expected_outputs({contract!r}, inputs)",
            f"oracle.check_case({contract!r}, candidate, {case}, device={device!r}{options})"]))


def _check(contract, fn, examples, device, derandomize, **options) -> dict:
    check_int(examples, "examples", low=0)
    check_bool(derandomize, "derandomize")
    guards.check_device(device)  # before any case: no CUDA is the caller's problem
    tried = {"cases": 0}

    def one_case(case):
        check_case(contract, fn, case, device, **options)
        tried["cases"] += 1
        for key, value in case.items():
            tried.setdefault(key, set()).add(value)

    test = given(case=STRATEGIES[contract]())(one_case)
    for case in reversed(EXAMPLES[contract]):
        test = example(case=case)(test)
    phases = tuple(Phase) if examples else (Phase.explicit,)
    test = settings(max_examples=max(examples, 1), derandomize=derandomize, database=None,
                    deadline=None, verbosity=Verbosity.quiet, report_multiple_bugs=False,
                    suppress_health_check=list(HealthCheck), phases=phases)(test)
    try:
        test()
    except Mismatch as error:  # Hypothesis re-raises the shrunk case's error
        raise AssertionError(str(error)) from None
    tried.pop("seed", None)
    return {key: sorted(v, key=lambda x: (str(type(x)), x)) if isinstance(v, set) else v
            for key, v in tried.items()}


# ----------------------------------------------------------------------------- the checkers
def check_nf4_quantize(fn, examples=50, device="cpu", derandomize=True) -> dict:
    """fn(w, blocksize=..., double_quant=...) -> NF4Weight, or a mapping with packed (any layout of
    the (n+1)//2 bytes, e.g. bitsandbytes' column), absmax (float32, or uint8 codes with
    double_quant), nested_absmax and offset (float32, with double_quant only).

    Tolerance: none for packed and the 4-bit absmax, byte for byte: a storage format, and each
    rule is exact in float32 (s = x * (1/absmax), x / absmax in a partial last block; the nearest
    code by float32 midpoints, a tie taking the lower code). The offset, the mean of the scales,
    within offset_tolerance_ulps(n) ulps of the correctly rounded mean (any summation order); the
    nested codes and nested_absmax exact given the candidate's own offset (docs/oracle.md).
    Draws w of 1-3 rows, 1-3 blocks or 300 and 700 (three nested blocks), every blocksize
    32..4096, float32/float16/bfloat16, values normal, heavy-tailed, on the 15 NF4 midpoints, zero
    blocks, on 84 midpoints of the 8-bit dynamic map, division ties in partial blocks and nested
    blocks.
    """
    return _check("nf4_quantize", fn, examples, device, derandomize)


def check_nf4_dequantize(fn, examples=50, device="cpu", derandomize=True) -> dict:
    """fn(q, dtype) -> tensor of q.shape in `dtype`.

    Tolerance: none, bit for bit: w^ = code[k] * absmax in float32 (with double quantization
    absmax = dynamic[c] * c1 + offset, two float32 roundings in that order), rounded once to dtype;
    a correct kernel has no other choice. Draws q quantized from the cases above, or random bytes
    and codes (every nibble and 8-bit code), with or without double_quant, any output dtype.
    """
    return _check("nf4_dequantize", fn, examples, device, derandomize)


def check_lora_forward(fn, examples=50, device="cpu", derandomize=True, gradients=True) -> dict:
    """fn(x, weight, bias, A, B, scaling) -> y = x W^T + b + scaling x A^T B^T, in x's dtype, for x
    (..., in), weight (out, in), bias (out,) or None, A (r, in), B (out, r); with `gradients`, also
    dL/dx, dL/dA, dL/dB through torch.autograd for a drawn dL/dy.

    Tolerance against float64 exact values: oracle_kit.references.TOLERANCE[dtype] x the largest
    sum of absolute terms of each output (any summation order passes, a 16-bit rounding too many in
    float32 does not), with the base's 16-bit dtype only for the outputs its rounding enters
    (references.BASE_ROUNDED: y, dL/dx); dL/dA and dL/dB keep float32's. Draws rank 1-4, widths
    1-9, leading dims (), (1,), (3,), (2, 3), bias or not, float32/float16/bfloat16 bases with
    float32 adapters, B not zero, five scalings.
    """
    return _check("lora_forward", fn, examples, device, derandomize, gradients=gradients)


def check_dora_forward(fn, examples=50, device="cpu", derandomize=True, gradients=True) -> dict:
    """fn(x, weight, bias, A, B, magnitude, scaling) -> y; gradients of x, A, B and magnitude.

    The contract (dora.dora_forward without dropout): V = W0 + scaling B A, for each output row i
    n_i = max(||V_i||, 1e-12), y = (magnitude / n) ⊙ (V x) + b (the bias is not rescaled); gradients
    treat n as a constant (the detached norm of section 4.3). magnitude (out,) has the adapters'
    dtype. Tolerance as check_lora_forward's times the condition of the row norms
    (oracle_kit.references.adapter_tolerances: n divides every output). Draws as LoRA's, plus a
    zero row of V (no NaN).
    """
    return _check("dora_forward", fn, examples, device, derandomize, gradients=gradients)


def check_vera_forward(fn, examples=50, device="cpu", derandomize=True, gradients=True) -> dict:
    """fn(x, weight, bias, A, B, lambda_d, lambda_b) -> y = x W^T + b + Λ_b B Λ_d A x per row, with
    A (r, in) and B (out, r) the layer's slices of the frozen shared pair, lambda_d (r,), lambda_b
    (out,), no alpha; gradients of x, lambda_d, lambda_b. Tolerance and draws as LoRA's.
    """
    return _check("vera_forward", fn, examples, device, derandomize, gradients=gradients)


def check_adamw_step(fn, examples=50, device="cpu", derandomize=True, exact=True) -> dict:
    """fn(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay) updates the three
    tensors in place; it is called 1-3 times in a row, step counting from 1.

    exact=True: none, torch.optim.AdamW's order, each operation rounded to float32 on the inputs'
    device (paged_optim.adamw_step, bit-equal to torch.optim.AdamW(foreach=False)):
    param *= 1 - lr wd; exp_avg.lerp_(g, 1 - beta1); exp_avg_sq = beta2
    exp_avg_sq + (1 - beta2) g g; param -= lr / (1 - beta1^t) * exp_avg / (sqrt(exp_avg_sq) /
    sqrt(1 - beta2^t) + eps). exact=False, the port contract: within a derived float32 error
    bound of the exact float64 values (oracle_kit/contracts.py; float32 hyperparameters, folded
    decay, FMAs, any correct sqrt pass; algorithmic mistakes do not). A failure names the first
    call that diverged. Draws float32 parameters up to 3x17, step 1 (zero state) to 10^6,
    normal, large, zero and tiny gradients (eps dominates the denominator), decay on and off.
    """
    return _check("adamw_step", fn, examples, device, derandomize, exact=exact)


if __name__ == "__main__":
    # python oracle.py golden DIR | verify DIR: see oracle_kit/golden.py
    sys.exit(golden.main(sys.argv[1:]))
