"""The runner of the papers in miniature: what an experiment is, the sizes it runs at, and the
shared steps every experiment takes (the pretrained base once, one fine-tuning run, its loss).

An experiment is an `Experiment` record, registered by name in a module of this folder:

    EXPERIMENTS = (
        Experiment(name="lora-rank", claim="LoRA Table 6: ...", run=run_rank,
                   table=rank_table, plot=plot_rank),
    )

and experiments.py collects each module's `EXPERIMENTS` (`collect(...)`) into its registry. The
record's fields:

    name      the command-line name (`python experiments.py NAME`)
    claim     the paper's claim, quoted, with its section, table or figure
    run       run(ctx: Context) -> dict: every number the experiment measures, per seed, plain
              JSON types (the runner adds the size, the seeds and the wall time)
    table     table(result) -> str: the text table the command prints, from the result alone
    plot      plot(result, path) -> None: one PNG at `path`; called only when matplotlib imports
              (the runner selects the Agg backend first), or None for an experiment without one
    min_seeds the fewest seeds the experiment can run with (e.g. 2 to compare two seeds)

`run` receives a `Context`: `ctx.size` (a `Size`: the base's TrainConfig, the fine-tuning steps and
batch), `ctx.seeds` (a tuple of ints), `ctx.base()` (the pretrained tiny GPT, pretrained once by
train.py's `pretrain` and cached in the output folder), `ctx.finetune(method, seed, ...)` (one
fine-tuning run through train.py's `prepare` and `train_loop`; it prints the progress line), and
`ctx.corpus`, `ctx.windows` (the fine-tuning text and its fixed validation windows).
Three sizes: "full" (train.py's default base), "quick" (train.py's --quick base, tens of seconds)
and "tiny" (the test suite's: a few steps of the quick model, seconds).

`run_experiment(experiment, size, seeds, out)` runs one: it prints the table and writes
`out/NAME.json` atomically and `out/NAME.png`.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch

import adapters
from formats.safetensors_io import atomic_write
from train import (
    METHOD_DEFAULTS,
    QUICK,
    TrainConfig,
    estimate_loss,
    eval_windows,
    make_optimizer,
    prepare,
    pretrain,
    train_loop,
)
from training.runs import build_vocab, finetuning_text, make_corpus, pretraining_text


@dataclass(frozen=True)
class Experiment:
    name: str                     # the command-line name
    claim: str                    # the paper's claim, quoted, with where it is said
    run: Callable                 # run(ctx) -> dict of plain JSON values
    table: Callable               # table(result) -> str
    plot: Callable | None = None  # plot(result, path) -> None, or None
    min_seeds: int = 1            # the fewest seeds it can run with


@dataclass(frozen=True)
class Size:
    name: str             # "full", "quick" or "tiny"
    base: TrainConfig     # the pretrained base's config (train.py's)
    steps: int            # fine-tuning steps of every run
    batch_size: int       # fine-tuning sequences per step
    eval_batches: int     # validation batches (of batch_size windows) per loss


# Full: train.py's default base; fine-tuning 100 steps of 16 sequences (train.py: 150 of 32), so
# that one experiment of about 35 runs fits in about 5 minutes on 2 cores.
SIZES = {
    "full": Size("full", TrainConfig(), steps=100, batch_size=16, eval_batches=16),
    "quick": Size("quick", TrainConfig(**QUICK), steps=10, batch_size=8, eval_batches=2),
    "tiny": Size("tiny", TrainConfig(**dict(QUICK, pretrain_steps=4)), steps=3, batch_size=4,
                 eval_batches=1),
}


def collect(*groups) -> dict[str, Experiment]:
    """The registry: each experiment of the given tuples by name (a name used twice is an error)."""
    registry = {}
    for experiment in (e for group in groups for e in group):
        if experiment.name in registry:
            raise ValueError(f"two experiments are named {experiment.name!r}")
        registry[experiment.name] = experiment
    return registry


# ------------------------------------------------------------------------------ shared steps

@dataclass
class Run:
    model: torch.nn.Module  # the fine-tuned model
    val_loss: float         # validation loss after fine-tuning
    trainable: int          # trainable parameters
    seconds: float          # wall time of the run


class Context:
    """What an experiment's `run` works with; see the module docstring."""

    def __init__(self, name: str, size: Size, seeds, out: str, device="cpu", log=None):
        self.name = name
        self.size = size
        self.seeds = tuple(seeds)
        self.out = out
        self.device = torch.device(device)
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        vocab = build_vocab(pre_text := pretraining_text())
        self.pretraining = make_corpus(pre_text, vocab)
        self.corpus = make_corpus(finetuning_text(), vocab)
        self.windows = eval_windows(self.corpus.val, size.eval_batches, size.batch_size,
                                    size.base.block_size)
        self.runs = 0
        self._base = None
        self.base_info = None

    def base(self):
        """The pretrained base (train.py's `pretrain`, cached as base-<key>.pt in `out`)."""
        if self._base is None:
            with contextlib.redirect_stderr(io.StringIO()):
                self._base, info = pretrain(self.size.base, self.pretraining, self.out,
                                            self.device)
            self.base_info = dict(checkpoint=info["checkpoint"], fingerprint=info["fingerprint"],
                                  parameters=self._base.num_parameters())
        return self._base

    def finetune(self, method: str, seed: int, label: str = "", callback=None,
                 model_callback=None, base=None, **options) -> Run:
        """Fine-tune a copy of the base with `method` (train.py's defaults, overridden by
        `options`: lr, rank, alpha, targets, d_initial...) for `size.steps` steps, the adapter and
        the batches drawn from `seed`. `model_callback(step, model)` runs after each step (and at
        step 0, before training). `base`: the model to copy instead of the pretrained base (e.g.
        its weights quantized). Prints one progress line; returns a `Run`."""
        opts = dict(METHOD_DEFAULTS[method], dropout=0.0, **options)
        t0 = time.perf_counter()
        model = prepare(method, copy.deepcopy(self.base() if base is None else base), opts, seed)
        optimizer = make_optimizer(model, "adamw", opts["lr"], None)
        steps = self.size.steps
        cfg = replace(self.size.base, batch_size=self.size.batch_size, finetune_steps=steps,
                      checkpoint_every=steps, seed=seed)
        if model_callback is not None:
            model_callback(0, model)

        def after_step(step):
            if model_callback is not None:
                model_callback(step, model)
        identity = dict(method=method, options=repr(sorted(opts.items())), seed=seed)
        with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stderr(io.StringIO()):
            train_loop(model, optimizer, self.corpus.train, cfg, steps, opts["lr"], 0,
                       os.path.join(scratch, "checkpoint.pt"), identity, False, self.device,
                       method, after_step)
        val_loss = estimate_loss(model, self.windows, self.device)
        seconds = time.perf_counter() - t0
        self.runs += 1
        self.log(f"[{self.name} run {self.runs}] {method} {label} seed {seed}: val loss "
                 f"{val_loss:.4f}  ({seconds:.1f} s)")
        return Run(model, val_loss, adapters.count_trainable(model), seconds)


