"""Golden files: the oracle's cases on disk, for implementations in C, CUDA, Rust or anything else.

`python oracle.py golden DIR` writes one safetensors file per case of oracle_kit.cases.GOLDEN (with
the project's own writer, formats/safetensors_io.py: a checksum of the contents in its metadata) and
DIR/manifest.json, {"cases": [{"file", "function", "args", "inputs", "outputs", "rules", "atol",
"case"}], "tables": the NF4 code and the 8-bit dynamic map as float32 bit patterns in hex,
"cases_sha256": the SHA-256 of the cases and tables as JSON with sorted keys, which verify checks}:
the tensors named in "inputs" and "outputs" are in the file, "args" are the function's other
arguments, "rules" how each output is compared (references.output_rules), "atol" the tolerance of
each float64 output, "case" what oracle_kit.cases.case_inputs rebuilds the inputs from. The files
are the same bytes whichever CPU capability writes them
(tests/test_oracle_compare.py::test_golden_files_and_tables_are_the_same_bytes_under_the_default_cpu_capability).
`python oracle.py verify DIR` recomputes every case with the reference and prints a line per case
that differs (exit status 1 if any). `python oracle.py compare DIR CANDIDATES [--only FUNCTION]`
reads a port's outputs, CANDIDATES/<the case's file name> with the manifest's output names, and
applies each output's rule: a line per case, exit status 1 unless every case matches. Usage
errors print one line and exit with status 2. docs/oracle.md describes the layout.
"""
from __future__ import annotations

import json
import os
import sys

import torch

import nf4
from formats import safe_open, safetensors_io
from oracle_kit import contracts
from oracle_kit.cases import DTYPES, GOLDEN, case_inputs
from oracle_kit.comparing import compare_outputs
from oracle_kit.contracts import raw_bits
from oracle_kit.references import (
    ADAPTER_ARGS,
    FUNCTIONS,
    expected_outputs,
    output_rules,
)

DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
CONTRACTS = {function: contract for contract, function in FUNCTIONS.items()}

# verify: float64 golden values are recomputed up to float64 summation order (~1e-16 n)
GOLDEN_REL = 2**-40


def golden_case(contract: str, inputs: dict) -> tuple:
    """(tensors, args, input names, output names, rules) of the golden file of `inputs`: the
    expected outputs of the port contracts (AdamW's in float64, exact=False's)."""
    expected = expected_outputs(contract, inputs, exact=False)
    rules = output_rules(contract, inputs, expected, exact=False)
    if contract == "nf4_dequantize":
        q = inputs["q"]
        args = {"shape": list(q.shape), "quantized_dtype": DTYPE_NAMES[q.dtype],
                "dtype": DTYPE_NAMES[inputs["dtype"]], "blocksize": q.blocksize,
                "double_quant": q.nested_blocksize is not None}
        inputs = q.tensors()
    else:
        args = {k: v for k, v in inputs.items() if v is not None and not torch.is_tensor(v)}
        inputs = {k: v for k, v in inputs.items() if torch.is_tensor(v)}
    return {**inputs, **expected}, args, list(inputs), list(expected), rules


def tables() -> dict:
    """The NF4 code (16) and the 8-bit dynamic map (256) as float32 bit patterns, 8 hex digits."""
    return {name: [f"{bits & 0xFFFFFFFF:08x}" for bits in raw_bits(code).tolist()]
            for name, code in (("nf4", nf4.nf4_code()), ("dynamic", nf4.dynamic_code()))}


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
            tensors, args, inputs, outputs, rules = golden_case(contract, inputs)
            name = f"{contract}_{i:02d}.safetensors"
            safetensors_io.save_file({k: v.contiguous() for k, v in tensors.items()},
                                     os.path.join(directory, name),
                                     {"function": FUNCTIONS[contract], "args": json.dumps(args)})
            atol = {k: rule["atol"] for k, rule in rules.items() if "atol" in rule}
            manifest.append({"file": name, "function": FUNCTIONS[contract], "args": args,
                             "inputs": inputs, "outputs": outputs, "rules": rules, "atol": atol,
                             "case": case})
    content = {"cases": manifest, "tables": tables()}
    text = json.dumps({**content, "cases_sha256": _digest(content)}, indent=1) + "\n"
    safetensors_io.atomic_write(os.path.join(directory, "manifest.json"),
                                lambda file: file.write(text.encode()))
    return len(manifest)


