#!/usr/bin/env bash
# The GPU checks in one command, for a machine with a CUDA device and the project's requirements:
#
#     bash tests/gpu_check.sh [OUTFILE]        # OUTFILE defaults to gpu_figures.md
#
# It installs nothing. It runs every test that needs CUDA (those whose skip condition or test id
# names CUDA, in the test files that mention it; without CUDA they skip), then
# `bench.py --device cuda --only nf4,paged,train`, and writes the GPU's name, the pytest summary and
# the bench table to OUTFILE as Markdown. Without a CUDA device it stops at once with a one-line
# reason and status 1. It exits non-zero when a test fails or the bench fails (the file then holds
# what ran). CI cannot run it: it has no GPU.
set -uo pipefail

fail() { echo "gpu_check.sh: $*" >&2; exit 1; }

out="${1:-gpu_figures.md}"
[ -d "$(dirname -- "$out")" ] || fail "the folder of $out does not exist"
out="$(cd -- "$(dirname -- "$out")" && pwd)/$(basename -- "$out")"
cd -- "$(dirname -- "$0")/.." || fail "cannot enter the repository root"

reason="$(python -c 'import torch
if not torch.cuda.is_available():
    print("no CUDA device: torch.cuda.is_available() is False (torch", torch.__version__ + ",",
          "built for CUDA", str(torch.version.cuda) + ")")' 2>&1)" ||
    fail "python cannot import torch: install requirements.txt ($(echo "$reason" | tail -n 1))"
[ -z "$reason" ] || fail "$reason"

work="$(mktemp -d)" || fail "cannot make a temporary folder"
trap 'rm -rf -- "$work"' EXIT
gpu="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null |
       head -n 1)"
[ -n "$gpu" ] || gpu="$(python -c 'import torch; print(torch.cuda.get_device_name(0))')"
versions="$(python -c 'import torch; print("torch", torch.__version__, "CUDA",
                                           torch.version.cuda)')"

mapfile -t files < <(grep -il cuda tests/test_*.py)
echo "gpu_check.sh: the CUDA tests of ${files[*]}" >&2
# A plugin keeps only the tests that need CUDA: a skipif whose reason names CUDA, or such an id.
python - "${files[@]}" <<'EOF' 2>&1 | tee "$work/pytest.txt"
import sys

import pytest


class OnlyCuda:
    def pytest_collection_modifyitems(self, config, items):
        def needs_cuda(item):
            reasons = " ".join(str(mark.kwargs.get("reason", "")) for mark in
                               item.iter_markers("skipif"))
            return "cuda" in (reasons + item.name).lower()
        keep = [item for item in items if needs_cuda(item)]
        config.hook.pytest_deselected(items=[item for item in items if not needs_cuda(item)])
        items[:] = keep


sys.exit(pytest.main(["-q", "-rs", "-p", "no:cacheprovider", *sys.argv[1:]],
                     plugins=[OnlyCuda()]))
EOF
tests_status=$?

echo "gpu_check.sh: bench.py --device cuda --only nf4,paged,train" >&2
python bench.py --device cuda --only nf4,paged,train --json "$work/bench.json" \
    > "$work/bench.txt"
bench_status=$?

{
    echo "# GPU figures"
    echo
    commit="$(git rev-parse --short HEAD 2>/dev/null)"
    echo "GPU: $gpu; $versions; $(date -u +%Y-%m-%d), commit ${commit:-unknown}"
    echo
    echo "## CUDA tests (exit status $tests_status)"
    echo
    echo '```'
    tail -n 25 "$work/pytest.txt"
    echo '```'
    echo
    echo "## python bench.py --device cuda --only nf4,paged,train (exit status $bench_status)"
    echo
    echo '```'
    cat "$work/bench.txt"
    echo '```'
} > "$out"
echo "gpu_check.sh: wrote $out" >&2
[ "$tests_status" -eq 0 ] || fail "CUDA tests failed (status $tests_status): see $out"
[ "$bench_status" -eq 0 ] || fail "bench.py failed (status $bench_status): see $out"
