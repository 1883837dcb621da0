"""LoRA's signature results on the tiny GPT (the runner: papers/runner.py).

    lora-rank            LoRA (arXiv 2106.09685) Tables 5 and 6: a very low rank suffices; under a
                         fixed budget, adapt more matrix types at a lower rank
    lora-subspace        LoRA §7.2, Fig. 3 and 4: the subspaces learned at r = 8 and r = 64 share
                         their top directions (eq. 4's φ)

(dora-decomposition: papers/dora_experiments.py; vera-budget: papers/vera_experiments.py.)
Each run fine-tunes the pretrained base of train.py on its fine-tuning text with train.py's loop
and learning rates; `α` is held at train.py's 16 for every rank, as LoRA §4.1 holds α fixed ("we
simply set α to the first r we try and do not tune it"), so the scaling α/r falls as r grows.
Measured numbers and verdicts: docs/experiments.md.
"""
from __future__ import annotations

import torch

import adapters
from papers.measures import phi_grid
from papers.runner import Experiment, mean_std, pm, text_table
from train import estimate_loss

ALPHA = 16.0                  # LoRA's α for every rank (LoRA §4.1: fixed, not tuned)
QV = ("q_proj", "v_proj")     # W_q and W_v: the LoRA paper's main choice (§7.1)


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


# ------------------------------------------------------------------------------ lora-subspace

SUBSPACE_RANKS = (8, 64)   # LoRA §7.2: A_{r=8} against A_{r=64}
SHOWN_J = (1, 2, 4, 8, 16, 32, 64)  # the columns of the printed table (the JSON has every j)


def lora_A(model, layer: int, matrix: str) -> torch.Tensor:
    return getattr(model.blocks[layer].attn, matrix).lora_A.detach()  # (r, in)


def run_subspace(ctx) -> dict:
    """LoRA on W_q and W_v of every layer at r = 8 and r = 64 per seed; φ for one layer."""
    width = ctx.size.base.n_embd
    small, large = (min(r, width) for r in SUBSPACE_RANKS)
    layer = ctx.size.base.n_layer // 2  # the middle layer, as LoRA's Fig. 3 (layer 48 of 96)
    adapters_by_seed = {}
    for s in ctx.seeds:
        runs = {r: ctx.finetune("lora", s, f"r={r} W_q,W_v", rank=r, alpha=ALPHA, targets=QV)
                for r in (small, large)}
        adapters_by_seed[s] = {(r, m): lora_A(run.model, layer, m)
                               for r, run in runs.items() for m in QV}
    first, second = ctx.seeds[0], ctx.seeds[1]
    generator = torch.Generator().manual_seed(0)
    random_small = torch.randn(small, width, generator=generator, dtype=torch.float64)
    random_large = torch.randn(large, width, generator=generator, dtype=torch.float64)
    result = dict(layer=layer, small_rank=small, large_rank=large, width=width,
                  random_expectation=[[max(i, j) / width for j in range(1, large + 1)]
                                      for i in range(1, small + 1)],
                  random=phi_grid(random_small, random_large),
                  seed_pair=[first, second])
    for m in QV:
        result[m] = dict(
            small_vs_large={str(s): phi_grid(a[(small, m)], a[(large, m)])
                            for s, a in adapters_by_seed.items()},
            seed_vs_seed=phi_grid(adapters_by_seed[first][(large, m)],
                                  adapters_by_seed[second][(large, m)]))
    return result


def subspace_table(result) -> str:
    js = [j for j in SHOWN_J if j <= result["large_rank"]]
    small, large = result["small_rank"], result["large_rank"]
    parts = []
    for m in QV:
        grids = list(result[m]["small_vs_large"].values())
        rows = []
        for i in range(1, small + 1):
            rows.append([f"i = {i}"] + [pm(mean_std(g[i - 1][j - 1] for g in grids), 2)
                                       for j in js])
        header = [f"{m}: φ(A_r={small}, A_r={large})"] + [f"j = {j}" for j in js]
        parts.append(text_table(header, rows))
    rows = []
    for m in QV:
        grid = result[m]["seed_vs_seed"]
        rows.append([f"{m}, seeds {result['seed_pair']}"] + [f"{grid[j - 1][j - 1]:.2f}"
                                                             for j in js])
    rows.append(["random subspaces (expected j/d)"] + [f"{j / result['width']:.2f}" for j in js])
    parts.append(text_table([f"φ(A, A', i = j) at r = {large}"] + [f"i = j = {j}" for j in js],
                            rows))
    random_rows = [[f"i = {i}"] + [f"{result['random'][i - 1][j - 1]:.2f} "
                                   f"({result['random_expectation'][i - 1][j - 1]:.2f})"
                                   for j in js] for i in (1, small)]
    parts.append(text_table(["random pair φ (expected max(i,j)/d)"] + [f"j = {j}" for j in js],
                            random_rows))
    return (f"layer {result['layer']}, d = {result['width']}; mean ± std over seeds\n\n"
            + "\n\n".join(parts))


def plot_subspace(result, path) -> None:
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(9, 5.5))
    for col, m in enumerate(QV):
        grids = torch.tensor(list(result[m]["small_vs_large"].values()))  # (seeds, i, j)
        image = axes[0][col].imshow(grids.mean(0).numpy(), vmin=0, vmax=1, aspect="auto",
                                    cmap="viridis", origin="lower",
                                    extent=(0.5, grids.shape[2] + 0.5, 0.5, grids.shape[1] + 0.5))
        axes[0][col].set(title=f"{m}: φ(A_r={result['small_rank']}, A_r={result['large_rank']})",
                         xlabel="j", ylabel="i")
        seed_grid = torch.tensor(result[m]["seed_vs_seed"])
        axes[1][col].imshow(seed_grid.numpy(), vmin=0, vmax=1, aspect="auto", cmap="viridis",
                            origin="lower", extent=(0.5, seed_grid.shape[1] + 0.5,
                                                    0.5, seed_grid.shape[0] + 0.5))
        axes[1][col].set(title=f"{m}: two seeds at r={result['large_rank']}", xlabel="j",
                         ylabel="i")
    fig.colorbar(image, ax=axes, shrink=0.8, label="φ")
    fig.savefig(path, dpi=70)
    plt.close(fig)


EXPERIMENTS = (
    Experiment(
        name="lora-rank",
        claim=("LoRA (Hu et al. 2021) Table 6: \"LoRA already performs competitively with a very "
               "small r\"; Table 5: under a fixed parameter budget, \"it is preferable to adapt "
               "more weight matrices than adapting a single type of weights with a larger rank\""),
        run=run_rank, table=rank_table, plot=plot_rank),
    Experiment(
        name="lora-subspace",
        claim=("LoRA §7.2, Fig. 3 and 4: \"directions corresponding to the top singular vector "
               "overlap significantly between A_r=8 and A_r=64, while others do not\"; two seeds "
               "at r = 64 share their top directions too, far above random subspaces"),
        run=run_subspace, table=subspace_table, plot=plot_subspace, min_seeds=2),
)
