"""LoRA, DoRA and VeRA's signature results on the tiny GPT (the runner: papers/runner.py).

    lora-rank            LoRA (arXiv 2106.09685) Tables 5 and 6: a very low rank suffices; under a
                         fixed budget, adapt more matrix types at a lower rank
    lora-subspace        LoRA §7.2, Fig. 3 and 4: the subspaces learned at r = 8 and r = 64 share
                         their top directions (eq. 4's φ)
    dora-decomposition   DoRA (arXiv 2402.09353) §2.2, Fig. 2: full fine-tuning moves magnitude and
                         direction in opposite senses, LoRA together; and §5: DoRA beats LoRA at
                         low rank
    vera-budget          VeRA (arXiv 2310.11454) §4-5: LoRA's quality with far fewer trainable
                         parameters; its rank raised at almost no parameter cost

Each run fine-tunes the pretrained base of train.py on its fine-tuning text with train.py's loop
and learning rates; `α` is held at train.py's 16 for every rank, as LoRA §4.1 holds α fixed ("we
simply set α to the first r we try and do not tune it"), so the scaling α/r falls as r grows.
Measured numbers and verdicts: docs/experiments.md.
"""
from __future__ import annotations

import math
import statistics

import torch

import adapters
from papers.runner import Experiment, mean_std, pm, text_table
from train import estimate_loss

ALPHA = 16.0                  # LoRA's α for every rank (LoRA §4.1: fixed, not tuned)
QV = ("q_proj", "v_proj")     # W_q and W_v: the LoRA paper's main choice (§7.1)


# --------------------------------------------------------------------------- the two measures

def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor, i: int, j: int) -> float:
    """φ(A1, A2, i, j) = ‖U_iᵀ U_j‖²_F / min(i, j)   (LoRA §7.2, eq. 4)

    U_i: the top-i right-singular vectors of A1 (r1, k), as columns (k, i); U_j: A2's top j.
    1 when one subspace holds the other, 0 when they are orthogonal; computed in float64.
    """
    U_i = torch.linalg.svd(A1.double(), full_matrices=False).Vh[:i].T  # (k, i)
    U_j = torch.linalg.svd(A2.double(), full_matrices=False).Vh[:j].T  # (k, j)
    return float((U_i.T @ U_j).square().sum() / min(i, j))  # ‖(i, j)‖²_F / min(i, j)


def magnitude_direction_change(W0: torch.Tensor, W: torch.Tensor) -> tuple[float, float]:
    """(ΔM, ΔD) of W against W0, both (out, in)   (DoRA §2.2, eqs. 3-4)

    DoRA writes y = x W with W (in, out) and takes norms over its columns, one per output; torch
    stores W (out, in), so here they are the rows' norms:
        ΔM = mean over outputs n of |‖W_n‖ − ‖W0_n‖|
        ΔD = mean over outputs n of 1 − cos(W_n, W0_n)
    computed in float64.
    """
    W0, W = W0.double(), W.double()
    m0 = torch.linalg.vector_norm(W0, dim=1)  # (out,)
    m = torch.linalg.vector_norm(W, dim=1)  # (out,)
    cosine = (W * W0).sum(dim=1) / (m * m0)  # (out,)
    return float((m - m0).abs().mean()), float((1 - cosine).mean())


