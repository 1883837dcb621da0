"""QLoRA's data type and memory claims on the tiny GPT (the runner: papers/runner.py).

    qlora-dtypes   QLoRA (arXiv 2305.14314) §3, Fig. 3, Table 2 and §4: NF4 quantizes normal
                   weights with less error than FP4 and Int4, and its models lose less; QLoRA
                   matches 16-bit LoRA; double quantization saves about 0.37 bits a parameter
    paged-spike    QLoRA §3: paged optimizers carry training through memory spikes (a long batch
                   now and then) that would otherwise run out of device memory

The three data types share one storage: 4-bit codes, one float32 absmax per block of 64 (nf4.py,
papers/four_bit.py); (a)-(c) use no double quantization for FP4 and Int4 (bitsandbytes' default),
NF4's fine-tuning base (c) is train.py's QLoRA base, with it. "Quantized" weights are evaluated and
fine-tuned as their float32 dequantization, frozen (qlora.NF4Linear at float32 compute computes
the same product: tested), and the "bfloat16" base is the weights rounded to bfloat16, computed in
float32 like the others: the comparison is of the storage type alone.
Measured numbers and verdicts: docs/experiments.md.
"""
from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import replace

import torch

import adapters
import nf4
from paged_optim import PagedAdamW
from papers import four_bit
from papers.runner import Experiment, mean_std, pm, text_table
from train import METHOD_DEFAULTS, estimate_loss, make_optimizer, prepare, train_loop
from training.memory import optimizer_state_bytes

BLOCKSIZE = 64  # "blocksize of 64 for W" (QLoRA §3)
NORMAL_SAMPLE = 2**20  # values of the standard normal sample of (a)
NORMAL_SEED = 0
DTYPES = ("nf4", "fp4", "int4")


# ------------------------------------------------------------------------- quantize, measure

def quantize_dequantize(w: torch.Tensor, dtype: str) -> torch.Tensor:
    """w stored in `dtype` (blocks of BLOCKSIZE, float32 absmax, no double quantization) and read
    back as float32, w's shape."""
    if dtype == "nf4":
        return nf4.dequantize_nf4(nf4.quantize_nf4(w, BLOCKSIZE, double_quant=False), torch.float32)
    if dtype == "fp4":
        return four_bit.dequantize_4bit(four_bit.quantize_fp4(w, BLOCKSIZE), torch.float32)
    if dtype == "int4":
        return four_bit.dequantize_4bit(four_bit.quantize_int4(w, BLOCKSIZE), torch.float32)
    if dtype == "bfloat16":
        return w.to(torch.bfloat16).float()
    raise ValueError(f"dtype must be one of {DTYPES + ('bfloat16',)}, got {dtype!r}")


def quantization_error(tensors, dtype: str) -> dict:
    """Mean squared and mean absolute error of each tensor against its round trip, over all their
    values together, accumulated in float64."""
    squared, absolute, count = 0.0, 0.0, 0
    for w in tensors:
        error = w.double() - quantize_dequantize(w, dtype).double()
        squared += float(error.square().sum())
        absolute += float(error.abs().sum())
        count += w.numel()
    return dict(mse=squared / count, mae=absolute / count)


def linear_weights(model) -> dict:
    """The weights of the linears QLoRA quantizes (adapters.ALL_LINEAR: lm_head excluded)."""
    return {name: model.get_submodule(name).weight.detach()
            for name in adapters.find_targets(model, adapters.ALL_LINEAR)}


