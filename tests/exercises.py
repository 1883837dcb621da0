"""The exercises of docs/exercises.md in teaching order, their known wrong answers, and the handout.

Each `Exercise` names the function a student rebuilds (`MODULE.FUNCTION` or `MODULE.Class.method`),
what to read, and the known wrong answers: implementations the exercise's tests must reject.

    python tests/exercises.py handout DIR [NAME ...]

writes a copy of the project to DIR in which each exercise's function (or the NAMEs given) keeps
its signature, has as its docstring the contract of its section of docs/exercises.md (arguments,
shapes, what it returns; no formula: the project's own docstrings, the reference, keep theirs), and
has the body

    raise NotImplementedError("see docs/exercises.md#NAME")

The copy is plain source, edited at the positions Python's `ast` gives; nothing is patched at run
time. tests/test_exercises.py checks the exercises are honest with two such copies, each run by one
pytest session in a subprocess (`python tests/exercises.py check MODE REPORT`):
- the handout itself: every exercise's tests fail there;
- a rehearsal copy, where each exercise's function opens with a hook (`stand_in(NAME)`) that
  hands the call to whatever `ACTIVE[NAME]` holds (nothing: the real body runs). The session
  runs each exercise's tests on the real code, with the function blank, and with each known wrong
  answer standing in, and writes which tests failed to a JSON report.
"""
from __future__ import annotations

import ast
import json
import math
import os
import re
import shutil
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

if __name__ == "__main__":  # run as a script: hand over to the module `exercises` itself, which
    import exercises  # the hooks, the wrong answers and the registry import under that name
    sys.exit(exercises.main(sys.argv[1:]))

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
# What a copy of the project leaves out: version control, caches, run outputs.
NOT_COPIED = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", ".pytest_cache", ".hypothesis",
                                    ".ruff_cache", "runs", "*.egg-info")
# A marker in a test file's text: @pytest.mark.exercise("MODULE.FUNCTION", ...).
MARKER = re.compile(r"mark\.exercise\(((?:\s*\"[\w.]+\",?)+)\s*\)")


@dataclass(frozen=True)
class Exercise:
    name: str                     # MODULE.FUNCTION or MODULE.Class.method: what to rebuild
    reading: str                  # the paper section (or docs page) to read first
    wrong_answers: dict[str, Callable] = field(default_factory=dict)  # label -> a wrong version
    breaks: tuple[str, ...] = ()  # later exercises whose tests also fail while this one is blank
    # Pieces of the answer (a gradient exercise's formulas) that the handout's docstrings and the
    # docs' visible text must not contain; the hints in docs/exercises.md hold them, collapsed.
    # `answer_fragments` adds the ones it derives from the reference's docstring and body.
    answers: tuple[str, ...] = ()

    @property
    def anchor(self) -> str:
        """The section of docs/exercises.md: docs/exercises.md#{anchor}."""
        return self.name.replace(".", "-").lower()


def marked_in(path: str) -> set[str]:
    """The exercise names that a test file's markers name (read from its text, not imported)."""
    with open(path, encoding="utf-8") as file:
        text = file.read()
    return {name for group in MARKER.findall(text) for name in re.findall(r"[\w.]+", group)}


def test_files(name: str | None = None, tests_dir: str = TESTS) -> list[str]:
    """The test files holding tests of exercise `name` (of any exercise for None), sorted."""
    paths = sorted(os.path.join(tests_dir, n) for n in os.listdir(tests_dir)
                   if n.startswith("test_") and n.endswith(".py"))
    return [p for p in paths if (name in marked_in(p) if name else marked_in(p))]


# --------------------------------------------------------------------------------------------------
# Finding a function in the source and rewriting its body.

def locate(name: str, root: str = ROOT) -> tuple[str, list[str]]:
    """(the file defining `name`, the path of class and function names inside it)."""
    parts = name.split(".")
    directory = root
    while os.path.isdir(os.path.join(directory, parts[0])):  # a package: go down to its module
        directory = os.path.join(directory, parts.pop(0))
    return os.path.join(directory, parts[0] + ".py"), parts[1:]


def function_node(tree: ast.Module, qualified: list[str], name: str) -> ast.FunctionDef:
    scope = tree
    for part in qualified:
        found = [n for n in scope.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))
                 and n.name == part]
        if len(found) != 1:
            raise LookupError(f"{name}: {part!r} is defined {len(found)} times where expected once")
        scope = found[0]
    if not isinstance(scope, ast.FunctionDef) or ast.get_docstring(scope) is None:
        raise LookupError(f"{name}: not a function with a docstring")
    return scope


