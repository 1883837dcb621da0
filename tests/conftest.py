"""Shared test setup: Hypothesis profiles and the project root on sys.path.

Two profiles:
- ``ci``: chosen when the ``CI`` environment variable is set. Derandomized (the same examples on every
  run, so a red CI is reproducible) and sized so that the whole suite stays under about 3 minutes on
  2 cores.
- ``dev``: the default elsewhere. Random examples and more of them, to find new counterexamples.

Select one by hand with ``pytest --hypothesis-profile=dev``.
"""
import os
import sys

import torch
from hypothesis import HealthCheck, settings

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
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# The tensors in the tests are tiny: handing each op to a second OpenMP thread costs more than the
# arithmetic (a tiny GPT forward: 0.5 ms on 1 thread, up to 180 ms on 2 when the cores are busy).
torch.set_num_threads(1)
