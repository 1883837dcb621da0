"""Comparing a candidate's outputs with the expected ones, output by output, by the rule the
contract gives each (oracle_kit/references.py's output_rules; the golden manifest states them):
the checkers of oracle.py and `python oracle.py compare` both report through compare_outputs.

A difference is reported at its first element: the index (for NF4 its byte, nibble and block),
both values, the ulps between them in the candidate's dtype, how many elements differ.
"""
from __future__ import annotations

import torch

import nf4
from oracle_kit import contracts, guards

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64, "uint8": torch.uint8}


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of t as ordered integers: adjacent floats differ by 1 (-0.0 and 0.0: 0)."""
    bits = contracts.raw_bits(t)
    if not t.is_floating_point():
        return bits
    return torch.where(bits < 0, -(bits + (1 << (8 * t.element_size() - 1))), bits)


def ulps_apart(a: float, b: float, dtype: torch.dtype) -> int:
    """How many `dtype` values lie from a to b (both rounded to dtype), 0 for 0.0 and -0.0."""
    pair = torch.tensor([a, b], dtype=torch.float64).to(dtype)
    bits = ordered_bits(pair)
    return abs(int(bits[0]) - int(bits[1]))


def where(contract: str, name: str, flat: int, inputs: dict) -> str:
    """Where element `flat` of output `name` sits: its index, and for NF4 its byte and block."""
    if contract == "nf4_quantize":
        blocksize = inputs["blocksize"]
        return {"packed": f"byte {flat} (elements {2 * flat}, {2 * flat + 1}; block "
                          f"{2 * flat // blocksize})",
                "absmax": f"block {flat} (nested block {flat // nf4.NESTED_BLOCKSIZE})",
                "nested_absmax": f"nested block {flat}"}.get(name, "the offset")
    source = {"nf4_dequantize": "q", "adamw_step": "param"}.get(contract, name[5:] or "grad_out")
    shape = inputs[source].shape  # y has grad_out's shape, grad_A A's
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(shape)))
    if contract == "nf4_dequantize":
        q = inputs["q"]
        block = flat // q.blocksize
        nested = f", nested block {block // nf4.NESTED_BLOCKSIZE}" if q.nested_blocksize else ""
        return (f"index {index} (byte {flat // 2}, {'high' if flat % 2 == 0 else 'low'} nibble; "
                f"block {block}{nested})")
    return f"index {index}"


def _show(value, dtype) -> str:
    return f"0x{int(value):02x}" if dtype == torch.uint8 else repr(value)


def _shape_ok(name, have, want) -> bool:
    return isinstance(have, torch.Tensor) and (have.shape == want.shape or (
        name in ("packed", "offset") and have.numel() == want.numel()))  # any layout


def describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {tuple(value.shape)} on {value.device}"
    if isinstance(value, nf4.NF4Weight):
        return f"NF4Weight({', '.join(f'{k}={v}' for k, v in value.metadata().items())})"
    return repr(value)


def compare_outputs(contract: str, expected: dict, got: dict, inputs: dict, rules: dict) -> list:
    """A line per output of `got` that breaks its rule (empty: all agree)."""
    problems = [f"{name}: unexpected output" for name in got if name not in expected]
    device = guards.input_device(inputs)
    for name, want in expected.items():
        rule, have = rules[name], got.get(name)
        dtype = DTYPES[rule["dtype"]]
        if isinstance(have, torch.Tensor) and device is not None and have.device != device:
            problems.append(f"{name}: expected on {device}, where the inputs are, got "
                            f"{describe(have)}")
            continue
        if not _shape_ok(name, have, want) or have.dtype != dtype:
            problems.append(f"{name}: expected {dtype} {tuple(want.shape)}, got {describe(have)}")
            continue
        have, want = have.detach().cpu().reshape(-1), want.reshape(-1)
        problem = _break(contract, name, rule, want, have, inputs)
        if problem:
            problems.append(problem)
    return problems


def _break(contract, name, rule, want, have, inputs) -> str | None:
    """The line for output `name` if it breaks `rule`, else None."""
    kind = rule["rule"]
    if kind == "mean":  # the offset: within rule["ulps"] ulps of the correctly rounded mean
        mean, value = rule["mean"], float(have[0])
        apart = abs(value - mean) / contracts.ulp_float32(mean)
        if apart <= rule["ulps"]:
            return None
        return (f"offset differs: expected the mean of the block scales, {mean!r} correctly "
                f"rounded (float32), within {rule['ulps']} ulps for any order of summation; got "
                f"{value!r}, {apart:.4g} ulps away")
    if kind == "atol":
        error = (have.double() - want.double()).abs()
        bad = ~(error <= rule["atol"])  # NaN is bad
    else:  # "exact" and "exact_given_offset": bit for bit
        error = (ordered_bits(have) - ordered_bits(want)).abs()
        bad = contracts.raw_bits(have) != contracts.raw_bits(want)
    if not bool(bad.any()):
        return None
    i = int(bad.nonzero()[0])
    w, h = want[i].item(), have[i].item()
    line = (f"{name} differs at {where(contract, name, i, inputs)}: expected "
            f"{_show(w, want.dtype)}{' (exact)' if kind == 'atol' else ''}, got "
            f"{_show(h, have.dtype)}")
    if name == "packed":
        line += f" (codes {int(w) >> 4}, {int(w) & 15} vs {int(h) >> 4}, {int(h) & 15})"
    elif kind == "atol":
        distance = "nan" if h != h else ulps_apart(w, h, have.dtype)
        line += (f", {distance} {str(have.dtype)[6:]} ulps apart: |difference| "
                 f"{error[i].item():.3g} > tolerance {rule['atol']:.3g}")
    elif want.is_floating_point():
        line += f", {int(error[i])} ulps apart (largest {int(error.max())})"
    if kind == "exact_given_offset":
        line += " (expected from the candidate's own offset)"
    return line + f"; {int(bad.sum())} of {want.numel()} differ"
