"""Golden files: the oracle's cases on disk, for implementations in C, CUDA, Rust or anything else.

`python oracle.py golden DIR` writes one safetensors file per case of oracle_kit.cases.GOLDEN (with
the project's own writer, formats/safetensors_io.py: a checksum of the contents in its metadata) and
DIR/manifest.json, {"cases": [{"file", "function", "args", "inputs", "outputs", "atol", "case"}],
"cases_sha256": the SHA-256 of the cases as JSON with sorted keys, which verify checks}: the
tensors named in "inputs" and "outputs" are in the file, "args" are the function's other
arguments, "atol" the tolerance of each float64 output (absent: bit for bit), "case" what
oracle_kit.cases.case_inputs rebuilds the inputs from. `python oracle.py verify DIR` recomputes
every case with the reference and prints a line per case that differs (exit status 1 if any).
Usage errors print one line and exit with status 2. docs/oracle.md describes the layout.
"""
from __future__ import annotations

import json
import os
import sys

import torch

import nf4
from formats import safetensors_io
from oracle_kit.cases import DTYPES, GOLDEN, case_inputs
from oracle_kit.references import (
    ADAPTER_ARGS,
    FUNCTIONS,
    adapter_tolerances,
    expected_outputs,
    raw_bits,
)

DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# verify: float64 golden values are recomputed up to float64 summation order (~1e-16 n)
GOLDEN_REL = 2**-40


def golden_case(contract: str, inputs: dict) -> tuple:
    """(tensors, args, input names, output names, atol) of the golden file of `inputs`."""
    expected = expected_outputs(contract, inputs)
    atol = adapter_tolerances(contract, inputs, expected) if contract in ADAPTER_ARGS else {}
    if contract == "nf4_dequantize":
        q = inputs["q"]
        args = {"shape": list(q.shape), "quantized_dtype": DTYPE_NAMES[q.dtype],
                "dtype": DTYPE_NAMES[inputs["dtype"]], "blocksize": q.blocksize,
                "double_quant": q.nested_blocksize is not None}
        inputs = q.tensors()
    else:
        args = {k: v for k, v in inputs.items() if v is not None and not torch.is_tensor(v)}
        inputs = {k: v for k, v in inputs.items() if torch.is_tensor(v)}
    return {**inputs, **expected}, args, list(inputs), list(expected), atol


def inputs_from_file(contract: str, tensors: dict, args: dict) -> dict:
    """The inputs of a golden file, as the checkers pass them: golden_case's inverse."""
    if contract == "nf4_dequantize":
        double_quant = args["double_quant"]
        q = nf4.NF4Weight(tensors["packed"], tensors["absmax"], tensors.get("nested_absmax"),
                          tensors.get("offset"), args["shape"], DTYPES[args["quantized_dtype"]],
                          args["blocksize"], nf4.NESTED_BLOCKSIZE if double_quant else None)
        return {"q": q, "dtype": DTYPES[args["dtype"]]}
    inputs = {**tensors, **args}
    if "betas" in inputs:
        inputs["betas"] = tuple(inputs["betas"])  # a JSON list
    if contract in ADAPTER_ARGS:
        inputs.setdefault("bias", None)
    return inputs


def write_golden(directory: str) -> int:
    """Write every golden case and manifest.json into `directory`; returns the number of cases."""
    os.makedirs(directory, exist_ok=True)
    manifest = []
    for contract, cases in GOLDEN.items():
        for i, case in enumerate(cases):
            inputs = case_inputs(contract, case)
            tensors, args, inputs, outputs, atol = golden_case(contract, inputs)
            name = f"{contract}_{i:02d}.safetensors"
            safetensors_io.save_file({k: v.contiguous() for k, v in tensors.items()},
                                     os.path.join(directory, name),
                                     {"function": FUNCTIONS[contract], "args": json.dumps(args)})
            manifest.append({"file": name, "function": FUNCTIONS[contract], "args": args,
                             "inputs": inputs, "outputs": outputs, "atol": atol, "case": case})
    text = json.dumps({"cases": manifest, "cases_sha256": _digest(manifest)}, indent=1) + "\n"
    safetensors_io.atomic_write(os.path.join(directory, "manifest.json"),
                                lambda file: file.write(text.encode()))
    return len(manifest)


