"""DoRA's signature results on the tiny GPT (the runner: papers/runner.py; the measures:
papers/measures.py).

    dora-decomposition   DoRA (arXiv 2402.09353) §2.2, Fig. 2: full fine-tuning moves magnitude and
                         direction in opposite senses (a negative slope of ΔD against ΔM), LoRA
                         in the same sense (a positive one), DoRA like full fine-tuning; §5: DoRA
                         beats LoRA at low rank

LoRA and DoRA adapt W_q and W_v with α = 16 at every rank (papers/lora_experiments.py); full
fine-tuning trains every weight, at train.py's learning rate. ΔM and ΔD are measured on the weight
each layer applies: W, or W0 + ΔW merged (DoRA: m·V/‖V‖).
"""
from __future__ import annotations

import torch

import adapters
from papers.lora_experiments import ALPHA, QV, base_loss, ranks_up_to
from papers.measures import fit_points, magnitude_direction_change
from papers.runner import Experiment, mean_std, pm, text_table

CHECKPOINTS = 8                # ΔM and ΔD at 8 evenly spaced steps (DoRA Fig. 2: 4 + final)
DORA_RANK = 8
LOW_RANKS = (1, 2, 4, 8)       # DoRA against LoRA (DoRA §5, rank robustness)
TRACKED = ("q_proj", "v_proj")


def effective_weight(module) -> torch.Tensor:
    """The weight the layer applies: W for a plain linear, W0 + ΔW (merged) for an adapter."""
    if isinstance(module, adapters.AdapterLinear):
        return module.merged_weight().detach()
    return module.weight.detach()


def track_changes(ctx, method: str, seed: int, **options) -> list[dict]:
    """Fine-tune once; at CHECKPOINTS steps, (ΔM, ΔD) of W_q and W_v of every layer."""
    steps = ctx.size.steps
    at = sorted({max(1, round(k * steps / CHECKPOINTS)) for k in range(1, CHECKPOINTS + 1)})
    base = ctx.base()
    points = []

    def measure(step, model):
        if step not in at:
            return
        for layer, block in enumerate(model.blocks):
            for m in TRACKED:
                W0 = getattr(base.blocks[layer].attn, m).weight
                dM, dD = magnitude_direction_change(W0, effective_weight(getattr(block.attn, m)))
                points.append(dict(step=step, layer=layer, matrix=m, dM=dM, dD=dD))
    ctx.finetune(method, seed, "(tracking ΔM, ΔD)", model_callback=measure, **options)
    return points


def run_decomposition(ctx) -> dict:
    low_rank = dict(rank=DORA_RANK, alpha=ALPHA, targets=QV)
    tracked = {"full": {}, "lora": {}, "dora": {}}
    for s in ctx.seeds:
        tracked["full"][str(s)] = track_changes(ctx, "full", s)
        tracked["lora"][str(s)] = track_changes(ctx, "lora", s, **low_rank)
        tracked["dora"][str(s)] = track_changes(ctx, "dora", s, **low_rank)
    fits = {}
    for method, by_seed in tracked.items():
        for m in TRACKED:
            pooled = [fit_points([p for p in pts if p["matrix"] == m], False)
                      for pts in by_seed.values()]
            within = [fit_points([p for p in pts if p["matrix"] == m], True)
                      for pts in by_seed.values()]
            fits[f"{method} {m}"] = dict(
                correlation=mean_std(f["correlation"] for f in pooled),
                slope=mean_std(f["slope"] for f in pooled),
                within_step_correlation=mean_std(f["correlation"] for f in within),
                within_step_slope=mean_std(f["slope"] for f in within))
    by_rank = []
    width = ctx.size.base.n_embd
    for r in ranks_up_to(LOW_RANKS, width):
        row = dict(rank=r)
        for method in ("lora", "dora"):
            runs = [ctx.finetune(method, s, f"r={r} W_q,W_v", rank=r, alpha=ALPHA, targets=QV)
                    for s in ctx.seeds]
            row[method] = mean_std(run.val_loss for run in runs)
            row[f"{method}_trainable"] = runs[0].trainable
        row["dora_minus_lora"] = mean_std(d - lo for d, lo in zip(row["dora"]["values"],
                                                                  row["lora"]["values"]))
        by_rank.append(row)
    return dict(base_val_loss=base_loss(ctx), rank=DORA_RANK, tracked=tracked, fits=fits,
                by_rank=by_rank)


def decomposition_table(result) -> str:
    rows = [(name, pm(fit["correlation"], 2), pm(fit["slope"], 3),
             pm(fit["within_step_correlation"], 2)) for name, fit in result["fits"].items()]
    first = text_table(("ΔD against ΔM", "correlation", "slope", "within-step correlation"),
                       rows)
    rows = [(f"r = {row['rank']}", pm(row["lora"]), pm(row["dora"]),
             pm(row["dora_minus_lora"])) for row in result["by_rank"]]
    second = text_table(("W_q, W_v", "LoRA val loss", "DoRA val loss", "DoRA − LoRA (paired)"),
                        rows)
    return (f"{first}\n(every layer, {CHECKPOINTS} checkpoints; LoRA and DoRA at r = "
            f"{result['rank']}; mean ± std over seeds)\n\n{second}\n\nbase model: val loss "
            f"{result['base_val_loss']:.4f}")


def plot_decomposition(result, path) -> None:
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.2))
    for ax, method in zip(axes, ("full", "lora", "dora")):
        points = [p for p in next(iter(result["tracked"][method].values()))
                  if p["matrix"] == "q_proj"]
        scatter = ax.scatter([p["dM"] for p in points], [p["dD"] for p in points],
                             c=[p["step"] for p in points], s=14, cmap="viridis")
        fit = result["fits"][f"{method} q_proj"]["correlation"]["values"][0]
        ax.set(title=f"{method} W_q (first seed), r = {fit:.2f}", xlabel="ΔM", ylabel="ΔD")
        ax.ticklabel_format(style="sci", scilimits=(-2, 2))
    fig.colorbar(scatter, ax=axes[2], label="step")
    ranks = [row["rank"] for row in result["by_rank"]]
    for method, color in (("lora", "tab:blue"), ("dora", "tab:red")):
        axes[3].errorbar(ranks, [row[method]["mean"] for row in result["by_rank"]],
                         yerr=[row[method]["std"] or 0 for row in result["by_rank"]], marker="o",
                         capsize=3, color=color, label=method)
    axes[3].set(xscale="log", xlabel="rank r", ylabel="validation loss", title="DoRA vs LoRA")
    axes[3].set_xticks(ranks, [str(r) for r in ranks])
    axes[3].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


EXPERIMENTS = (
    Experiment(
        name="dora-decomposition",
        claim=("DoRA (Liu et al. 2024) §2.2, Fig. 2, paraphrased: LoRA's ΔD and ΔM grow "
               "together (a positive slope), full fine-tuning shows a negative slope, and DoRA "
               "one like full fine-tuning's; §5: DoRA beats LoRA across ranks, by more at low "
               "ranks"),
        run=run_decomposition, table=decomposition_table, plot=plot_decomposition),
)