def call_arguments(node: ast.FunctionDef) -> str:
    """The function's parameters passed on as they came: 'self, x, *args, key=key, **kwargs'."""
    a = node.args
    parts = [p.arg for p in a.posonlyargs + a.args]
    parts += [f"*{a.vararg.arg}"] if a.vararg else []
    parts += [f"{p.arg}={p.arg}" for p in a.kwonlyargs]
    parts += [f"**{a.kwarg.arg}"] if a.kwarg else []
    return ", ".join(parts)


def rewrite_function(root: str, name: str, body: Callable[[ast.FunctionDef, str], str],
                     keep_body: bool, docstring: str | None = None) -> None:
    """Replace what follows the docstring of `name` (in the copy at `root`) with body(node, indent);
    with `keep_body`, insert it before the function's own statements instead. With `docstring`,
    replace the docstring too."""
    path, qualified = locate(name, root)
    with open(path, encoding="utf-8") as file:
        lines = file.read().splitlines(keepends=True)
    node = function_node(ast.parse("".join(lines)), qualified, name)
    old_docstring, first = node.body[0], node.body[min(1, len(node.body) - 1)]
    indent = " " * old_docstring.col_offset
    end = old_docstring.end_lineno if keep_body else node.end_lineno  # 1-based, inclusive
    if keep_body and first is old_docstring:
        raise LookupError(f"{name}: nothing after the docstring")
    start = old_docstring.end_lineno if docstring is None else old_docstring.lineno - 1
    new = body(node, indent) if docstring is None else docstring_text(docstring, indent) + body(
        node, indent)
    lines[start:end] = [new]
    with open(path, "w", encoding="utf-8") as file:
        file.write("".join(lines))


def docstring_text(text: str, indent: str) -> str:
    """`text` as a docstring's source lines at `indent`, wrapped to the project's 100 columns."""
    if "\\" in text or '"""' in text:
        raise ValueError(f"a contract holds a backslash or triple quotes: {text[:60]!r}")
    lines = textwrap.wrap(" ".join(text.split()), width=96 - len(indent),
                          break_long_words=False, break_on_hyphens=False)
    return f'{indent}"""' + f"\n{indent}".join(lines) + f'\n{indent}"""\n'


# --------------------------------------------------------------------------------------------------
# The contract (docs/exercises.md) and the pieces of the answer it must not hold.

def exercise_sections(root: str = ROOT) -> dict[str, str]:
    """{exercise name: its section's text} from docs/exercises.md, in the page's order."""
    with open(os.path.join(root, "docs", "exercises.md"), encoding="utf-8") as file:
        parts = re.split(r"^### `([^`]+)`", file.read(), flags=re.M)
    return {name: text.split("\n## ")[0] for name, text in zip(parts[1::2], parts[2::2])}


def contract(exercise: Exercise, root: str = ROOT) -> str:
    """The **Contract:** paragraph of the exercise's section: the handout's docstring."""
    section = exercise_sections(root).get(exercise.name, "")
    found = re.search(r"^\*\*Contract:\*\* (.*?)\n\n", section, flags=re.M | re.S)
    if not found:
        raise LookupError(f"{exercise.name}: no **Contract:** paragraph in docs/exercises.md")
    return " ".join(found.group(1).split())


# One spelling for the symbols the docstrings (ASCII) and the docs (Unicode) write differently.
NOTATION = {"ᵀ": "^T", "‖": "||", "·": "*", "⊙": "*", "×": "*", "−": "-", "√": "sqrt", "α": "alpha",
            "λ": "lambda", "Λ": "Lambda", "β": "beta", "ε": "eps", "θ": "theta", "δ": "delta",
            "₁": "1", "₂": "2", "ᵗ": "^t", "²": "^2", "Δ": "Delta", "`": "", "**": "^"}
OPERATOR = re.compile(r"^(\+|-|\*|/|<<|\||@)$")


def notation(text: str) -> str:
    for symbol, spelled in NOTATION.items():
        text = text.replace(symbol, spelled)
    return text


def compact(text: str) -> str:
    """`text` in NOTATION's spelling without any whitespace, for finding a formula in prose."""
    return "".join(notation(text).split())