def verify_case(directory: str, entry: dict) -> list:
    """What differs between one manifest entry's file and the reference on its stored inputs."""
    contract = {function: name for name, function in FUNCTIONS.items()}[entry["function"]]
    tensors, _ = safetensors_io.load_file(os.path.join(directory, entry["file"]))
    inputs = inputs_from_file(contract, {k: tensors[k] for k in entry["inputs"]}, entry["args"])
    recomputed, args, _, outputs, _ = golden_case(contract, inputs)
    if sorted(outputs) != sorted(entry["outputs"]) or sorted(tensors) != sorted(recomputed):
        return [f"outputs {sorted(entry['outputs'])}, expected {sorted(outputs)}"]
    problems = []
    for name in outputs:
        want, have = recomputed[name], tensors[name]
        if want.dtype != have.dtype or want.shape != have.shape:
            problems.append(f"{name} is {have.dtype} {tuple(have.shape)}, expected {want.dtype} "
                            f"{tuple(want.shape)}")
        elif want.dtype == torch.float64:  # float64 exact values: up to summation order
            error = (want - have).abs().max().item()
            if not error <= GOLDEN_REL * want.abs().max().item():
                problems.append(f"{name} differs from the reference by up to {error:.3g}")
        elif not raw_bits(want).equal(raw_bits(have)):
            first = int((raw_bits(want) != raw_bits(have)).nonzero()[0])
            problems.append(f"{name} differs from the reference at element {first}")
    return problems


def _digest(cases: list) -> str:
    """SHA-256 of the cases as canonical JSON: an edit of manifest.json shows."""
    return safetensors_io.sha256_hex(json.dumps(cases, sort_keys=True).encode())


def verify_golden(directory: str) -> list:
    """Recompute every case of directory/manifest.json: a line per case that differs."""
    try:
        with open(os.path.join(directory, "manifest.json"), encoding="utf-8") as file:
            saved = json.load(file)
        manifest = saved["cases"]
    except (ValueError, KeyError, TypeError, RecursionError) as error:
        return [f"manifest.json: unreadable ({type(error).__name__}); run golden again"]
    failures = [] if saved.get("cases_sha256") == _digest(manifest) else [
        "manifest.json: cases_sha256 differs (edited or damaged); run golden again"]
    for entry in manifest:
        try:
            problems = verify_case(directory, entry)
        except Exception as error:  # a missing or corrupt file, or an entry it cannot read
            problems = [f"{type(error).__name__}: {error}".splitlines()[0]]
        failures += [f"{entry.get('file', entry)}: {'; '.join(problems)}"] if problems else []
    return failures


def main(argv: list) -> int:
    usage = "usage: python oracle.py golden DIR | python oracle.py verify DIR"
    if len(argv) != 2 or argv[0] not in ("golden", "verify"):
        print(f"oracle.py: expected a command (golden or verify) and a directory; {usage}",
              file=sys.stderr)
        return 2
    command, directory = argv
    if command == "golden" and os.path.exists(directory) and not os.path.isdir(directory):
        print(f"oracle.py: {directory} exists and is not a directory", file=sys.stderr)
        return 2
    if command == "verify" and not os.path.isfile(os.path.join(directory, "manifest.json")):
        print(f"oracle.py: no manifest.json in {directory} (run golden first)", file=sys.stderr)
        return 2
    if command == "golden":
        print(f"wrote {write_golden(directory)} cases and manifest.json to {directory}")
        return 0
    failures = verify_golden(directory)
    for line in failures:
        print(f"DIFFERS {line}")
    print(f"{len(failures)} case(s) differ" if failures else "every case matches the reference")
    return 1 if failures else 0
