"""Every exercise of docs/exercises.md is honest: its tests pass on the real code, and fail when the
function is blanked or replaced by one of its known wrong answers.

All of it happens in one nested pytest session in this process: it collects the test files that
mark tests for exercises once, then, instead of pytest's own loop, runs each exercise's tests under
the `exercise` Hypothesis settings (few examples, no shrinking) once on the real code and once per
variant (blanked, each wrong answer) with the function substituted, stopping a variant at its first
failing test. The tests below read the outcomes, so a red one names the exercise and the variant.
"""
import contextlib
import functools
import os
import re

import pytest
from _pytest.runner import runtestprotocol
from hypothesis import settings

import exercises

TESTS = os.path.dirname(os.path.abspath(__file__))
# The nested session only needs to know whether a test failed: no tracebacks, no Hypothesis failure
# patches (they import a parser), none of the unraisable-exception plugin's garbage collections.
QUIET = ["-q", "--tb=no", "--no-header", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
         "-p", "no:unraisableexception", "-p", "no:warnings"]
REAL = "real code"
BLANKED = "blanked"


def files_with_markers() -> list[str]:
    """The test files that mark a test for an exercise (a quick look at their text)."""
    names = sorted(n for n in os.listdir(TESTS) if n.startswith("test_") and n.endswith(".py"))
    paths = [os.path.join(TESTS, name) for name in names]
    return [path for path in paths if "mark.exercise" in open(path, encoding="utf-8").read()]


def failures(items, stop_at_first: bool) -> list[str]:
    """Run the test items (setup, call, teardown) and return the node ids of those that failed."""
    failed = []
    for item in items:
        reports = runtestprotocol(item, log=False, nextitem=None)
        if any(report.failed for report in reports):
            failed.append(item.nodeid)
            if stop_at_first:
                break
    return failed


@contextlib.contextmanager
def exercise_settings(items):
    """Hypothesis binds a test's settings when its module is imported (here by the outer session,
    under its own profile): for the honesty run, each test takes the exercise profile's settings
    (few examples, no shrinking), and fewer examples still if its own settings ask for fewer."""
    profile, saved = settings.get_profile("exercise"), {}
    for item in items:
        test = getattr(item.obj, "__func__", item.obj)
        if getattr(test, "is_hypothesis_test", False) and test not in saved:
            saved[test] = bound = test._hypothesis_internal_use_settings
            test._hypothesis_internal_use_settings = settings(
                profile, max_examples=min(profile.max_examples, bound.max_examples))
    try:
        yield
    finally:
        for test, bound in saved.items():
            test._hypothesis_internal_use_settings = bound


class HonestyRun:
    """A plugin for the nested session: the exercises' tests, on the real code and each variant.

    outcomes[(exercise, variant)] = the failed node ids; marked[exercise] = its tests' node ids.
    """
    def __init__(self):
        self.outcomes, self.marked, self.items = {}, {}, {}

    def pytest_collection_modifyitems(self, items):
        for item in items:
            for mark in item.iter_markers("exercise"):
                for name in mark.args:
                    self.items.setdefault(name, []).append(item)
        self.marked = {name: [item.nodeid for item in found] for name, found in self.items.items()}

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session):
        with exercise_settings([item for found in self.items.values() for item in found]):
            for exercise in exercises.EXERCISES:
                self.check(exercise)
        return True  # pytest's own loop does not run

    def check(self, exercise):
        items = self.items.get(exercise.name, [])
        self.outcomes[exercise.name, REAL] = failures(items, stop_at_first=False)
        variants = {BLANKED: exercises.blanked(exercise.name)}
        variants.update({label: exercises.substituted(exercise.name, wrong)
                         for label, wrong in exercise.wrong_answers.items()})
        for label, substitution in variants.items():
            with substitution:
                self.outcomes[exercise.name, label] = failures(items, stop_at_first=True)
                if label == BLANKED:  # the exercises it says it breaks: do they?
                    for other in exercise.breaks:
                        self.outcomes[other, f"while {exercise.name} is blanked"] = failures(
                            self.items.get(other, []), stop_at_first=True)


@functools.cache
def honesty_run() -> HonestyRun:
    run = HonestyRun()
    code = pytest.main(files_with_markers() + QUIET, plugins=[run])
    assert code in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), f"nested session: {code}"
    return run


NAMES = [e.name for e in exercises.EXERCISES]
WRONG = [(e.name, label) for e in exercises.EXERCISES for label in e.wrong_answers]
BREAKS = [(e.name, other) for e in exercises.EXERCISES for other in e.breaks]


def test_every_exercise_has_tests_and_every_marker_an_exercise():
    marked = honesty_run().marked
    assert len(NAMES) == len(set(NAMES)), "an exercise is listed twice"
    assert set(marked) == set(NAMES), (
        f"marked but not listed: {sorted(set(marked) - set(NAMES))}; "
        f"listed but no test marked: {sorted(set(NAMES) - set(marked))}")
    assert all(other in NAMES and other != name for name, other in BREAKS), BREAKS


def test_at_least_15_exercises_over_7_modules():
    modules = {name.split(".")[0] for name in NAMES}
    assert len(NAMES) >= 15 and len(modules) >= 7, (len(NAMES), sorted(modules))


@pytest.mark.parametrize("name", NAMES)
def test_its_tests_pass_on_the_real_code(name):
    assert honesty_run().marked.get(name), f"no test is marked for {name}"
    failed = honesty_run().outcomes[name, REAL]
    assert not failed, f"{name}: on the real code, in the exercise profile, these fail: {failed}"


@pytest.mark.parametrize("name", NAMES)
def test_blanked_function_fails_its_exercise(name):
    assert honesty_run().outcomes[name, BLANKED], f"{name} blanked, yet all its tests pass"


@pytest.mark.parametrize("name,label", WRONG, ids=[f"{n}-{label}" for n, label in WRONG])
def test_known_wrong_answer_is_rejected(name, label):
    assert honesty_run().outcomes[name, label], f"{name}: the wrong answer '{label}' passes"


@pytest.mark.parametrize("name,other", BREAKS, ids=[f"{n}-breaks-{o}" for n, o in BREAKS])
def test_what_a_blank_is_said_to_break_it_breaks(name, other):
    assert honesty_run().outcomes[other, f"while {name} is blanked"], (
        f"{name}'s entry says blanking it breaks {other}, but {other}'s tests pass")


def exercise_sections() -> dict:
    """{exercise name: its section's text} from docs/exercises.md, in the page's order."""
    with open(os.path.join(os.path.dirname(TESTS), "docs", "exercises.md"), encoding="utf-8") as f:
        parts = re.split(r"^### `([^`]+)`", f.read(), flags=re.M)
    return {name: text.split("\n## ")[0] for name, text in zip(parts[1::2], parts[2::2])}


def test_the_docs_page_has_every_exercise_in_order_with_its_command():
    assert list(exercise_sections()) == NAMES, "docs/exercises.md: sections in teaching order"
    for exercise in exercises.EXERCISES:
        text = exercise_sections()[exercise.name]
        assert f"**Check:** `python -m pytest --exercise {exercise.name}`" in text, exercise.name
        for field in ("**Read:**", "**Write:**", "**Hints:**"):
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