def verify_case(directory: str, entry: dict) -> list:
    """What differs between one manifest entry's file and the reference on its stored inputs."""
    contract = CONTRACTS[entry["function"]]
    tensors, _ = safetensors_io.load_file(golden_file(directory, entry["file"]))
    inputs = inputs_from_file(contract, {k: tensors[k] for k in entry["inputs"]}, entry["args"])
    recomputed, args, _, outputs, rules = golden_case(contract, inputs)
    if sorted(outputs) != sorted(entry["outputs"]) or sorted(tensors) != sorted(recomputed):
        return [f"outputs {sorted(entry['outputs'])}, expected {sorted(outputs)}"]
    problems = [] if rules == entry.get("rules") else ["rules differ from the contract's"]
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


def golden_file(directory: str, name) -> str:
    """The path of a manifest's `file` entry, confined to `directory`: a plain file name (no
    folder part, no "..", not absolute), and not a link out of the folder."""
    if not isinstance(name, str) or not name or name in (".", "..") or os.path.isabs(name) \
            or any(sep and sep in name for sep in ("/", "\\", os.sep, os.altsep)):
        raise ValueError(f"file {name!r} is not a plain file name in {directory} (a golden "
                         f"folder's files lie in it)")
    path = os.path.join(directory, name)
    inside = os.path.realpath(directory)
    if os.path.commonpath([inside, os.path.realpath(path)]) != inside:
        raise ValueError(f"file {name!r} is a link out of {directory}")
    return path


def _digest(content: dict) -> str:
    """SHA-256 of the cases and tables as canonical JSON: an edit of manifest.json shows."""
    return safetensors_io.sha256_hex(json.dumps(content, sort_keys=True).encode())


def read_manifest(directory: str) -> tuple:
    """(cases, problems) of directory/manifest.json: problems name an unreadable or edited one."""
    try:
        saved = safe_open.load_json(os.path.join(directory, "manifest.json"))
        manifest = saved["cases"]
        if not isinstance(manifest, list):
            raise TypeError("cases is not a list")
        content = {"cases": manifest, "tables": saved["tables"]}
    except ValueError as error:  # not a regular file, too big, not JSON: safe_open says which
        return None, [f"manifest.json: unreadable ({error}); run golden again"]
    except (KeyError, TypeError) as error:
        return None, [f"manifest.json: unreadable ({type(error).__name__}); run golden again"]
    problems = [] if saved.get("cases_sha256") == _digest(content) else [
        "manifest.json: cases_sha256 differs (edited or damaged); run golden again"]
    if saved["tables"] != tables():
        problems.append("manifest.json: tables differ from nf4.nf4_code() and nf4.dynamic_code()")
    return manifest, problems


def _not_a_case(entry) -> str | None:
    """The line for a manifest entry that is not a JSON object, else None."""
    if isinstance(entry, dict):
        return None
    kind = type(entry).__name__
    return f"{str(entry)[:60]!r}: a case of the manifest is a JSON object, not {kind}"


def verify_golden(directory: str) -> list:
    """Recompute every case of directory/manifest.json: a line per case that differs."""
    manifest, failures = read_manifest(directory)
    for entry in manifest or []:
        if _not_a_case(entry):
            failures.append(_not_a_case(entry))
            continue
        try:
            problems = verify_case(directory, entry)
        except Exception as error:  # a missing or corrupt file, or an entry it cannot read
            problems = [f"{type(error).__name__}: {error}".splitlines()[0]]
        failures += [f"{entry.get('file', entry)}: {'; '.join(problems)}"] if problems else []
    return failures