def mean_std(values) -> dict:
    """{"mean", "std" (sample standard deviation; None for one value), "values"}; None values
    (a correlation that is undefined) are left out of the mean, None when all are."""
    values = [float(v) for v in values if v is not None]
    mean = statistics.fmean(values) if values else None
    std = statistics.stdev(values) if len(values) > 1 else None
    return dict(mean=mean, std=std, values=values)


def pm(stats: dict, digits: int = 4) -> str:
    """"mean ± std" of a mean_std dict ("mean ± -" for one seed)."""
    if stats["mean"] is None:
        return "-"
    std = "-" if stats["std"] is None else f"{stats['std']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {std}"


def text_table(header, rows) -> str:
    """An aligned text table: the first column left, the others right."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]

    def line(texts):
        return "  ".join(t.ljust(w) if i == 0 else t.rjust(w)
                         for i, (t, w) in enumerate(zip(texts, widths))).rstrip()
    return "\n".join([line(cells[0]), line(["-" * w for w in widths])]
                     + [line(texts) for texts in cells[1:]])


# ---------------------------------------------------------------------------------- running one

def write_json_atomically(path: str, payload) -> None:
    """JSON, all or nothing (formats.safetensors_io.atomic_write: a temporary file, then a
    rename)."""
    text = json.dumps(payload, indent=1, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def finite(tree):
    """The result with each non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(tree, dict):
        return {k: finite(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [finite(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


def run_experiment(experiment: Experiment, size: str, seeds, out: str, device="cpu",
                   log=None, figures: str | None = None) -> dict:
    """Run `experiment` at `size` over `seeds`; print its table; write out/NAME.json and
    figures/NAME.png (`figures` defaults to `out`). Returns the JSON payload."""
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    ctx = Context(experiment.name, SIZES[size], seeds, out, device, log)
    result = experiment.run(ctx)
    table = experiment.table(result)
    payload = finite(dict(experiment=experiment.name, claim=experiment.claim, size=size,
                          seeds=list(ctx.seeds), base=ctx.base_info,
                          config=dict(asdict(ctx.size), base=asdict(ctx.size.base)),
                          device=str(ctx.device), threads=torch.get_num_threads(),
                          wall_seconds=round(time.perf_counter() - t0, 1), result=result,
                          table=table))
    print(table)
    path = os.path.join(out, f"{experiment.name}.json")
    write_json_atomically(path, payload)
    print(f"\n{payload['wall_seconds']:.0f} s; wrote {path}")
    if experiment.plot is not None:
        try:
            import matplotlib
        except ImportError:
            print("matplotlib is not installed: no figure (the table and the JSON are written)")
        else:
            matplotlib.use("Agg")
            figures = figures or out
            os.makedirs(figures, exist_ok=True)
            figure = os.path.join(figures, f"{experiment.name}.png")
            atomic_write(figure, lambda f: experiment.plot(result, f))  # savefig: PNG to f
            print(f"wrote {figure}")
    return payload
