"""The layout is kept by tools: ruff (PEP 8 spacing, pyflakes, import order, tier 1's banned
imports) and import-linter (the packages' layers and the ground floor), both configured in
pyproject.toml; plus the graph of the top-level modules, which import-linter cannot see (grimp
builds graphs of packages only): no module imports one that imports it back, and tier 1 imports
only tier 1 and the ground floor. Functions are called directly, never found by name.
"""
import ast
import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIER_1 = {"tiny_gpt", "lora", "dora", "vera", "nf4", "qlora", "paged_optim", "adapters", "checks"}
GROUND_FLOOR = {"fast_paths", "integrity"}
PRODUCT = {"formats", "training", "oracle_kit", "papers"}
ENTRY_POINTS = {"train", "sample", "bench", "oracle", "experiments"}
PROJECT = TIER_1 | GROUND_FLOOR | PRODUCT | ENTRY_POINTS


def run(args):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_ruff_check_passes():
    result = run([sys.executable, "-m", "ruff", "check", "--no-cache", "."])
    assert result.returncode == 0, result.stdout + result.stderr


def test_lint_imports_passes():
    script = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    result = run([sys.executable, "-c", script, "--no-cache"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def imports_of(path):
    """The project's top-level names that the file at `path` imports, at any depth."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & PROJECT


def top_level_graph():
    """Each project module or package at the top, and the project names its files import."""
    graph = {}
    for path in glob.glob(os.path.join(ROOT, "*.py")):
        graph[os.path.basename(path)[:-3]] = imports_of(path)
    for package in GROUND_FLOOR | PRODUCT:
        files = glob.glob(os.path.join(ROOT, package, "**", "*.py"), recursive=True)
        graph[package] = set().union(*(imports_of(p) for p in files)) - {package}
    return graph


def test_the_top_level_holds_tier_1_the_entry_points_and_the_folders():
    extra = set(top_level_graph()) - PROJECT
    assert not extra, f"top-level modules outside the layout: {sorted(extra)}"


def test_tier_1_imports_only_tier_1_and_the_ground_floor():
    graph = top_level_graph()
    wrong = {m: sorted(graph[m] - TIER_1 - GROUND_FLOOR) for m in TIER_1 if m in graph}
    assert not any(wrong.values()), wrong


def test_no_module_imports_one_that_imports_it_back():
    graph = top_level_graph()
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    cycles.append(path + [start])
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    assert not cycles, cycles[:5]


def test_no_module_finds_a_function_by_name_or_re_exports_lazily():
    """Functions are called directly: no lookup through sys.modules, no module __getattr__."""
    paths = glob.glob(os.path.join(ROOT, "*.py"))
    for package in GROUND_FLOOR | PRODUCT:
        paths += glob.glob(os.path.join(ROOT, package, "**", "*.py"), recursive=True)
    found = []
    for path in sorted(paths):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            by_name = isinstance(node, ast.Attribute) and node.attr == "modules" and \
                isinstance(node.value, ast.Name) and node.value.id == "sys"
            lazy = isinstance(node, ast.FunctionDef) and node.name == "__getattr__" and \
                node in tree.body
            if by_name or lazy:
                found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert not found, found
