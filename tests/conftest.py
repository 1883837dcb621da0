"""Shared test setup: Hypothesis profiles, the project root on sys.path, and `--exercise`.

Hypothesis profiles:
- ``ci``: chosen when the ``CI`` environment variable is set. Derandomized (the same examples on
  every run, so a red CI is reproducible) and sized so that the whole suite stays under about
  3 minutes on 2 cores.
- ``dev``: the default elsewhere. Random examples and more of them, to find new counterexamples.
- ``exercise``: chosen by ``--exercise``. Few examples and no shrinking, so a red run returns in
  seconds; the first failing example is reported as found.
Select one by hand with ``pytest --hypothesis-profile=dev``.

``python -m pytest --exercise MODULE.FUNCTION`` runs exactly the tests marked
``@pytest.mark.exercise("MODULE.FUNCTION")``, and to be quick about it collects only the files that
hold them (read from their text, see tests/exercises.py's `test_files`); the direct comparisons
run before ``gradcheck`` (whose finite differences say less about what is wrong), tracebacks are
short (``--tb=short`` unless ``--tb`` is given). ``--exercise list`` prints every exercise of
docs/exercises.md with its test count. tests/exercises.py lists them in teaching order.
"""
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# deadline=None: a first call into torch can take far longer than later ones (lazy init, allocator
# warm-up), which Hypothesis would otherwise report as a flaky deadline.
settings.register_profile(
    "ci",
    max_examples=25,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    max_examples=60,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "exercise",
    max_examples=10,
    derandomize=True,
    deadline=None,
    database=None,  # a student's failing examples must not be replayed against the real code later
    phases=(Phase.explicit, Phase.reuse, Phase.generate),  # no shrinking: report what failed, fast
    suppress_health_check=list(HealthCheck),
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# The tensors in the tests are tiny: handing each op to a second OpenMP thread costs more than the
# arithmetic (a tiny GPT forward: 0.5 ms on 1 thread, up to 180 ms on 2 when the cores are busy).
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--exercise", default=None, metavar="MODULE.FUNCTION",
                     help="run only the tests of one exercise of docs/exercises.md; "
                          "'list' prints them all")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "exercise(name, ...): the test checks exercise `name` of docs/exercises.md")
    if config.getoption("--exercise"):
        settings.load_profile("exercise")
        if config.option.tbstyle == "auto":  # not set on the command line
            config.option.tbstyle = "short"


def pytest_ignore_collect(collection_path, config):
    """In exercise mode, skip the test files that hold none of the exercise's tests."""
    wanted = config.getoption("--exercise")
    name = collection_path.name
    if not wanted or not (name.startswith("test_") and name.endswith(".py")):
        return None
    import exercises
    marked = exercises.marked_in(str(collection_path))
    return None if (wanted in marked if wanted != "list" else marked) else True


def marked_exercises(items) -> dict:
    """{exercise name: [test items]} from the `exercise` markers."""
    found = {}
    for item in items:
        for mark in item.iter_markers("exercise"):
            for name in mark.args:
                found.setdefault(name, []).append(item)
    return found


def pytest_collection_modifyitems(config, items):
    wanted = config.getoption("--exercise")
    if not wanted:
        return
    import exercises  # tests/exercises.py: the exercises in teaching order
    found = marked_exercises(items)
    if wanted == "list":
        writer = config.pluginmanager.get_plugin("terminalreporter")
        writer.write_line(f"{len(exercises.EXERCISES)} exercises "
                          "(python -m pytest --exercise NAME runs one; see docs/exercises.md):")
        for number, exercise in enumerate(exercises.EXERCISES, 1):
            count = len(found.get(exercise.name, []))
            writer.write_line(f"{number:3d}. {exercise.name:<44} {count:3d} tests   "
                              f"{exercise.reading}")
        pytest.exit("listed the exercises", returncode=0)
    if wanted not in found:
        raise pytest.UsageError(f"--exercise {wanted!r}: no test is marked for it; "
                                "`python -m pytest --exercise list` lists the exercises")
    # The direct comparisons first, gradcheck last: a red run opens with the values that differ.
    keep = sorted(found[wanted], key=lambda item: "gradcheck" in item.name)
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep
    for item in keep:
        show_only_project_frames(item)


def in_project(entry) -> bool:
    path = str(entry.path)
    return path.startswith(ROOT + os.sep) and "site-packages" not in path


def show_only_project_frames(item):
    """A red run's tracebacks show the frames of this project only: torch's and Hypothesis's own
    frames (gradcheck's a dozen of them) teach a student nothing, and reading their source files to
    print them cost about 0.7 s of a red run's 4."""
    unfiltered = item._traceback_filter

    def project_frames(excinfo):
        traceback = unfiltered(excinfo)
        return traceback.filter(in_project) or traceback
    item._traceback_filter = project_frames


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield
    if item.config.getoption("--exercise") and hasattr(item, "_hypothesis_failing_examples"):
        # Hypothesis would turn the failing example into a patch file for the test's source: it
        # imports libcst (a second or more) and prints a line a student does not need.
        del item._hypothesis_failing_examples
