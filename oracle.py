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

import math
import sys

import torch
from hypothesis import HealthCheck, Phase, Verbosity, example, given, settings

import nf4
from checks import check_bool, check_int
from oracle_kit import golden
from oracle_kit.cases import EXAMPLES, STRATEGIES, case_inputs
from oracle_kit.references import (
    ADAPTER_ARGS,
    FUNCTIONS,
    Mismatch,
    adapter_tolerances,
    expected_outputs,
    raw_bits,
    run_contract,
)

# check_adamw_step(exact=False): the same AdamW arithmetic in another order (bias corrections on the
# moments, fused multiply-adds) errs by a few float32 ulps a call; 1e-5 of the update is ~80 ulps
INEXACT_RTOL = 1e-5


# ----------------------------------------------------------------------------- comparing
def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of t as ordered integers: adjacent floats differ by 1 (-0.0 and 0.0: 0)."""
    bits = raw_bits(t)
    if not t.is_floating_point():
        return bits
    return torch.where(bits < 0, -(bits + (1 << (8 * t.element_size() - 1))), bits)


def _where(contract, name, flat, inputs) -> str:
    """Where element `flat` of output `name` sits: its index, and for NF4 its byte and block."""
    if contract == "nf4_quantize":
        blocksize = inputs["blocksize"]
        return {"packed": f"byte {flat} (elements {2 * flat}, {2 * flat + 1}; block "
                          f"{2 * flat // blocksize})", "absmax": f"block {flat}",
                "nested_absmax": f"nested block {flat}"}.get(name, "the offset")
    source = {"nf4_dequantize": "q", "adamw_step": "param"}.get(contract, name[5:] or "grad_out")
    shape = inputs[source].shape  # y has grad_out's shape, grad_A A's
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(shape)))
    if contract == "nf4_dequantize":
        return (f"index {index} (byte {flat // 2}, {'high' if flat % 2 == 0 else 'low'} nibble; "
                f"block {flat // inputs['q'].blocksize})")
    return f"index {index}"


def _difference(contract, name, i, want, have, error, count, inputs, atol) -> str:
    """One line on the first differing element i of output `name` (both flattened)."""
    show = (lambda v: f"0x{int(v):02x}") if want.dtype == torch.uint8 else repr
    line = (f"{name} differs at {_where(contract, name, i, inputs)}: expected "
            f"{show(want[i].item())}{' (exact)' if atol else ''}, got {show(have[i].item())}")
    if name == "packed":
        codes = [f"{int(v) >> 4}, {int(v) & 15}" for v in (want[i], have[i])]
        line += f" (codes {codes[0]} vs {codes[1]})"
    elif atol:
        ulp = torch.finfo(have.dtype).eps * 2.0 ** (math.frexp(want[i].item())[1] - 1)
        line += (f" {have.dtype}: |difference| {error[i].item():.3g} = "
                 f"{error[i].item() / ulp:.3g} ulps > tolerance {atol[name]:.3g}")
    elif want.is_floating_point():  # 0 ulps apart: 0.0 against -0.0
        line += f", {int(error[i])} ulps apart (largest {int(error.max())})"
    return line + f"; {count} of {want.numel()} differ"


def compare(contract, expected: dict, got: dict, inputs: dict, atol: dict | None = None,
            exact: bool = True) -> list:
    """A line per output that differs (empty: all agree). atol None: bit for bit."""
    problems = [f"{name}: unexpected output" for name in got if name not in expected]
    for name, want in expected.items():
        have = got.get(name)
        dtype = inputs[name[5:]].dtype if name.startswith("grad_") else (
            inputs["x"].dtype if name == "y" else want.dtype)
        shape_ok = isinstance(have, torch.Tensor) and (have.shape == want.shape or (
            name in ("packed", "offset") and have.numel() == want.numel()))  # any layout
        if not shape_ok or have.dtype != dtype:
            problems.append(f"{name}: expected {dtype} {tuple(want.shape)}, got {_describe(have)}")
            continue
        have, want = have.detach().cpu().reshape(-1), want.reshape(-1)
        if atol is not None:  # against float64 exact values
            error = (have.double() - want).abs()
            bad = ~(error <= atol.get(name, 0.0))
        else:
            error = (_bits(have) - _bits(want)).abs()
            bad = raw_bits(have) != raw_bits(want)
            start = inputs["param"].cpu().double().reshape(-1) if name == "param_after" else 0.0
            change, wanted = have.double() - start, want.double() - start  # AdamW: the update
            near = want.is_floating_point() and bool(
                ((change - wanted).abs() <= INEXACT_RTOL * wanted.abs().max()).all())
            if near and not exact:
                continue
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            problems.append(_difference(contract, name, i, want, have, error, int(bad.sum()),
                                        inputs, atol))
            if atol is None and near:
                problems[-1] += (f" (within {INEXACT_RTOL:g} relative: right math, "
                                 "other operation order? exact=False accepts that)")
    return problems


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {tuple(value.shape)} on {value.device}"
    if isinstance(value, nf4.NF4Weight):
        return f"NF4Weight({', '.join(f'{k}={v}' for k, v in value.metadata().items())})"
    return repr(value)


def check_case(contract: str, fn, case: dict, device="cpu", gradients=True, exact=True) -> None:
    """Run one case of `contract` on fn; raise Mismatch (an AssertionError) if it disagrees."""
    device = str(torch.device(device))
    inputs = case_inputs(contract, case, device)
    expected = expected_outputs(contract, inputs, gradients)
    atol = adapter_tolerances(contract, inputs, expected, gradients) \
        if contract in ADAPTER_ARGS else None
    try:
        problems = compare(contract, expected, run_contract(contract, fn, inputs, gradients),
                           inputs, atol, exact)
    except Mismatch as error:
        problems = [str(error)]
    except Exception as error:  # a crash on this case is a finding too
        problems = [f"fn raised {type(error).__name__}: {error}".splitlines()[0]]
    if problems:
        options = "" if gradients and exact else f", gradients={gradients}, exact={exact}"
        raise Mismatch("\n  ".join([
            f"{FUNCTIONS[contract]} contract: the candidate differs on this case", f"case: {case}",
            "inputs: " + "; ".join(f"{k}: {_describe(v)}" for k, v in inputs.items()),
            *problems, "reproduce:", "import oracle",
            f"inputs = oracle.case_inputs({contract!r}, {case}, device={device!r})",
            f"expected = oracle.expected_outputs({contract!r}, inputs)",
            f"oracle.check_case({contract!r}, candidate, {case}, device={device!r}{options})"]))


def _check(contract, fn, examples, device, derandomize, **options) -> dict:
    check_int(examples, "examples", low=0)
    check_bool(derandomize, "derandomize")
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

    Tolerance: none, byte for byte: it is a storage format, and each rule is exact in float32
    (s = x * (1/absmax), x / absmax in a partial last block; the nearest code by float32 midpoints,
    a tie taking the lower code; offset = mean of the scales). Draws w of 1-3 rows, odd and even
    counts, every blocksize 32..4096, float32/float16/bfloat16, values normal, heavy-tailed, on the
    15 NF4 midpoints, zero blocks, on 84 midpoints of the 8-bit dynamic map.
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

    Tolerance against float64 exact values: TOLERANCE[weight.dtype] x the largest sum of absolute
    terms of each output (see TOLERANCE: any summation order passes, a 16-bit rounding too many in
    float32 does not). Draws rank 1-4, widths 1-9, leading dims (), (1,), (3,), (2, 3), bias or
    not, float32/float16/bfloat16 bases with float32 adapters, B not zero, five scalings.
    """
    return _check("lora_forward", fn, examples, device, derandomize, gradients=gradients)