def quantized_copy(model, dtype: str):
    """A copy of `model` with the weights of its linears (linear_weights) stored in `dtype`."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, weight in linear_weights(model).items():
            model.get_submodule(name).weight.copy_(quantize_dequantize(weight, dtype))
    return model


def bits_per_parameter(model, double_quant: bool) -> dict:
    """NF4 storage of the linears, from the stored tensors: 8 * bytes / weights, and the part of
    it that is the scales (8 * everything but the packed codes / weights)."""
    total, scales, count = 0, 0, 0
    for weight in linear_weights(model).values():
        q = nf4.quantize_nf4(weight, BLOCKSIZE, double_quant=double_quant)
        total += q.nbytes
        scales += q.nbytes - q.packed.nbytes
        count += weight.numel()
    return dict(bits=8 * total / count, scale_bits=8 * scales / count, bytes=total,
                parameters=count)


# ----------------------------------------------------------------------------- qlora-dtypes

def run_dtypes(ctx) -> dict:
    base = ctx.base()
    normal = torch.randn(NORMAL_SAMPLE, generator=torch.Generator().manual_seed(NORMAL_SEED))
    weights = list(linear_weights(base).values())
    errors = {"normal": {t: quantization_error([normal], t) for t in DTYPES},
              "weights": {t: quantization_error(weights, t) for t in DTYPES}}
    losses = {"float32": estimate_loss(base, ctx.windows, ctx.device)}
    for dtype in ("bfloat16",) + DTYPES:
        losses[dtype] = estimate_loss(quantized_copy(base, dtype), ctx.windows, ctx.device)
    finetuned = {"nf4 (QLoRA)": [ctx.finetune("qlora", s, "NF4 base").val_loss
                                 for s in ctx.seeds]}
    for dtype in ("fp4", "int4", "bfloat16"):
        frozen = quantized_copy(base, dtype)
        finetuned[f"{dtype} (LoRA)"] = [ctx.finetune("lora", s, f"{dtype} base", base=frozen)
                                        .val_loss for s in ctx.seeds]
    return dict(errors=errors, blocksize=BLOCKSIZE, normal_sample=NORMAL_SAMPLE,
                quantized_val_loss=losses,
                finetuned_val_loss={k: mean_std(v) for k, v in finetuned.items()},
                bits={"double_quant": bits_per_parameter(base, True),
                      "no_double_quant": bits_per_parameter(base, False),
                      "paper_large_tensor": {
                          "double_quant": nf4.nf4_bits_per_parameter(BLOCKSIZE, True),
                          "no_double_quant": nf4.nf4_bits_per_parameter(BLOCKSIZE, False)}})


def dtypes_table(result) -> str:
    errors = result["errors"]
    rows = [(t, f"{errors['normal'][t]['mse']:.3e}", f"{errors['normal'][t]['mae']:.4f}",
             f"{errors['weights'][t]['mse']:.3e}", f"{errors['weights'][t]['mae']:.3e}")
            for t in DTYPES]
    a = text_table(("(a) blocksize 64", "normal MSE", "normal MAE", "weights MSE",
                    "weights MAE"), rows)
    losses = result["quantized_val_loss"]
    b = text_table(("(b) base stored as", "val loss", "vs float32"),
                   [(t, f"{v:.4f}", f"{v - losses['float32']:+.4f}") for t, v in losses.items()])
    c = text_table(("(c) fine-tuned on a base in", "val loss (mean ± std)"),
                   [(k, pm(v)) for k, v in result["finetuned_val_loss"].items()])
    bits = result["bits"]
    d = text_table(("(d) NF4 of the linears", "bits/param", "of which scales", "large tensor"),
                   [(k.replace("_", " "), f"{bits[k]['bits']:.4f}", f"{bits[k]['scale_bits']:.4f}",
                     f"{bits['paper_large_tensor'][k]:.4f}")
                    for k in ("no_double_quant", "double_quant")])
    saved = bits["no_double_quant"]["bits"] - bits["double_quant"]["bits"]
    return (f"{a}\n\n{b}\n\n{c}\n\n{d}\n\ndouble quantization saves {saved:.4f} bits a parameter "
            f"(paper: 0.5 - 0.127 = 0.373)")


def plot_dtypes(result, path) -> None:
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    width = 0.38
    for k, (sample, color) in enumerate((("normal", "tab:blue"), ("weights", "tab:orange"))):
        values = [result["errors"][sample][t]["mse"] for t in DTYPES]
        reference = result["errors"][sample]["nf4"]["mse"]
        left.bar([i + (k - 0.5) * width for i in range(len(DTYPES))],
                 [v / reference for v in values], width, color=color,
                 label=f"{sample} (NF4 MSE {reference:.2e})")
    left.set_xticks(range(len(DTYPES)), DTYPES)
    left.set(ylabel="MSE relative to NF4", title="(a) quantization error, blocksize 64")
    left.legend(fontsize=7)
    labels = list(result["finetuned_val_loss"])
    for i, label in enumerate(labels):
        stats = result["finetuned_val_loss"][label]
        right.scatter([i] * len(stats["values"]), stats["values"], color="tab:green", s=12,
                      alpha=0.6)
        right.errorbar([i], [stats["mean"]], yerr=[stats["std"] or 0], fmt="_", color="k",
                       capsize=6)
    right.set_xticks(range(len(labels)), [label.replace(" ", "\n") for label in labels],
                     fontsize=7)
    right.set(ylabel="validation loss after fine-tuning",
              title="(c) fine-tuned by base data type, per seed")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------------ paged-spike

SPIKE_FACTOR = 4  # a spike step's batch is this many times the normal batch
SPIKES = 4  # spike steps in a run: every (steps // SPIKES)-th step


class DeviceAccount:
    """Device bytes of a training run on the CPU, step by step: counted, not allocated.

    fixed: the model's parameters and buffers, and the trainable parameters' gradients (kept from
    one step to the next by train_loop's zero_grad(set_to_none) after the forward); activations:
    the tensors autograd saves for backward in this step's forward (each storage once, weights
    excluded), counted by a saved_tensors_hooks pack hook; optimizer: its state on the device,
    PagedAdamW's stats.resident_bytes (or all of AdamW's state). The peak of a step is the largest
    fixed + optimizer + activations during its forward, or fixed + the optimizer's peak resident
    bytes during its update. Under a PagedAdamW the account also acts as a device allocator would:
    when a saved activation leaves less than the optimizer's resident state under `budget`, the
    least recently used pages go to the host first (unified memory's eviction); for the update,
    the activations are freed and the optimizer's budget is what remains under `budget`."""

    def __init__(self, model, optimizer, budget: int | None):
        tensors = list(model.parameters()) + list(model.buffers())
        self.weight_storages = {t.untyped_storage().data_ptr() for t in tensors}
        self.fixed = sum(t.nbytes for t in tensors) + sum(
            p.nbytes for p in model.parameters() if p.requires_grad)
        self.optimizer, self.budget = optimizer, budget
        self.paged = isinstance(optimizer, PagedAdamW) and budget is not None
        self.rows, self.seen, self.activations, self.peak = [], set(), 0, 0
        if self.paged:
            optimizer.register_step_pre_hook(lambda *_: self.before_update())
        optimizer.register_step_post_hook(lambda *_: self.after_update())

    def resident(self) -> int:
        if isinstance(self.optimizer, PagedAdamW):
            return self.optimizer.stats.resident_bytes
        return optimizer_state_bytes(self.optimizer)

    def set_optimizer_budget(self, nbytes: int) -> None:
        """PagedAdamW's device budget, lowered or raised; pages over it go to the host now."""
        table = self.optimizer.table
        table.budget_bytes = table.limit = self.optimizer.device_budget_bytes = max(0, nbytes)
        self.optimizer.page_out(table.over_budget())

    def start_forward(self, batch_size: int) -> None:
        self.seen, self.activations = set(), 0
        self.batch_size, self.traffic = batch_size, self.traffic_now()
        self.peak = self.fixed + self.resident()

    def pack(self, tensor):
        """The pack hook: count a saved tensor's storage once (not a weight's)."""
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.seen | self.weight_storages:
            self.seen.add(storage.data_ptr())
            self.activations += storage.nbytes()
            if self.paged:
                self.set_optimizer_budget(self.budget - self.fixed - self.activations)
            self.peak = max(self.peak, self.fixed + self.resident() + self.activations)
        return tensor

    def traffic_now(self):
        stats = getattr(self.optimizer, "stats", None)
        return (0, 0) if stats is None else (stats.bytes_out, stats.bytes_in)

    def before_update(self) -> None:  # the activations are freed: the optimizer may grow back
        self.set_optimizer_budget(self.budget - self.fixed)
        self.optimizer.stats.peak_resident_bytes = self.optimizer.stats.resident_bytes

    def after_update(self) -> None:
        during = (self.optimizer.stats.peak_resident_bytes if self.paged else self.resident())
        out, into = (now - before for now, before in zip(self.traffic_now(), self.traffic))
        self.rows.append(dict(batch_size=self.batch_size, activations=self.activations,
                              peak=max(self.peak, self.fixed + during), bytes_out=out,
                              bytes_in=into, resident_after=self.resident()))


class Accounted(torch.nn.Module):
    """The model, its forward under the account's saved-tensor hook; the losses it returned."""

    def __init__(self, model, account: DeviceAccount | None = None):
        super().__init__()
        self.inner, self.account, self.losses = model, account, []

    def forward(self, x, y):
        if self.account is None:
            return self.inner(x, y)
        self.account.start_forward(x.shape[0])
        with torch.autograd.graph.saved_tensors_hooks(self.account.pack, lambda t: t):
            logits, loss = self.inner(x, y)
        self.losses.append(loss.item())
        return logits, loss


def spike_schedule(steps: int, batch_size: int):
    every = max(2, steps // SPIKES)
    return lambda step: batch_size * (SPIKE_FACTOR if (step + 1) % every == 0 else 1)


def activation_bytes(model, x, y) -> int:
    """The bytes autograd saves in one forward of (x, y) (as DeviceAccount counts them)."""
    account = DeviceAccount(model, torch.optim.SGD([torch.zeros(1, requires_grad=True)]), None)
    account.start_forward(x.shape[0])
    with torch.autograd.graph.saved_tensors_hooks(account.pack, lambda t: t):
        model(x, y)
    return account.activations


def spike_run(ctx, optimizer_kind: str, budget, seed: int = 0):
    """QLoRA fine-tuning with spikes, train.py's prepare and train_loop; (rows, losses, model)."""
    opts = dict(METHOD_DEFAULTS["qlora"], dropout=0.0)
    model = prepare("qlora", copy.deepcopy(ctx.base()), opts, seed)
    optimizer = make_optimizer(model, optimizer_kind, opts["lr"], None)
    account = DeviceAccount(model, optimizer, budget)
    wrapped = Accounted(model, account)
    steps, size = ctx.size.steps, ctx.size
    cfg = replace(size.base, batch_size=size.batch_size, finetune_steps=steps,
                  checkpoint_every=steps, seed=seed)
    with tempfile.TemporaryDirectory() as scratch:
        train_loop(wrapped, optimizer, ctx.corpus.train, cfg, steps, opts["lr"], 0,
                   os.path.join(scratch, "checkpoint.pt"), dict(method="qlora"), False,
                   ctx.device, f"qlora {optimizer_kind}",
                   batch_size_at=spike_schedule(steps, size.batch_size))
    for row, loss in zip(account.rows, wrapped.losses):
        row["loss"] = loss
    return account, model


def run_spike(ctx) -> dict:
    size = ctx.size
    probe = prepare("qlora", copy.deepcopy(ctx.base()), dict(METHOD_DEFAULTS["qlora"],
                                                             dropout=0.0), 0)
    spike_batch = size.batch_size * SPIKE_FACTOR
    x = ctx.corpus.train[: spike_batch * size.base.block_size].view(spike_batch, -1).clone()
    normal = activation_bytes(probe, x[: size.batch_size], x[: size.batch_size])
    spike = activation_bytes(probe, x, x)
    state = 2 * 4 * adapters.count_trainable(probe)  # AdamW's m and v in float32
    fixed = DeviceAccount(probe, torch.optim.SGD(list(probe.parameters())[:1]), None).fixed
    # a normal step fits with every optimizer byte resident; a spike does not, but its
    # activations alone do: the budget is the larger of the two needs
    budget = fixed + max(state + normal, spike)
    unpaged, unpaged_model = spike_run(ctx, "adamw", budget)
    ctx.log(f"[paged-spike] adamw (unpaged): peak {max(r['peak'] for r in unpaged.rows):,} B, "
            f"budget {budget:,} B")
    paged, paged_model = spike_run(ctx, "paged_adamw", budget)
    ctx.log(f"[paged-spike] paged_adamw: peak {max(r['peak'] for r in paged.rows):,} B")
    same_losses = [r["loss"] for r in paged.rows] == [r["loss"] for r in unpaged.rows]
    same_weights = all(torch.equal(a, b) for a, b in zip(paged_model.parameters(),
                                                         unpaged_model.parameters()))
    return dict(accounting="cpu: saved tensors for backward + weights + gradients + optimizer "
                           "state resident (PagedAdamW stats / AdamW state)",
                budget=budget, fixed=fixed, optimizer_state=state, activations_normal=normal,
                activations_spike=spike, spike_factor=SPIKE_FACTOR,
                unpaged=dict(steps=unpaged.rows,
                             over_budget_steps=[i + 1 for i, r in enumerate(unpaged.rows)
                                                if r["peak"] > budget]),
                paged=dict(steps=paged.rows,
                           over_budget_steps=[i + 1 for i, r in enumerate(paged.rows)
                                              if r["peak"] > budget]),
                losses_bit_equal=same_losses, weights_bit_equal=same_weights)


def spike_table(result) -> str:
    rows = []
    for i, (u, p) in enumerate(zip(result["unpaged"]["steps"], result["paged"]["steps"])):
        rows.append((i + 1, u["batch_size"], f"{u['peak']:,}", f"{p['peak']:,}",
                     f"{p['bytes_out']:,}", f"{p['bytes_in']:,}", f"{p['loss']:.6f}"))
    table = text_table(("step", "batch", "AdamW peak B", "paged peak B", "paged out B",
                        "paged in B", "loss"), rows)
    return (f"{table}\n\nbudget {result['budget']:,} B = weights and gradients "
            f"{result['fixed']:,} + max(optimizer state {result['optimizer_state']:,} + "
            f"activations {result['activations_normal']:,}, spike activations "
            f"{result['activations_spike']:,}); counted on the CPU (saved tensors for backward)\n"
            f"over budget: AdamW at steps {result['unpaged']['over_budget_steps']}, paged at "
            f"steps {result['paged']['over_budget_steps']}; losses bit-equal: "
            f"{result['losses_bit_equal']}, weights bit-equal: {result['weights_bit_equal']}")


def plot_spike(result, path) -> None:
    import matplotlib.pyplot as plt
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(8, 5.6), sharex=True,
                                              height_ratios=(2, 2, 1))
    steps = range(1, len(result["paged"]["steps"]) + 1)
    budget, mib, kib = result["budget"], 2.0**20, 1024.0
    runs = (("unpaged", "AdamW (unpaged)", "o-"), ("paged", "PagedAdamW", "s--"))
    for key, label, style in runs:
        peaks = [r["peak"] for r in result[key]["steps"]]
        top.plot(steps, [p / mib for p in peaks], style, ms=3, label=label)
        middle.plot(steps, [(p - budget) / kib for p in peaks], style, ms=3, label=label)
    top.axhline(budget / mib, color="r", lw=1, label="device budget")
    top.set(ylabel="peak device MiB", title="paged-spike: device bytes per step (CPU count)")
    top.legend(fontsize=7)
    excess = max(r["peak"] for r in result["unpaged"]["steps"]) - budget
    middle.axhline(0, color="r", lw=1)
    middle.set_ylim(-3 * excess / kib, 1.5 * excess / kib)  # normal steps lie below, off scale
    middle.set(ylabel="peak - budget, KiB")
    bottom.bar(steps, [r["bytes_out"] / kib for r in result["paged"]["steps"]], color="tab:red",
               label="paged out")
    bottom.bar(steps, [-r["bytes_in"] / kib for r in result["paged"]["steps"]],
               color="tab:green", label="paged in (down)")
    bottom.set(xlabel="step", ylabel="KiB")
    bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


EXPERIMENTS = (
    Experiment(
        name="qlora-dtypes",
        claim=("QLoRA (Dettmers et al. 2023) §4, Fig. 3, Table 2: \"4-bit NormalFloat yields "
               "better performance than 4-bit Floating Point\" (and Int4); §4: \"k-bit QLoRA "
               "matches 16-bit full finetuning and 16-bit LoRA performance\"; §3: double "
               "quantization \"reduces the memory footprint per parameter from 32/64 = 0.5 bits, "
               "to 8/64 + 32/(64 · 256) = 0.127 bits\""),
        run=run_dtypes, table=dtypes_table, plot=plot_dtypes),
    Experiment(
        name="paged-spike",
        claim=("QLoRA §3: \"Paged Optimizers: [...] to manage memory spikes [...] automatically "
               "evicted to CPU RAM when the GPU runs out-of-memory and paged back into GPU "
               "memory when the memory is needed in the optimizer update step\""),
        run=run_spike, table=spike_table, plot=plot_spike),
)
