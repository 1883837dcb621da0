"""Every exercise of docs/exercises.md is honest: its tests pass on the real code (the rest of the
suite runs them), and fail when the function is blanked or replaced by a known wrong answer.

Each check runs the exercise's own tests in a nested pytest session in this process
(`pytest.main` with the `exercise` profile: few examples, no shrinking; see QUIET), with the
function substituted, and asserts
that at least one of them fails. Only test files whose text mentions `mark.exercise` are collected
to find the markers: a file that marks no test costs nothing.
"""
import functools
import os

import pytest

import exercises

TESTS = os.path.dirname(os.path.abspath(__file__))
# The nested sessions only need to know whether a test failed: stop at the first failure and leave
# out what costs time there (tracebacks; Hypothesis' failure patches, which import a parser; the
# unraisable-exception plugin's five full garbage collections at each session's end).
QUIET = ["-x", "-q", "--tb=no", "--no-header", "-p", "no:cacheprovider",
         "-p", "no:hypothesispytest", "-p", "no:unraisableexception"]


class Outcomes:
    """A pytest plugin that counts what the nested session's tests did."""
    def __init__(self):
        self.passed, self.failed = [], []

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.failed:
            (self.failed if report.failed else self.passed).append(report.nodeid)


def files_with_markers() -> list[str]:
    """The test files that mark a test for an exercise (a quick look at their text)."""
    names = sorted(n for n in os.listdir(TESTS) if n.startswith("test_") and n.endswith(".py"))
    paths = [os.path.join(TESTS, name) for name in names]
    return [path for path in paths if "mark.exercise" in open(path, encoding="utf-8").read()]


@functools.cache
def marked_tests() -> dict:
    """{exercise: [test node ids]}, from one collection of the files that mark tests."""
    collector = CollectMarkers()
    pytest.main(files_with_markers() + ["--collect-only", "-q", "-p", "no:cacheprovider"],
                plugins=[collector])
    return collector.found


def run_exercise(name: str) -> Outcomes:
    """Run the exercise's tests (only their files are collected, which keeps this fast)."""
    outcomes = Outcomes()
    files = sorted({node.split("::")[0] for node in marked_tests().get(name, [])})
    assert files, f"no test is marked for exercise {name}"
    root = os.path.dirname(TESTS)
    code = pytest.main([os.path.join(root, f) for f in files] +
                       ["--exercise", name, *QUIET],
                       plugins=[outcomes])
    assert code in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), (name, code)
    return outcomes


@pytest.mark.parametrize("exercise", exercises.EXERCISES, ids=lambda e: e.name)
def test_blanked_function_fails_its_exercise(exercise):
    with exercises.blanked(exercise.name):
        outcomes = run_exercise(exercise.name)
    assert outcomes.failed, f"{exercise.name} blanked, yet all its tests pass: {outcomes.passed}"


WRONG = [(e, label) for e in exercises.EXERCISES for label in e.wrong_answers]


@pytest.mark.parametrize("exercise,label", WRONG, ids=[f"{e.name}-{label}" for e, label in WRONG])
def test_known_wrong_answer_is_rejected(exercise, label):
    with exercises.substituted(exercise.name, exercise.wrong_answers[label]):
        outcomes = run_exercise(exercise.name)
    assert outcomes.failed, f"{exercise.name}: the wrong answer '{label}' passes every test"


def test_every_exercise_has_tests_and_every_marker_an_exercise():
    found = marked_tests()
    listed = [e.name for e in exercises.EXERCISES]
    assert len(listed) == len(set(listed)), "an exercise is listed twice"
    assert set(found) == set(listed), (
        f"marked but not listed: {sorted(set(found) - set(listed))}; "
        f"listed but no test marked: {sorted(set(listed) - set(found))}")


class CollectMarkers:
    def __init__(self):
        self.found = {}

    def pytest_collection_modifyitems(self, items):
        for item in items:
            for mark in item.iter_markers("exercise"):
                for name in mark.args:
                    self.found.setdefault(name, []).append(item.nodeid)