def check_dora_forward(fn, examples=50, device="cpu", derandomize=True, gradients=True) -> dict:
    """fn(x, weight, bias, A, B, magnitude, scaling) -> y; gradients of x, A, B and magnitude.

    The contract (dora.dora_forward without dropout): V = W0 + scaling B A, for each output row i
    n_i = max(||V_i||, 1e-12), y = (magnitude / n) ⊙ (V x) + b (the bias is not rescaled); gradients
    treat n as a constant (the detached norm of section 4.3). magnitude (out,) has the adapters'
    dtype. Tolerance as check_lora_forward's times the condition of the row norms (see
    adapter_tolerances: n divides every output). Draws as LoRA's, plus a zero row of V (no NaN).
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

    Tolerance: none (exact=True), torch.optim.AdamW's order, each operation rounded to float32 on
    the inputs' device (paged_optim.adamw_step, bit-equal to torch.optim.AdamW(foreach=False)):
    param *= 1 - lr wd; exp_avg.lerp_(g, 1 - beta1); exp_avg_sq = beta2
    exp_avg_sq + (1 - beta2) g g; param -= lr / (1 - beta1^t) * exp_avg / (sqrt(exp_avg_sq) /
    sqrt(1 - beta2^t) + eps). The same math in another order (bias corrections on the moments, a
    fused multiply-add) is a few ulps off: the message says so, and exact=False accepts it. Draws
    float32 parameters up to 3x17, step 1 (zero state) to 10^6, normal, large, zero and tiny
    gradients (eps dominates the denominator), decay on and off.
    """
    return _check("adamw_step", fn, examples, device, derandomize, exact=exact)


if __name__ == "__main__":
    # python oracle.py golden DIR | verify DIR: see oracle_kit/golden.py
    sys.exit(golden.main(sys.argv[1:]))