def equation_fragments(docstring: str) -> set[str]:
    """The pieces of each equation `LHS = RHS` in a docstring: the right side (up to a comma,
    colon, semicolon, a parenthesised remark or a `with`/`for`/`over`/`from`), and each operation
    `a op b` in it, compacted."""
    found = set()
    for line in notation(docstring).splitlines():
        for rhs in re.findall(r"(?<![=<>!]) = (.+)", line):
            rhs = re.split(r", |; |: | \((?=[A-Za-z]+[ .,)])| (?:with|for|over|from|below) ",
                           rhs)[0].strip(" .")
            tokens = rhs.split()
            if len(tokens) > 1:
                found.add(compact(rhs))
            found.update(compact(" ".join(tokens[i - 1:i + 2])) for i in range(1, len(tokens) - 1)
                         if OPERATOR.match(tokens[i]))
    return {fragment for fragment in found if len(fragment) >= 3}


def source_fragments(node: ast.FunctionDef) -> set[str]:
    """The reference body's statements after the docstring, compacted: a contract holds no code."""
    return {compact(ast.unparse(statement).splitlines()[0]) for statement in node.body[1:]} - {
        "return", "pass"}


def answer_fragments(exercise: Exercise, root: str = ROOT) -> set[str]:
    """What the handout's docstring and the docs' visible contract must not contain: the listed
    `answers`, the equations of the reference's docstring and the statements of its body."""
    path, qualified = locate(exercise.name, root)
    with open(path, encoding="utf-8") as file:
        node = function_node(ast.parse(file.read()), qualified, exercise.name)
    return ({compact(answer) for answer in exercise.answers}
            | equation_fragments(ast.get_docstring(node)) | source_fragments(node))


def blank_body(exercise: Exercise) -> Callable[[ast.FunctionDef, str], str]:
    return lambda node, indent: (
        f'{indent}raise NotImplementedError("see docs/exercises.md#{exercise.anchor}")\n')


def hook_body(exercise: Exercise) -> Callable[[ast.FunctionDef, str], str]:
    def body(node, indent):
        return (f'{indent}_stand_in = __import__("exercises").stand_in("{exercise.name}")\n'
                f"{indent}if _stand_in is not None:  # the honesty check's rehearsal copy only\n"
                f"{indent}    return _stand_in({call_arguments(node)})\n")
    return body


def copy_project(dest: str, edit: Callable[[str], None]) -> str:
    """Copy the project to `dest` (which must not exist), apply edit(copy), then move it into place:
    a half-written copy never appears at `dest`."""
    if os.path.lexists(dest):
        raise FileExistsError(f"{dest} exists already: name a new directory")
    parent = os.path.dirname(os.path.abspath(dest))
    staging = tempfile.mkdtemp(prefix=".handout-", dir=parent)
    try:
        copy = os.path.join(staging, "project")
        shutil.copytree(ROOT, copy, ignore=NOT_COPIED)
        edit(copy)
        os.replace(copy, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def by_name(names) -> list[Exercise]:
    known = {e.name: e for e in EXERCISES}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"not an exercise: {', '.join(unknown)} (python -m pytest --exercise "
                         "list lists them)")
    return [known[n] for n in names]


def handout(dest: str, names=None) -> str:
    """A copy of the project at `dest` with the exercises `names` (default: all) blanked."""
    chosen = EXERCISES if not names else by_name(names)

    def edit(copy):
        for exercise in chosen:
            rewrite_function(copy, exercise.name, blank_body(exercise), keep_body=False,
                             docstring=contract(exercise))
    return copy_project(dest, edit)


def rehearsal(dest: str) -> str:
    """A copy of the project at `dest` whose exercise functions open with the stand-in hook."""
    def edit(copy):
        for exercise in EXERCISES:
            rewrite_function(copy, exercise.name, hook_body(exercise), keep_body=True)
    return copy_project(dest, edit)


# The rehearsal copy's hook reads this: name -> the function that stands in for it (absent: none).
ACTIVE: dict[str, Callable] = {}


def stand_in(name: str) -> Callable | None:
    return ACTIVE.get(name)


def blank_stand_in(*args, **kwargs):
    raise NotImplementedError("this function is an exercise: rebuild it")


# --------------------------------------------------------------------------------------------------
# The honesty check, run inside a copy by `python tests/exercises.py check MODE REPORT`.

REAL = "real code"
BLANKED = "blanked"
# The nested session only needs to know whether a test failed: no tracebacks, no Hypothesis failure
# patches, none of the unraisable-exception plugin's garbage collections.
QUIET = ["-q", "--tb=no", "--no-header", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
         "-p", "no:unraisableexception", "-p", "no:warnings"]