def fitted_line(xs, ys) -> dict:
    """Pearson correlation and the least-squares slope of ys on xs (None when xs is constant)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    if sxx == 0:
        return dict(correlation=None, slope=None)
    correlation = sxy / math.sqrt(sxx * syy) if syy > 0 else None
    return dict(correlation=correlation, slope=sxy / sxx)


def base_loss(ctx) -> float:
    return estimate_loss(ctx.base(), ctx.windows, ctx.device)


def ranks_up_to(ranks, width):
    return [r for r in ranks if r <= width]


# ---------------------------------------------------------------------------------- lora-rank

RANKS = (1, 2, 4, 8, 16, 32, 64)
BUDGET_SETS = (("W_q", ("q_proj",)), ("W_q, W_v", QV),
               ("W_q, W_k, W_v, W_o", ("q_proj", "k_proj", "v_proj", "o_proj")),
               ("every linear", adapters.ALL_LINEAR))
BUDGET_RANK_ALL_LINEAR = 4  # the budget: LoRA at r = 4 on every linear


def rank_per_budget(base, budget: int, width: int) -> list[tuple[str, object, int]]:
    """(label, targets, r) with r·Σ(in + out) closest to `budget` (at most the width)."""
    choices = []
    for label, targets in BUDGET_SETS:
        names = adapters.find_targets(base, targets)
        per_rank = sum(base.get_submodule(n).in_features + base.get_submodule(n).out_features
                       for n in names)
        choices.append((label, targets, min(width, max(1, round(budget / per_rank)))))
    return choices


def run_rank(ctx) -> dict:
    width = ctx.size.base.n_embd
    by_rank = []
    for r in ranks_up_to(RANKS, width):
        runs = [ctx.finetune("lora", s, f"r={r} W_q,W_v", rank=r, alpha=ALPHA, targets=QV)
                for s in ctx.seeds]
        by_rank.append(dict(rank=r, trainable=runs[0].trainable,
                            val_loss=mean_std(run.val_loss for run in runs)))
    base = ctx.base()
    all_linear = adapters.find_targets(base, adapters.ALL_LINEAR)
    budget = BUDGET_RANK_ALL_LINEAR * sum(base.get_submodule(n).in_features
                                          + base.get_submodule(n).out_features
                                          for n in all_linear)
    by_targets = []
    for label, targets, r in rank_per_budget(base, budget, width):
        runs = [ctx.finetune("lora", s, f"r={r} {label}", rank=r, alpha=ALPHA, targets=targets)
                for s in ctx.seeds]
        by_targets.append(dict(targets=label, rank=r, trainable=runs[0].trainable,
                               val_loss=mean_std(run.val_loss for run in runs)))
    return dict(base_val_loss=base_loss(ctx), alpha=ALPHA, budget=budget, by_rank=by_rank,
                by_targets=by_targets)


def rank_table(result) -> str:
    rows = [(f"r = {row['rank']}", f"{row['trainable']:,}", pm(row["val_loss"]))
            for row in result["by_rank"]]
    first = text_table(("LoRA on W_q, W_v", "trainable", "val loss (mean ± std)"), rows)
    rows = [(row["targets"], row["rank"], f"{row['trainable']:,}", pm(row["val_loss"]))
            for row in result["by_targets"]]
    second = text_table((f"budget {result['budget']:,}", "r", "trainable",
                         "val loss (mean ± std)"), rows)
    return (f"{first}\n\n{second}\n\nbase model (no fine-tuning): val loss "
            f"{result['base_val_loss']:.4f}; alpha = {result['alpha']:g} at every rank")


def plot_rank(result, path) -> None:
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    ranks = [row["rank"] for row in result["by_rank"]]
    for row in result["by_rank"]:
        left.scatter([row["rank"]] * len(row["val_loss"]["values"]), row["val_loss"]["values"],
                     color="tab:blue", s=10, alpha=0.5)
    left.errorbar(ranks, [row["val_loss"]["mean"] for row in result["by_rank"]],
                  yerr=[row["val_loss"]["std"] or 0 for row in result["by_rank"]], marker="o",
                  capsize=3, color="tab:blue")
    left.set(xscale="log", xlabel="rank r (W_q, W_v)", ylabel="validation loss",
             title="LoRA Table 6: loss by rank")
    left.set_xticks(ranks, [str(r) for r in ranks])
    labels = [f"{row['targets']}\nr={row['rank']}" for row in result["by_targets"]]
    right.errorbar(range(len(labels)), [row["val_loss"]["mean"] for row in result["by_targets"]],
                   yerr=[row["val_loss"]["std"] or 0 for row in result["by_targets"]], fmt="o",
                   capsize=3, color="tab:orange")
    right.set_xticks(range(len(labels)), labels, fontsize=7)
    right.set(title=f"LoRA Table 5: {result['budget']:,} parameters", ylabel="validation loss")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


EXPERIMENTS = (
    Experiment(
        name="lora-rank",
        claim=("LoRA (Hu et al. 2021) Table 6: \"LoRA already performs competitively with a very "
               "small r\"; Table 5: under a fixed parameter budget, \"it is preferable to adapt "
               "more weight matrices than adapting a single type of weights with a larger rank\""),
        run=run_rank, table=rank_table, plot=plot_rank),
)
