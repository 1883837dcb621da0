"""The README stays true: every function it names exists, and CI runs the README's test command."""
import importlib
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ("tiny_gpt", "adapters", "lora", "dora", "vera", "nf4", "qlora", "paged_optim", "train",
           "bench")


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def named_in_readme():
    """Every `module.name[.attr...]` in backticks whose module is one of ours."""
    pattern = re.compile(r"`(%s)\.([A-Za-z_][A-Za-z_0-9]*(?:\.[A-Za-z_][A-Za-z_0-9]*)*)(?:\(\))?`"
                         % "|".join(MODULES))
    found = pattern.findall(read("README.md"))
    return sorted({(m, attr) for m, attr in found if attr != "py"})  # `lora.py` is a file name


def test_readme_names_many_functions():
    # The map of equations to code names at least one function of each method's module.
    modules = {m for m, _ in named_in_readme()}
    assert {"tiny_gpt", "lora", "dora", "vera", "nf4", "qlora", "paged_optim"} <= modules


@pytest.mark.parametrize("module,attr", named_in_readme())
def test_every_name_the_readme_gives_exists(module, attr):
    obj = importlib.import_module(module)
    for part in attr.split("."):
        assert hasattr(obj, part), f"README names {module}.{attr}, but {part!r} does not exist"
        obj = getattr(obj, part)


def test_every_file_the_readme_names_exists():
    for name in set(re.findall(r"`([A-Za-z_/.-]+\.(?:py|txt|md))`", read("README.md"))):
        assert os.path.exists(os.path.join(ROOT, name)), f"README names {name}, which is missing"


def quick_start_commands():
    section = read("README.md").split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", section, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_quick_start_is_exactly_two_commands():
    assert quick_start_commands() == [
        "pip install -r requirements.txt && python train.py",
        "pip install -r requirements-dev.txt && python -m pytest",
    ]


def test_ci_runs_the_readme_test_command():
    ci_lines = [line.strip() for line in read(".ci/run").splitlines()]
    assert quick_start_commands()[1] in ci_lines
    assert read(".ci/run").startswith("#!/usr/bin/env bash") and "set -euo pipefail" in read(".ci/run")


def test_readme_table_has_the_columns_train_py_prints():
    import train
    row = dict(method="lora", trainable=1, trainable_fraction=0.5, adapter_bytes=1,
               memory=dict(weights=1, total=2), ms_per_step=1.0, val_before=2.0, val_after=1.0)
    header = train.format_table([row]).splitlines()[0].split()
    readme_headers = [line.split() for line in read("README.md").splitlines()
                      if line.startswith("method  trainable")]
    assert readme_headers and all(h == header for h in readme_headers)


def test_readme_nf4_table_is_the_code_the_module_builds():
    import nf4
    rows = re.findall(r"^\| (\d+) \| ([01]{4}) \| (-?[\d.]+) \| \| (\d+) \| ([01]{4}) \| (-?[\d.]+) \|$",
                      read("README.md"), flags=re.M)
    printed = {}
    for row in rows:
        for index, bits, value in (row[:3], row[3:]):
            assert int(bits, 2) == int(index)
            printed[int(index)] = float(value)
    code = nf4.nf4_code().tolist()  # float32 values, widened exactly to Python floats
    assert [printed[i] for i in range(16)] == code  # printed exactly, as the README says
