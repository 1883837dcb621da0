"""VeRA's signature results on the tiny GPT (the runner: papers/runner.py).

    vera-budget   VeRA (arXiv 2310.11454) §4-5: LoRA's quality with an order of magnitude fewer
                  trainable parameters; its rank raised at almost no parameter cost, since a layer
                  trains r + d_out numbers; d_initial's effect

Both adapt every linear of the tiny GPT (train.py's default targets) at train.py's learning rates
(LoRA 6e-3 with α = 16 at every rank, VeRA 0.1).
"""
from __future__ import annotations

import adapters
from papers.lora_experiments import ALPHA, base_loss, ranks_up_to
from papers.runner import Experiment, mean_std, pm, text_table

LORA_RANKS = (1, 2, 4, 8, 16)
VERA_RANKS = (16, 32, 64, 128, 256)
D_INITIALS = (1.0, 0.1, 1e-3)    # VeRA §5 (ablation of d's initial value)
D_INITIAL_RANK = 64              # train.py's VeRA rank


def run_budget(ctx) -> dict:
    """LoRA and VeRA on every linear: loss against trainable parameters; VeRA's d_initial."""
    base = ctx.base()
    names = adapters.find_targets(base, adapters.ALL_LINEAR)
    widest = max(max(base.get_submodule(n).in_features, base.get_submodule(n).out_features)
                 for n in names)
    rows = []

    def configuration(method, r, **options):
        label = " ".join(f"{k}={v:g}" for k, v in options.items())
        runs = [ctx.finetune(method, s, f"r={r} {label}", rank=r, **options)
                for s in ctx.seeds]
        rows.append(dict(method=method, rank=r, trainable=runs[0].trainable,
                         d_initial=options.get("d_initial"),
                         val_loss=mean_std(run.val_loss for run in runs)))
    for r in ranks_up_to(LORA_RANKS, ctx.size.base.n_embd):
        configuration("lora", r, alpha=ALPHA)
    vera_ranks = ranks_up_to(VERA_RANKS, widest)
    for r in vera_ranks:
        configuration("vera", r, d_initial=D_INITIALS[1])
    d_rank = D_INITIAL_RANK if D_INITIAL_RANK in vera_ranks else vera_ranks[-1]
    for d in (D_INITIALS[0], D_INITIALS[2]):
        configuration("vera", d_rank, d_initial=d)
    return dict(base_val_loss=base_loss(ctx), layers=len(names), alpha=ALPHA, rows=rows)


def budget_table(result) -> str:
    rows = [(row["method"], row["rank"],
             "" if row["d_initial"] is None else f"{row['d_initial']:g}",
             f"{row['trainable']:,}", pm(row["val_loss"])) for row in result["rows"]]
    return (text_table(("method", "r", "d_initial", "trainable", "val loss (mean ± std)"), rows)
            + f"\n\nevery linear ({result['layers']} layers); base model: val loss "
              f"{result['base_val_loss']:.4f}")


def plot_budget(result, path) -> None:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for method, color in (("lora", "tab:blue"), ("vera", "tab:green")):
        rows = [row for row in result["rows"] if row["method"] == method
                and row["d_initial"] in (None, D_INITIALS[1])]
        ax.errorbar([row["trainable"] for row in rows], [row["val_loss"]["mean"] for row in rows],
                    yerr=[row["val_loss"]["std"] or 0 for row in rows], marker="o", capsize=3,
                    color=color, label=f"{method} (r = {rows[0]['rank']}..{rows[-1]['rank']})")
        for row in rows:
            ax.annotate(str(row["rank"]), (row["trainable"], row["val_loss"]["mean"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="validation loss",
           title="VeRA against LoRA, every linear")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


EXPERIMENTS = (
    Experiment(
        name="vera-budget",
        claim=("VeRA (Kopiczko et al. 2023) §4, paraphrased: VeRA matches LoRA with about 10x "
               "fewer trainable parameters; §3: a layer trains r + d_out numbers, so the rank "
               "rises at almost no parameter cost; its ablation varies d's initial value"),
        run=run_budget, table=budget_table, plot=plot_budget),
)
