"""The docs stay true to the code.

README.md and every page in docs/ are checked for:
- every `module.name` they cite resolves in the code: a top-level module or a package's module
  (`formats.adapter_files.save_adapter`: the longest prefix that imports, then attributes), and
  none cites a module that moved by its old name;
- every function the README's equation index cites is the math alone: no `raise`, no `check_*`
  call (arguments are checked at the doors: constructors, apply_*, loads, the command lines);
- every `tests/test_x.py::test_name` they cite is a test function in that file;
- every file they name in backticks exists, and every relative link leads somewhere;
- the README stays a front page (at most 16,000 bytes) that links to every docs page;
- the results table is kept by hand in one place, with the columns train.py prints;
- the quick start is the two commands, and CI runs the second one;
- the NF4 table in docs/nf4.md is the one nf4.nf4_code() builds.
A module that does not exist yet fails only the names that cite it. Line lengths and PEP 8 layout
are ruff's (tests/test_layout.py); this file checks the shell scripts' lines only.
"""
import ast
import glob
import importlib
import inspect
import os
import re
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIER_1 = ("tiny_gpt", "lora", "dora", "vera", "nf4", "qlora", "paged_optim", "adapters", "checks")
ENTRY_POINTS = ("train", "sample", "bench", "oracle", "experiments")
PACKAGES = ("fast_paths", "integrity", "formats", "training", "oracle_kit", "papers")
MODULES = TIER_1 + ENTRY_POINTS + PACKAGES
# Modules that moved into a package (issue 21): a citation by the old name is stale.
MOVED = {"adapter_files": "formats.adapter_files", "safetensors_io": "formats.safetensors_io",
         "runs": "training.runs", "oracle_cases": "oracle_kit.cases",
         "oracle_golden": "oracle_kit.golden"}
# `lora.py`, `docs/nf4.md`: file names, not attributes.
FILE_SUFFIXES = {"py", "md", "txt", "json", "safetensors", "pt", "png", "sh", "ini"}
README_MAX_BYTES = 16_000
TABLE_HEADER = "method  trainable"  # the first words of the table train.py prints
TEST_COMMAND = "pip install -r requirements-dev.txt && python -m pytest"
QUICK_START = ["pip install -r requirements.txt && python train.py", TEST_COMMAND]


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def doc_files():
    pages = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    return ["README.md"] + pages


def without_urls(text):
    return re.sub(r"https?://\S+", "", text)


CITATION = r"(?<![\w./-])(%s)\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)"
NAME = re.compile(CITATION % "|".join(MODULES))
OLD_NAME = re.compile(CITATION % "|".join(MOVED))
TEST_REF = re.compile(r"tests/(test_\w+\.py)::(\w+)")


def cited_names():
    found = set()
    for doc in doc_files():
        for module, attr in NAME.findall(without_urls(read(doc))):
            if attr.split(".")[0] not in FILE_SUFFIXES:
                found.add((doc, module, attr))
    return sorted(found)


def cited_tests():
    return sorted({(doc, f, name) for doc in doc_files()
                   for f, name in TEST_REF.findall(read(doc))})


def test_docs_exist_and_cite_every_method_module():
    modules = {m for _, m, _ in cited_names()}
    expected = {"tiny_gpt", "lora", "dora", "vera", "nf4", "qlora", "paged_optim", "adapters"}
    assert expected <= modules, expected - modules
    assert len(doc_files()) >= 8, "README.md and at least seven pages in docs/"


def resolve(dotted, where):
    """The object `dotted` names: its longest prefix that imports as a module, then attributes."""
    parts = dotted.split(".")
    missing_prefixes = {".".join(parts[:end]) for end in range(2, len(parts) + 1)}
    for end in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:end]))
            break
        except ModuleNotFoundError as error:
            if error.name not in missing_prefixes:
                raise  # the top module, or something it imports, is missing
    for part in parts[end:]:
        assert hasattr(obj, part), f"{where} cites {dotted}, but {part!r} does not exist"
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("doc,module,attr", cited_names())
def test_every_cited_name_exists(doc, module, attr):
    resolve(f"{module}.{attr}", doc)


@pytest.mark.parametrize("doc", doc_files())
def test_no_doc_cites_a_moved_module_by_its_old_name(doc):
    stale = sorted({f"{module}.{attr}" for module, attr in OLD_NAME.findall(without_urls(read(doc)))
                    if attr.split(".")[0] not in FILE_SUFFIXES})
    assert not stale, f"{doc} cites {stale}: moved to {MOVED}"