class HonestyRun:
    """A plugin for the session in a copy: runs the exercises' tests instead of pytest's loop.

    mode "handout": each exercise's tests, until the first fails, in the handout as it is.
    mode "rehearsal": each exercise's tests on the real code, then, until the first failure, with
    the function blank, with each known wrong answer, and (while blank) the exercises it breaks.
    """

    def __init__(self, mode: str):
        self.mode = mode
        self.items: dict[str, list] = {}
        self.outcomes: dict[str, list[str]] = {}
        self.seconds: dict[str, float] = {}  # CPU seconds of each run, in the report

    def pytest_collection_modifyitems(self, items):
        for item in items:
            for mark in item.iter_markers("exercise"):
                for name in mark.args:
                    self.items.setdefault(name, []).append(item)

    def pytest_runtestloop(self, session):
        from hypothesis import settings
        # Hypothesis bound each test's settings when its module was imported: each takes the
        # exercise profile's (few examples, no shrinking; tests/conftest.py), and fewer examples
        # still where its own settings ask for fewer.
        profile = settings.get_profile("exercise")
        for found in self.items.values():
            for item in found:
                test = getattr(item.obj, "__func__", item.obj)
                if getattr(test, "is_hypothesis_test", False):
                    bound = test._hypothesis_internal_use_settings
                    test._hypothesis_internal_use_settings = settings(
                        profile, max_examples=min(profile.max_examples, bound.max_examples))
        for exercise in EXERCISES:
            if self.mode == "handout":
                self.record(exercise.name, BLANKED, stop_at_first=True)
            else:
                self.rehearse(exercise)
        return True  # pytest's own loop does not run

    def record(self, name: str, variant: str, stop_at_first: bool, tests_of: str = None):
        from _pytest.runner import runtestprotocol
        start = time.process_time()
        failed = []
        for item in self.items.get(tests_of or name, []):
            if any(report.failed for report in runtestprotocol(item, log=False, nextitem=None)):
                failed.append(item.nodeid)
                if stop_at_first:
                    break
        self.outcomes[f"{name} | {variant}"] = failed
        self.seconds[f"{name} | {variant}"] = round(time.process_time() - start, 3)

    def rehearse(self, exercise: Exercise):
        self.record(exercise.name, REAL, stop_at_first=False)
        variants = {BLANKED: blank_stand_in, **exercise.wrong_answers}
        for label, function in variants.items():
            ACTIVE[exercise.name] = function
            try:
                self.record(exercise.name, label, stop_at_first=True)
                if label == BLANKED:  # the exercises it says it breaks: do they?
                    for other in exercise.breaks:
                        self.record(other, f"while {exercise.name} is blanked", True, other)
            finally:
                del ACTIVE[exercise.name]

    def report(self) -> dict:
        return {"marked": {name: [item.nodeid for item in found]
                           for name, found in self.items.items()},
                "outcomes": self.outcomes, "cpu_seconds": self.seconds}


def check(mode: str, report_path: str) -> int:
    """Run the honesty session in this copy (the working directory) and write its JSON report."""
    import pytest
    run = HonestyRun(mode)
    code = pytest.main(test_files() + QUIET, plugins=[run])
    tmp = report_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as file:
        json.dump(dict(run.report(), exit_code=int(code)), file)
    os.replace(tmp, report_path)
    return 0 if code in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED) else 1


def main(argv: list[str]) -> int:
    usage = ("usage: python tests/exercises.py handout DIR [NAME ...]  |  "
             "python tests/exercises.py check handout|rehearsal REPORT")
    try:
        if len(argv) >= 2 and argv[0] == "handout":
            handout(argv[1], argv[2:])
            print(f"wrote {argv[1]}: {len(argv[2:]) or len(EXERCISES)} exercises blanked; "
                  "docs/exercises.md there says what to read")
            return 0
        if len(argv) == 3 and argv[0] == "check" and argv[1] in ("handout", "rehearsal"):
            return check(argv[1], argv[2])
    except (OSError, ValueError, LookupError) as error:
        print(f"exercises.py: {error}", file=sys.stderr)
        return 1
    print(usage, file=sys.stderr)
    return 2


# --------------------------------------------------------------------------- known wrong answers

def attention_without_mask(self, x):
    B, T, C = x.shape
    hs = C // self.n_head
    q = self.q_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)
    k = self.k_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)
    v = self.v_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)
    y = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hs), dim=-1) @ v
    return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


def attention_without_scale(self, x):
    B, T, C = x.shape
    hs = C // self.n_head
    q = self.q_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)
    k = self.k_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)
    v = self.v_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)
    scores = q @ k.transpose(-2, -1)  # forgot / sqrt(hs)
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    y = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v
    return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


# qlora: the input gradient of the frozen NF4 base

