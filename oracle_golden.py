"""Golden files: the oracle's cases on disk, for implementations in C, CUDA, Rust or anything else.

`python oracle.py golden DIR` writes one safetensors file per case of oracle_cases.GOLDEN (with the
project's own writer, safetensors_io.py: a checksum of the contents in its metadata) and
DIR/manifest.json, {"cases": [{"file", "function", "args", "inputs", "outputs", "atol", "case"}]}:
the tensors named in "inputs" and "outputs" are in the file, "args" are the function's other
arguments, "atol" the tolerance of each float64 output (absent: bit for bit), "case" what
oracle_cases.case_inputs rebuilds the inputs from. `python oracle.py verify DIR` recomputes every
case with the reference and prints a line per case that differs (exit status 1 if any). Usage
errors print one line and exit with status 2. docs/oracle.md describes the layout.
"""
from __future__ import annotations

import json
import os
import sys

import torch

import oracle
import oracle_cases
import safetensors_io
from oracle import ADAPTER_ARGS, FUNCTIONS, adapter_tolerances, expected_outputs
from oracle_cases import case_inputs

# verify: float64 golden values are recomputed up to float64 summation order (~1e-16 n)
GOLDEN_REL = 2**-40


def golden_case(contract: str, case: dict) -> tuple:
    """(tensors, args, input names, output names, atol) of one golden file."""
    inputs = case_inputs(contract, case)
    expected = expected_outputs(contract, inputs)
    atol = adapter_tolerances(contract, inputs, expected) if contract in ADAPTER_ARGS else {}
    if contract == "nf4_dequantize":
        q = inputs.pop("q")
        inputs.update(q.tensors())
        args = {"shape": list(q.shape), "quantized_dtype": str(q.dtype)[6:],
                "dtype": str(inputs.pop("dtype"))[6:], "blocksize": q.blocksize,
                "double_quant": q.nested_blocksize is not None}
    else:
        args = {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor) and v is not None}
        inputs = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    tensors = {**inputs, **expected}
    return tensors, args, list(inputs), list(expected), atol


def write_golden(directory: str) -> int:
    """Write every golden case and manifest.json into `directory`; returns the number of cases."""
    os.makedirs(directory, exist_ok=True)
    manifest = []
    for contract, cases in oracle_cases.GOLDEN.items():
        for i, case in enumerate(cases):
            tensors, args, inputs, outputs, atol = golden_case(contract, case)
            name = f"{contract}_{i:02d}.safetensors"
            safetensors_io.save_file({k: v.contiguous() for k, v in tensors.items()},
                                     os.path.join(directory, name),
                                     {"function": FUNCTIONS[contract], "args": json.dumps(args)})
            manifest.append({"file": name, "function": FUNCTIONS[contract], "args": args,
                             "inputs": inputs, "outputs": outputs, "atol": atol, "case": case})
    text = json.dumps({"cases": manifest}, indent=1) + "\n"
    safetensors_io.atomic_write(os.path.join(directory, "manifest.json"),
                                lambda file: file.write(text.encode()))
    return len(manifest)


def verify_golden(directory: str) -> list:
    """Recompute every case of directory/manifest.json: a line per case that differs (empty: none)."""
    with open(os.path.join(directory, "manifest.json")) as file:
        manifest = json.load(file)["cases"]
    contracts = {function: contract for contract, function in FUNCTIONS.items()}
    failures = []
    for entry in manifest:
        try:
            contract = contracts[entry["function"]]
            tensors, _ = safetensors_io.load_file(os.path.join(directory, entry["file"]))
            stored = {name: tensors[name] for name in entry["outputs"]}
            recomputed, args, _, outputs, _ = golden_case(contract, entry["case"])
            same_inputs = all(oracle._bits(tensors[k]).equal(oracle._bits(recomputed[k])) for k in entry["inputs"])
            problems = [] if same_inputs else ["inputs differ from the case's"]
            if sorted(outputs) != sorted(stored) or args != entry["args"]:
                problems.append("outputs or args differ from the manifest's")
            for name in outputs if not problems else ():
                want, have = recomputed[name], stored[name]
                if want.dtype == torch.float64:  # float64 exact values: up to summation order
                    ok = bool(((want - have).abs() <= GOLDEN_REL * want.abs().max()).all())
                else:
                    ok = want.dtype == have.dtype and oracle._bits(want).equal(oracle._bits(have))
                problems += [] if ok else [f"{name} differs from the reference"]
        except Exception as error:  # a missing or corrupt file, or a manifest entry it cannot read
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
        print(f"oracle.py: {directory} has no manifest.json (write it with golden)", file=sys.stderr)
        return 2
    if command == "golden":
        print(f"wrote {write_golden(directory)} cases and manifest.json to {directory}")
        return 0
    failures = verify_golden(directory)
    for line in failures:
        print(f"DIFFERS {line}")
    print(f"{len(failures)} case(s) differ" if failures else "every case matches the reference")
    return 1 if failures else 0