def functions_in(path):
    tree = ast.parse(read(os.path.join("tests", path)))
    return {node.name for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


@pytest.mark.parametrize("doc,path,name", cited_tests())
def test_every_cited_test_exists(doc, path, name):
    assert os.path.exists(os.path.join(ROOT, "tests", path)), f"{doc} cites tests/{path}: missing"
    assert name in functions_in(path), f"{doc} cites tests/{path}::{name}: no such function"


def test_the_equation_index_gives_code_and_test_on_every_row():
    section = read("README.md").split("## Equation index", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and "---" not in line]
    assert len(rows) > 20
    for row in rows[1:]:  # after the header
        assert NAME.search(row) and TEST_REF.search(row), f"row without code or test: {row}"


def equation_index_code():
    """Every `module.name` in the code column of the README's equation index."""
    section = read("README.md").split("## Equation index", 1)[1].split("\n## ", 1)[0]
    found = set()
    for line in section.splitlines():
        cells = line.split("|")
        if line.startswith("|") and "---" not in line and len(cells) > 3:
            found |= {f"{module}.{attr}" for module, attr in NAME.findall(cells[3])}
    return sorted(found)


def checks_in(function):
    """(line in its file, source line) of each `raise` and `check_*(...)` call in `function`."""
    lines, first = inspect.getsourcelines(function)
    tree = ast.parse(textwrap.dedent("".join(lines)))
    found = []
    for node in ast.walk(tree):
        call = node.func if isinstance(node, ast.Call) else None
        called = getattr(call, "id", None) or getattr(call, "attr", None) or ""
        if isinstance(node, ast.Raise) or called.startswith("check_"):
            found.append((first + node.lineno - 1, lines[node.lineno - 1].strip()))
    return sorted(set(found))


@pytest.mark.parametrize("name", equation_index_code())
def test_the_functions_of_the_equation_index_are_the_math_alone(name):
    """No raise, no check_* call: the arguments are checked at the doors, not in the equations.
    A cited class is a door (its constructor checks), so only functions and methods are read."""
    obj = resolve(name, "README.md's equation index")
    if inspect.isclass(obj):
        return
    function = inspect.unwrap(obj)
    assert inspect.isfunction(function), f"{name} is cited as code but is {type(obj).__name__}"
    path = os.path.relpath(inspect.getsourcefile(function), ROOT)
    found = [f"{path}:{line}: {text}" for line, text in checks_in(function)]
    assert not found, f"{name} checks its arguments, so it is not the math alone: {found}"


@pytest.mark.parametrize("doc", doc_files())
def test_every_file_named_exists(doc):
    for name in set(re.findall(r"`([\w/.-]+\.(?:py|txt|md|ini|sh))`", read(doc))):
        if name.startswith(("runs/", "/")):
            continue  # written by a run, not part of the repository
        assert os.path.exists(os.path.join(ROOT, name)), f"{doc} names {name}, which is missing"


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", doc_files())
def test_every_relative_link_resolves(doc):
    for target in re.findall(r"\]\(([^)\s]+)\)", read(doc)):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), path)) if path else \
            os.path.join(ROOT, doc)
        assert os.path.exists(full), f"{doc} links to {target}, which is missing"
        if anchor and full.endswith(".md"):
            with open(full, encoding="utf-8") as f:
                text = f.read()
            headings = {slug(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}
            headings |= set(re.findall(r'<a id="([^"]+)"></a>', text))  # explicit anchors
            assert anchor in headings, f"{doc} links to {target}: no such heading"


def test_readme_is_a_front_page_that_links_every_docs_page():
    assert len(read("README.md").encode("utf-8")) <= README_MAX_BYTES
    links = set(re.findall(r"\]\((docs/[\w.-]+\.md)", read("README.md")))
    for page in doc_files()[1:]:
        assert page in links, f"README.md does not link {page}"


def quick_start_commands():
    section = read("README.md").split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", section, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_quick_start_is_exactly_two_commands():
    assert quick_start_commands() == QUICK_START


def test_ci_runs_the_readme_test_command():
    ci = read(".ci/run")
    assert TEST_COMMAND in [line.strip() for line in ci.splitlines()]
    assert ci.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in ci


def test_the_results_table_is_kept_in_one_place_with_the_columns_train_py_prints():
    import train
    row = dict(method="lora", trainable=1, trainable_fraction=0.5, adapter_bytes=1,
               memory=dict(weights=1, total=2), allreduce_bytes=1, ms_per_step=1.0, val_before=2.0,
               val_after=1.0)
    header = train.format_table([row]).splitlines()[0].split()
    copies = [(doc, line.split()) for doc in doc_files() for line in read(doc).splitlines()
              if line.startswith(TABLE_HEADER)]
    assert [doc for doc, _ in copies] == ["README.md"], "the table is pasted once, in README.md"
    assert copies[0][1] == header


def test_nf4_table_in_the_docs_is_the_code_the_module_builds():
    import nf4
    cell = r"(\d+) \| ([01]{4}) \| (-?[\d.]+)"
    rows = re.findall(rf"^\| {cell} \| \| {cell} \|$", read("docs/nf4.md"), flags=re.M)
    printed = {}
    for row in rows:
        for index, bits, value in (row[:3], row[3:]):
            assert int(bits, 2) == int(index)
            printed[int(index)] = float(value)
    code = nf4.nf4_code().tolist()  # float32 values, widened exactly to Python floats
    assert [printed[i] for i in range(16)] == code  # printed exactly, as the page says


def test_no_line_of_a_shell_script_is_over_100_characters():
    """ruff checks the Python files (E501); the shell scripts it does not read are checked here."""
    paths = [os.path.join("tests", n) for n in os.listdir(os.path.join(ROOT, "tests"))
             if n.endswith(".sh")]
    paths.append(os.path.join(".ci", "run"))
    assert len(paths) >= 2
    long = [f"{path}:{i}" for path in sorted(paths)
            for i, line in enumerate(read(path).splitlines(), 1) if len(line) > 100]
    assert not long, f"lines over 100 characters: {long}"