def input_grad_with_transposed_weight(grad_out, q, compute_dtype=torch.bfloat16):
    import qlora
    return grad_out.matmul(qlora.double_dequant(q, compute_dtype).t())  # W^T: the forward's matrix


def input_grad_without_block_scales(grad_out, q, compute_dtype=torch.bfloat16):
    import nf4
    codes = nf4.nf4_code()[nf4.unpack_nibbles(q.packed, q.numel).long()]  # q[k], never times c_b
    return grad_out.matmul(codes.view(q.shape).to(compute_dtype))


def input_grad_with_stored_scales(grad_out, q, compute_dtype=torch.bfloat16):
    import nf4
    indices = nf4.unpack_nibbles(q.packed, q.numel)  # the 8-bit codes of the scales taken as scales
    W = nf4.dequantize_blockwise(indices, q.absmax.float(), nf4.nf4_code(), q.blocksize)
    return grad_out.matmul(W.view(q.shape).to(compute_dtype))


# safetensors_io: the header

def _write_safetensors(tensors, path, metadata=None, pad=True, by_size=True, length="little",
                       from_file_start=False):
    import json

    from formats import safetensors_io as io
    header = {io.METADATA_KEY: {io.CHECKSUM_KEY: "0" * io.CHECKSUM_DIGITS, **(metadata or {})}}
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n)) if by_size else tensors
    chunks, offset = [], 0
    for name in names:
        tensor = tensors[name].detach().contiguous().clone()
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": io.DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    if pad:
        header_bytes += b" " * (-len(header_bytes) % io.HEADER_ALIGNMENT)
    if from_file_start:  # offsets counted from byte 0 of the file, not from the first data byte
        shift = io.LENGTH_BYTES + len(header_bytes)
        for name in names:
            header[name]["data_offsets"] = [o + shift for o in header[name]["data_offsets"]]
        header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    file_bytes = bytearray(len(header_bytes).to_bytes(io.LENGTH_BYTES, length) + header_bytes)
    file_bytes += b"".join(chunks)
    start = io.LENGTH_BYTES + len(io.CHECKSUM_PREFIX)
    file_bytes[start:start + io.CHECKSUM_DIGITS] = io.file_checksum(file_bytes).encode("ascii")
    io.atomic_write(path, lambda file: file.write(file_bytes))


def save_without_padding(tensors, path, metadata=None):
    _write_safetensors(tensors, path, metadata, pad=False)


def save_in_the_dicts_order(tensors, path, metadata=None):
    _write_safetensors(tensors, path, metadata, by_size=False)


def save_with_a_big_endian_length(tensors, path, metadata=None):
    _write_safetensors(tensors, path, metadata, length="big")


def save_offsets_from_the_file_start(tensors, path, metadata=None):
    _write_safetensors(tensors, path, metadata, from_file_start=True)


ATTENTION = [
    Exercise("tiny_gpt.CausalSelfAttention.forward",
             "Vaswani et al. 2017 (arXiv 1706.03762) sec. 3.2.1; docs/tiny_gpt.md",
             {"no causal mask": attention_without_mask, "no 1/sqrt(hs)": attention_without_scale},
             answers=("Q K^T", "/ sqrt(hs)", "softmax(Q")),
]
QLORA = [
    Exercise("qlora.nf4_linear_input_grad", "QLoRA (arXiv 2305.14314) sec. 3, eq. 5 and 6",
             {"W^T instead of W": input_grad_with_transposed_weight,
              "codes without their block scales": input_grad_without_block_scales,
              "8-bit scale codes used as scales": input_grad_with_stored_scales}),
]
FILES = [
    Exercise("formats.safetensors_io.save_file",
             "the safetensors README, section Format; formats/safetensors_io.py's docstring",
             {"header not padded to 8 bytes": save_without_padding,
              "tensors in the dict's order": save_in_the_dicts_order,
              "big-endian header length": save_with_a_big_endian_length,
              "offsets from the file's start": save_offsets_from_the_file_start}),
]

# The exercises of the adapters (lora, dora, vera) and of quantization and the optimizer (nf4,
# paged_optim) live in files of their own; all of them here, in teaching order.
from exercises_adapters import ADAPTER_EXERCISES  # noqa: E402 (they import Exercise from here)
from exercises_quantization import NF4_EXERCISES, OPTIMIZER_EXERCISES  # noqa: E402

EXERCISES = (ATTENTION + ADAPTER_EXERCISES + NF4_EXERCISES + QLORA + OPTIMIZER_EXERCISES + FILES)
