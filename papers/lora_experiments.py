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


# ------------------------------------------------------------------------------ lora-subspace

SUBSPACE_RANKS = (8, 64)   # LoRA §7.2: A_{r=8} against A_{r=64}
SHOWN_J = (1, 2, 4, 8, 16, 32, 64)  # the columns of the printed table (the JSON has every j)


def lora_A(model, layer: int, matrix: str) -> torch.Tensor:
    return getattr(model.blocks[layer].attn, matrix).lora_A.detach()  # (r, in)


def phi_grid(A1, A2) -> list[list[float]]:
    """φ(A1, A2, i, j) for i = 1..rank(A1) (rows) and j = 1..rank(A2) (columns), from one SVD
    each: ‖U_iᵀ U_j‖²_F is the sum of the top-left i x j block of the squared overlaps, a 2-D
    cumulative sum (tests/test_experiments.py checks it against subspace_similarity)."""
    V1 = torch.linalg.svd(A1.double(), full_matrices=False).Vh  # (r1, k): rows by singular value
    V2 = torch.linalg.svd(A2.double(), full_matrices=False).Vh  # (r2, k)
    blocks = (V1 @ V2.T).square().cumsum(0).cumsum(1)  # (r1, r2): [i-1, j-1] = ‖U_iᵀ U_j‖²_F
    i = torch.arange(1, V1.shape[0] + 1, dtype=torch.float64)[:, None]  # (r1, 1)
    j = torch.arange(1, V2.shape[0] + 1, dtype=torch.float64)[None, :]  # (1, r2)
    return (blocks / torch.minimum(i, j)).tolist()


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
    rows.append(["random Gaussian pair"] + [f"{result['random'][min(j, small) - 1][j - 1]:.2f}"
                                            for j in js])
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
        image = axes[0][col].imshow(grids.mean(0), vmin=0, vmax=1, aspect="auto",
                                    cmap="viridis", origin="lower",
                                    extent=(0.5, grids.shape[2] + 0.5, 0.5, grids.shape[1] + 0.5))
        axes[0][col].set(title=f"{m}: φ(A_r={result['small_rank']}, A_r={result['large_rank']})",
                         xlabel="j", ylabel="i")
        seed_grid = torch.tensor(result[m]["seed_vs_seed"])
        axes[1][col].imshow(seed_grid, vmin=0, vmax=1, aspect="auto", cmap="viridis",
                            origin="lower", extent=(0.5, seed_grid.shape[1] + 0.5,
                                                    0.5, seed_grid.shape[0] + 0.5))
        axes[1][col].set(title=f"{m}: two seeds at r={result['large_rank']}", xlabel="j",
                         ylabel="i")
    fig.colorbar(image, ax=axes, shrink=0.8, label="φ")
    fig.savefig(path, dpi=70)
    plt.close(fig)


# ------------------------------------------------------------------------- dora-decomposition

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


def fit_points(points, within_step: bool) -> dict:
    """The line of ΔD on ΔM through every (layer, checkpoint) point, as DoRA's Fig. 2 pools them;
    `within_step`: after subtracting each checkpoint's mean, so that the growth both share over
    training does not make the correlation (only how layers differ at one step remains)."""
    xs = [p["dM"] for p in points]
    ys = [p["dD"] for p in points]
    if within_step:
        steps = {p["step"] for p in points}
        mean_x = {t: statistics.fmean(p["dM"] for p in points if p["step"] == t) for t in steps}
        mean_y = {t: statistics.fmean(p["dD"] for p in points if p["step"] == t) for t in steps}
        xs = [x - mean_x[p["step"]] for x, p in zip(xs, points)]
        ys = [y - mean_y[p["step"]] for y, p in zip(ys, points)]
    return fitted_line(xs, ys)


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


# -------------------------------------------------------------------------------- vera-budget

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
    Experiment(
        name="dora-decomposition",
        claim=("DoRA (Liu et al. 2024) §2.2, Fig. 2: full fine-tuning shows \"a negative slope\" "
               "of ΔD against ΔM, LoRA \"a positive slope\", DoRA a negative one like full "
               "fine-tuning; §5: DoRA beats LoRA at low ranks"),
        run=run_decomposition, table=decomposition_table, plot=plot_decomposition),
    Experiment(
        name="vera-budget",
        claim=("VeRA (Kopiczko et al. 2023) §4-5: VeRA reaches LoRA's quality with an order of "
               "magnitude fewer trainable parameters, its rank raised at almost no parameter "
               "cost (L·(r + d_out)); §5: d_initial 0.1 or smaller trains better than 1.0"),
        run=run_budget, table=budget_table, plot=plot_budget),
)
