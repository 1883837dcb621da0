"""The docs stay true to the code.

README.md and every page in docs/ are checked for:
- every `module.name` they cite (a project module, then attributes) resolves in the code;
- every `tests/test_x.py::test_name` they cite is a test function in that file;
- every file they name in backticks exists, and every relative link leads somewhere;
- the README stays a front page (at most 16,000 bytes) that links to every docs page;
- the results table is kept by hand in one place, with the columns train.py prints;
- the quick start is the two commands, and CI runs the second one;
- the file map's line counts are near the real ones;
- the NF4 table in docs/nf4.md is the one nf4.nf4_code() builds.
A module that does not exist yet fails only the names that cite it.
"""
import ast
import glob
import importlib
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ("adapters", "adapter_files", "safetensors_io", "checks", "oracle", "oracle_cases",
           "oracle_golden", "runs", "sample", "train", "bench", "tiny_gpt", "lora", "dora", "vera",
           "nf4", "qlora", "paged_optim")
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


NAME = re.compile(r"(?<![\w./-])(%s)\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)" % "|".join(MODULES))
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


@pytest.mark.parametrize("doc,module,attr", cited_names())
def test_every_cited_name_exists(doc, module, attr):
    obj = importlib.import_module(module)
    for part in attr.split("."):
        assert hasattr(obj, part), f"{doc} cites {module}.{attr}, but {part!r} does not exist"
        obj = getattr(obj, part)


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
                headings = {slug(h) for h in re.findall(r"^#+ (.*)$", f.read(), flags=re.M)}
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


def test_file_map_line_counts_are_near_the_real_ones():
    rows = re.findall(r"^\| \[`([\w/.-]+)`\]\([^)]*\) \| (\d+) \|", read("README.md"), flags=re.M)
    assert len(rows) >= 10
    for name, stated in rows:
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            actual = sum(1 for _ in f)
        # Loose on purpose: the map orients a reader; it should not break on every small edit.
        assert abs(int(stated) - actual) <= max(20, actual // 5), f"{name}: {stated} vs {actual}"


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


# Issue 13's limits: a library module at most 350 lines, the scripts (train.py, bench.py, sample.py)
# at most 450; no line of code or test over 100 characters.
SCRIPTS = {"train.py", "bench.py", "sample.py"}


def test_every_module_keeps_the_reading_limits():
    for name in sorted(n for n in os.listdir(ROOT) if n.endswith(".py")):
        lines = read(name).splitlines()
        limit = 450 if name in SCRIPTS else 350
        assert len(lines) <= limit, f"{name}: {len(lines)} lines, more than {limit}"


def test_no_line_of_code_is_over_100_characters():
    """Code and tests; docs' tables are one line a row and may be longer."""
    paths = [n for n in os.listdir(ROOT) if n.endswith(".py")]
    paths += [os.path.join("tests", n) for n in os.listdir(os.path.join(ROOT, "tests"))
              if n.endswith((".py", ".sh"))]
    long = [f"{path}:{i}" for path in sorted(paths)
            for i, line in enumerate(read(path).splitlines(), 1) if len(line) > 100]
    assert not long, f"lines over 100 characters: {long}"
