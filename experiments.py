"""The papers in miniature: each paper's signature claim, run on the tiny GPT.

    python experiments.py list                 # the experiments and their claims
    python experiments.py lora-rank            # run one: progress, table, JSON and figure
    python experiments.py lora-rank --quick --seeds 2 --out runs/try

Each run prints its table and writes DIR/NAME.json (every number, per seed) and, when matplotlib
is installed, DIR/NAME.png (default DIR: runs/experiments, which also caches the pretrained base).
The experiments live in papers/ (the API: papers/runner.py); results and verdicts are in
docs/experiments.md.
"""
from __future__ import annotations

import sys

import torch

from checks import check_int
from papers import dora_experiments, lora_experiments, qlora_experiments, runner, vera_experiments
from papers.measures import magnitude_direction_change, subspace_similarity
from training.flags import Parser, checked, writable_folder

EXPERIMENTS = runner.collect(lora_experiments.EXPERIMENTS, dora_experiments.EXPERIMENTS,
                             vera_experiments.EXPERIMENTS, qlora_experiments.EXPERIMENTS)

__all__ = ["EXPERIMENTS", "magnitude_direction_change", "subspace_similarity", "main"]


def build_parser() -> Parser:
    p = Parser(prog="experiments.py", description=__doc__.split("\n")[0])
    p.add_argument("name", help="'list', or the experiment to run: " + ", ".join(EXPERIMENTS))
    p.add_argument("--quick", action="store_true", help="the quick size (train.py --quick's base)")
    p.add_argument("--seeds", type=checked(check_int, low=1, high=100), default=3,
                   help="seeds per configuration, 0..N-1 (default 3)")
    p.add_argument("--out", type=writable_folder, default="runs/experiments",
                   help="where NAME.json, NAME.png and the base's cache go (runs/experiments)")
    p.add_argument("--figures", type=writable_folder,
                   help="where NAME.png goes (default: --out), e.g. docs/figures")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="default cpu")
    return p


def main(argv=None) -> dict | None:
    args = (parser := build_parser()).parse_args(argv)
    if args.name == "list":
        for experiment in EXPERIMENTS.values():
            print(f"{experiment.name:<20} {experiment.claim}")
        return None
    experiment = EXPERIMENTS.get(args.name)
    if experiment is None:
        parser.error(f"argument name: unknown experiment {args.name!r}; one of "
                     f"{', '.join(EXPERIMENTS)} (or 'list')")
    if args.seeds < experiment.min_seeds:
        parser.error(f"argument --seeds: {experiment.name} needs at least {experiment.min_seeds} "
                     f"seeds, got {args.seeds}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: CUDA is not available on this machine")
    try:
        return runner.run_experiment(experiment, "quick" if args.quick else "full",
                                     range(args.seeds), args.out, args.device,
                                     figures=args.figures)
    except OSError as error:
        print(f"experiments.py: cannot write {error.filename}: {error.strerror}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
