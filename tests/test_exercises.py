"""Every exercise of docs/exercises.md is honest, checked on copies of the project in plain source.

tests/exercises.py writes two copies (see its docstring) and runs one pytest session in each, in
subprocesses side by side:
- the handout a student gets (`python tests/exercises.py handout DIR`): each exercise's tests
  fail there;
- the rehearsal copy: each exercise's tests pass on the real code, and fail with the function
  blank, with each of its known wrong answers, and, while it is blank, for each exercise it says
  it breaks.
The tests below read the two JSON reports, so a red one names the exercise and the variant. The
handout's text is checked too: one `raise` a body, the docstring kept, and no answer of a gradient
exercise in its docstrings or in the docs' visible text.
"""
import ast
import functools
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

import exercises

TESTS = os.path.dirname(os.path.abspath(__file__))
NAMES = [e.name for e in exercises.EXERCISES]
WRONG = [(e.name, label) for e in exercises.EXERCISES for label in e.wrong_answers]
BREAKS = [(e.name, other) for e in exercises.EXERCISES for other in e.breaks]
# Both sessions run the exercises' tests under the `exercise` Hypothesis profile (tests/conftest.py)
# on 2 cores side by side; far less than this, but the machine may be shared.
TIMEOUT_S = 600


@functools.cache
def copies() -> dict:
    """{"handout": (its directory, its report), "rehearsal": (...)}, each session run once."""
    work = tempfile.mkdtemp(prefix="exercises-")
    running = {}
    for mode, make in (("handout", exercises.handout), ("rehearsal", exercises.rehearsal)):
        copy = make(os.path.join(work, mode))
        report = os.path.join(work, f"{mode}.json")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(copy, "tests"), copy]),
                   PYTHONDONTWRITEBYTECODE="1")
        running[mode] = (copy, report, subprocess.Popen(
            [sys.executable, os.path.join("tests", "exercises.py"), "check", mode, report],
            cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = {}
    for mode, (copy, report, process) in running.items():
        output, _ = process.communicate(timeout=TIMEOUT_S)
        assert process.returncode == 0, f"the {mode} session failed:\n{output[-3000:]}"
        with open(report, encoding="utf-8") as file:
            results[mode] = (copy, json.load(file))
    return results


def outcome(mode: str, name: str, variant: str) -> list:
    return copies()[mode][1]["outcomes"][f"{name} | {variant}"]


def test_every_exercise_has_tests_and_every_marker_an_exercise():
    marked = copies()["rehearsal"][1]["marked"]
    assert len(NAMES) == len(set(NAMES)), "an exercise is listed twice"
    assert set(marked) == set(NAMES), (
        f"marked but not listed: {sorted(set(marked) - set(NAMES))}; "
        f"listed but no test marked: {sorted(set(NAMES) - set(marked))}")
    assert copies()["handout"][1]["marked"] == marked, "the handout collects other tests"


def test_at_least_15_exercises_over_7_modules():
    modules = {name.split(".")[0] for name in NAMES}
    assert len(NAMES) >= 15 and len(modules) >= 7, (len(NAMES), sorted(modules))


def test_an_exercise_breaks_only_later_ones():
    """In a handout every exercise is blank at once: a student working in teaching order must
    never meet tests that also need a later exercise."""
    for name, other in BREAKS:
        assert other in NAMES and NAMES.index(other) > NAMES.index(name), (name, other)


@pytest.mark.parametrize("name", NAMES)
def test_its_tests_pass_on_the_real_code(name):
    failed = outcome("rehearsal", name, exercises.REAL)
    assert not failed, f"{name}: on the real code, in the exercise profile, these fail: {failed}"


@pytest.mark.parametrize("name", NAMES)
def test_the_handout_fails_its_tests(name):
    assert outcome("handout", name, exercises.BLANKED), f"{name}: all its tests pass in the handout"


@pytest.mark.parametrize("name", NAMES)
def test_blanked_in_the_rehearsal_fails_its_tests(name):
    assert outcome("rehearsal", name, exercises.BLANKED), f"{name} blanked, yet its tests pass"


@pytest.mark.parametrize("name,label", WRONG, ids=[f"{n}-{label}" for n, label in WRONG])
def test_known_wrong_answer_is_rejected(name, label):
    assert outcome("rehearsal", name, label), f"{name}: the wrong answer '{label}' passes"


@pytest.mark.parametrize("name,other", BREAKS, ids=[f"{n}-breaks-{o}" for n, o in BREAKS])
def test_what_a_blank_is_said_to_break_it_breaks(name, other):
    assert outcome("rehearsal", other, f"while {name} is blanked"), (
        f"{name}'s entry says blanking it breaks {other}, but {other}'s tests pass")


def handout_function(exercise):
    copy = copies()["handout"][0]
    path, qualified = exercises.locate(exercise.name, copy)
    with open(path, encoding="utf-8") as file:
        return exercises.function_node(ast.parse(file.read()), qualified, exercise.name)


@pytest.mark.parametrize("exercise", exercises.EXERCISES, ids=NAMES)
def test_the_handout_has_the_contract_as_docstring_and_one_raise(exercise):
    path, qualified = exercises.locate(exercise.name)
    with open(path, encoding="utf-8") as file:
        real = exercises.function_node(ast.parse(file.read()), qualified, exercise.name)
    blank = handout_function(exercise)
    assert " ".join(ast.get_docstring(blank).split()) == exercises.contract(exercise)
    assert ast.dump(blank.args) == ast.dump(real.args)
    assert len(blank.body) == 2 and ast.unparse(blank.body[1]) == (
        f"raise NotImplementedError('see docs/exercises.md#{exercise.anchor}')")


@pytest.mark.parametrize("exercise", exercises.EXERCISES, ids=NAMES)
def test_the_contract_holds_no_piece_of_the_answer(exercise):
    """The handout's docstring and the visible part of the exercise's section (before its wrong
    answers, which name mistakes) hold none of the answer's fragments: the listed ones, each
    equation of the reference's docstring (its right side and each `a op b` in it) and each
    statement of the reference's body, compared without spaces and in one notation."""
    fragments = exercises.answer_fragments(exercise)
    path, qualified = exercises.locate(exercise.name)
    with open(path, encoding="utf-8") as file:
        source = file.read()
    # the check can fail: the reference itself (its docstring and body) holds its fragments
    reference = exercises.compact(ast.get_source_segment(source, exercises.function_node(
        ast.parse(source), qualified, exercise.name)))
    assert [f for f in fragments if f in reference], f"{exercise.name}: no fragment of its answer"
    section = visible(exercise_sections()[exercise.name]).split("**Wrong answers")[0]
    for where, text in (("the handout's docstring", ast.get_docstring(handout_function(exercise))),
                        ("its section of docs/exercises.md", section)):
        found = sorted(f for f in fragments if f in exercises.compact(text))
        assert not found, f"{exercise.name}: {where} shows {found}, part of the answer"


def visible(markdown: str) -> str:
    """A page's text without its collapsed hints (<details> ... </details>)."""
    return re.sub(r"<details>.*?</details>", "", markdown, flags=re.S)


def handout_texts(exercise) -> dict:
    """{where: text} a student sees without opening a hint: the docs' visible text, and every
    docstring of the exercise's module and of its test files, in the handout."""
    copy = copies()["handout"][0]
    texts = {}
    pages = sorted(n for n in os.listdir(os.path.join(copy, "docs")) if n.endswith(".md"))
    for name in ["README.md"] + [f"docs/{n}" for n in pages]:  # not docs/figures/
        with open(os.path.join(copy, name), encoding="utf-8") as file:
            texts[name] = visible(file.read())
    module = exercises.locate(exercise.name, copy)[0]
    for path in [module] + exercises.test_files(exercise.name, os.path.join(copy, "tests")):
        with open(path, encoding="utf-8") as file:
            tree = ast.parse(file.read())
        docstrings = [ast.get_docstring(node) or "" for node in ast.walk(tree) if isinstance(
            node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        texts[os.path.relpath(path, copy)] = "\n".join(docstrings)
    return texts


# The gradient exercises' formulas are in no paper: the handout shows them nowhere outside a hint.
# The other exercises' formulas are the papers' equations, which the reference's module docstrings
# and docs pages state (test_the_contract_holds_no_piece_of_the_answer covers their contracts).
GRADIENTS = [e for e in exercises.EXERCISES if e.name.endswith("_grads")]


@pytest.mark.parametrize("exercise", GRADIENTS, ids=[e.name for e in GRADIENTS])
def test_the_handout_does_not_give_the_answer_away(exercise):
    assert exercise.answers, f"{exercise.name}: no answer listed"
    for where, text in handout_texts(exercise).items():
        found = [answer for answer in exercise.answers if answer in text]
        assert not found, f"{where} shows {found}, part of {exercise.name}'s answer"


def exercise_sections() -> dict:
    return exercises.exercise_sections()


def test_the_docs_page_has_every_exercise_in_order_with_its_anchor_and_command():
    with open(os.path.join(os.path.dirname(TESTS), "docs", "exercises.md"), encoding="utf-8") as f:
        page = f.read()
    assert list(exercise_sections()) == NAMES, "docs/exercises.md: sections in teaching order"
    for exercise in exercises.EXERCISES:
        text = exercise_sections()[exercise.name]
        assert f'<a id="{exercise.anchor}"></a>\n### `{exercise.name}`' in page, exercise.name
        assert f"**Check:** `python -m pytest --exercise {exercise.name}`" in text, exercise.name
        for field in ("**Read:**", "**Contract:**", "<summary>"):
            assert field in text, (exercise.name, field)


@pytest.mark.parametrize("exercise", exercises.EXERCISES, ids=NAMES)
def test_the_docs_page_lists_its_wrong_answers_and_what_a_blank_breaks(exercise):
    text = exercise_sections()[exercise.name]
    listed = re.findall(r"^- \*\*(.+?)\*\*:", text.split("**Wrong answers the tests reject:**")[-1],
                        flags=re.M)
    assert listed == list(exercise.wrong_answers), (exercise.name, listed)
    breaks = re.search(r"\*\*Blanking it also breaks:\*\* (.*?)(?:\n\n|\Z)", text, flags=re.S)
    assert breaks, f"{exercise.name}: no 'Blanking it also breaks:' line"
    said = set(re.findall(r"`([\w.]+)`", breaks.group(1)))
    assert said == set(exercise.breaks), (exercise.name, said, exercise.breaks)
    assert exercise.breaks or breaks.group(1).startswith("nothing else"), exercise.name


def test_handout_refuses_an_existing_directory_in_one_line(tmp_path, capsys):
    assert exercises.main(["handout", str(tmp_path)]) == 1
    assert exercises.main(["handout", str(tmp_path / "new"), "lora.no_such_function"]) == 1
    assert exercises.main(["handout"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and "exists already" in lines[0] and "not an exercise" in lines[1]
    assert not (tmp_path / "new").exists()