def compare_case(directory: str, candidates: str, entry: dict) -> list:
    """What breaks the contract in the candidate file of one manifest entry (empty: it matches)."""
    contract = CONTRACTS[entry["function"]]
    golden_path = golden_file(directory, entry["file"])  # a plain name, checked
    path = os.path.join(candidates, entry["file"])
    if not os.path.isfile(path):
        return [f"no candidate file {path}"]
    try:
        theirs, _ = safetensors_io.load_file(path)
    except (OSError, ValueError) as error:
        return [f"candidate file {path} unreadable: {error}".splitlines()[0]]
    tensors, _ = safetensors_io.load_file(golden_path)
    inputs = inputs_from_file(contract, {k: tensors[k] for k in entry["inputs"]}, entry["args"])
    expected = {name: tensors[name] for name in entry["outputs"]}
    got = {name: theirs[name] for name in entry["outputs"] if name in theirs}
    offset = got.get("offset")
    if "offset" in expected and isinstance(offset, torch.Tensor) \
            and offset.dtype == torch.float32 and offset.numel() == 1:
        expected.update(contracts.nested_given_offset(inputs["w"], inputs["blocksize"], offset))
    return compare_outputs(contract, expected, got, inputs, entry["rules"])


def compare_golden(directory: str, candidates: str, only: str | None = None) -> tuple:
    """(lines, failures): a line per case of `directory` compared with `candidates`."""
    manifest, failures = read_manifest(directory)
    lines = [f"DIFFERS {line}" for line in failures]
    for entry in manifest or []:
        if _not_a_case(entry):
            lines.append(f"DIFFERS {_not_a_case(entry)}")
            failures.append(lines[-1])
            continue
        if only is not None and entry.get("function") != only:
            continue
        try:
            problems = compare_case(directory, candidates, entry)
        except Exception as error:  # a golden file it cannot read
            problems = [f"{type(error).__name__}: {error}".splitlines()[0]]
        name = entry.get("file", entry)
        lines.append(f"DIFFERS {name}: " + "\n  ".join(problems) if problems else f"MATCHES {name}")
        failures += problems[:1]
    return lines, failures


USAGE = ("usage: python oracle.py golden DIR | python oracle.py verify DIR | python oracle.py "
         "compare DIR CANDIDATES [--only FUNCTION]")


def _usage_problem(argv: list) -> str | None:
    """The one line that says what is wrong with the command line, or None."""
    lengths = {"golden": (2,), "verify": (2,), "compare": (3, 5)}  # compare: maybe --only F
    if not argv or argv[0] not in lengths or len(argv) not in lengths[argv[0]]:
        return f"expected a command (golden, verify or compare) and its directories; {USAGE}"
    if len(argv) == 5 and (argv[3] != "--only" or argv[4] not in CONTRACTS):
        return f"--only takes one of {', '.join(CONTRACTS)}; {USAGE}"
    directory = argv[1]
    if argv[0] == "golden" and os.path.exists(directory) and not os.path.isdir(directory):
        return f"{directory} exists and is not a directory"
    if argv[0] != "golden" and not os.path.exists(os.path.join(directory, "manifest.json")):
        return f"no manifest.json in {directory} (run golden first)"
    if argv[0] == "compare" and not os.path.isdir(argv[2]):
        return f"{argv[2]} is not a directory of candidate files"
    return None


def main(argv: list) -> int:
    problem = _usage_problem(argv)
    if problem:
        print(f"oracle.py: {problem}", file=sys.stderr)
        return 2
    command, directory = argv[:2]
    if command == "golden":
        try:
            count = write_golden(directory)
        except OSError as error:  # a file in the way of the folder, a full or read-only disk
            print(f"oracle.py: cannot write {error.filename or directory}: "
                  f"{error.strerror or error}", file=sys.stderr)
            return 2
        print(f"wrote {count} cases and manifest.json to {directory}")
        return 0
    if command == "compare":
        lines, failures = compare_golden(directory, argv[2], argv[4] if len(argv) == 5 else None)
        print("\n".join(lines))
        print(f"{sum(line.startswith('DIFFERS') for line in lines)} case(s) break the contract"
              if failures else "every case meets the contract")
        return 1 if failures else 0
    failures = verify_golden(directory)
    for line in failures:
        print(f"DIFFERS {line}")
    print(f"{len(failures)} case(s) differ" if failures else "every case matches the reference")
    return 1 if failures else 0
