"""Speed and memory of this project's methods next to the peers a user would otherwise pick.

    python bench.py                                # every row group
    python bench.py --only nf4,train --json out.json
    python bench.py --only sweep --plot sweep.png  # LoRA against full over the model's width
    python bench.py --quick                        # tiny sizes: what the smoke test runs

Row groups (for --only; bench_<group> says what each times): nf4, train, infer, paged, memory,
sweep. The sweep draws --plot if matplotlib is installed (optional: pip install matplotlib).
A time is the median of --repeats timed calls after a warm-up round (fewer for larger models); the
contenders of a group run interleaved (a b c, b c a, c a b, ...) in one process, so a change in the
machine's load hits all alike. ours/peer below 1: ours is faster (or smaller); compare ratios, not
times, between machines. A goal from TARGETS is shown, and whether the ratio as printed meets it.
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

import torch

import adapters
import nf4
import train
import vera
from checks import check_choice, check_int
from fast_paths.nf4_lookup import dequantize_nf4_chunked, lookup_tables, quantize_nf4_chunked
from formats import safetensors_io
from paged_optim import PagedAdamW
from training import memory
from training.flags import Parser, checked

GROUPS = ("nf4", "train", "infer", "paged", "memory", "sweep")
METHODS = ("full", "lora", "qlora", "vera", "dora")
PEFT_METHODS = ("lora", "dora", "vera")
PEFT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
SEED = 0
MEMORY_PARTS = ("weights", "grads", "optimizer")  # of train.training_memory
Config = train.TrainConfig  # a GPT's shape and its batch of batch_size x block_size tokens
SIZES = {"tiny": Config(seed=SEED),  # train.py's default model and batch
         "25M": Config(n_layer=8, n_head=8, n_embd=512, block_size=128, batch_size=4, seed=SEED)}
SLOW = {"25M": 2}  # divides the repeats of a size's rows
QUICK = Config(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=2, seed=SEED)
NF4_SIDE, QUICK_NF4_SIDE = 4096, 256
# The width sweep: only n_embd changes. Two blocks and 8x64 tokens make the widest model as large
# as the 25M one but quicker to step, so that the sweep takes about a minute on two cores.
SWEEP = [replace(Config(n_layer=2, n_head=4, block_size=64, batch_size=8, seed=SEED), n_embd=width)
         for width in (64, 128, 256, 512, 1024)]
QUICK_SWEEP = [replace(QUICK, n_embd=width) for width in (16, 32)]
DEFAULT_PLOT = "bench_sweep.png"

# The goals rows are held to: the goal in its issue's words, ending in its bound -> regular
# expressions for the rows' (case, peer). "round 1": a first-round goal that issue 16 kept.
TARGETS = {
    "issue 16: NF4 quantize / bitsandbytes (float32 and bfloat16) <= 0.5":
        (r"quantize (float32|bfloat16) 4096x4096", "bitsandbytes"),
    "issue 16: NF4 dequantize float32 / copy into a new tensor (4096x4096) <= 1.3":
        (r"dequantize float32 4096x4096", "copy, new tensor"),
    "issue 16: NF4 dequantize bfloat16 / copy into a new tensor <= 2.0":
        (r"dequantize bfloat16 4096x4096", "copy, new tensor"),
    "issue 16: NF4 dequantize bfloat16 / bitsandbytes' <= 1.0":
        (r"dequantize bfloat16 4096x4096", "bitsandbytes"),
    "round 1: NF4 dequantize within 2x of a copy (both into an existing tensor) <= 2.0":
        (r"dequantize into (float32|bfloat16) 4096x4096", "copy_, existing one"),
    "issue 16: QLoRA step / LoRA step, tiny GPT, float32 compute <= 1.15":
        (r"tiny qlora step", "our lora"),
    "issue 16: our VeRA step / PEFT's VeRA step (tiny, 25M) <= 1.0":
        (r"(tiny|25M) vera step", "peft vera"),
    "round 1: our LoRA and DoRA steps no slower than PEFT's <= 1.0":
        (r"(tiny|25M) (lora|dora) step", r"peft (lora|dora)"),
    "round 1: DoRA step / LoRA step <= 1.5": (r"(tiny|25M) dora step", "our lora"),
    "round 1: LoRA faster than full fine-tuning (at 25M; the sweep shows from where) < 1.0":
        (r"25M lora step", "our full"),
    "round 1: merged inference within noise of the base (taken as 5%) <= 1.05":
        (r"(tiny|25M) merged \(lora\) forward, .*", "base"),
    "issue 16: PagedAdamW step / AdamW(foreach=False), no budget <= 1.05":
        (r"(tiny|25M) PagedAdamW step, no budget", "torch AdamW"),
    "issue 16: PagedAdamW step / AdamW, budget half the state (CPU) <= 1.5":
        (r"(tiny|25M) PagedAdamW step, half the state", "torch AdamW"),
}


def optional(name: str):
    """The peer library if it is installed, else None (its rows then show no peer)."""
    try:
        return importlib.import_module(name)
    except Exception:  # ImportError, or a broken install failing on import
        return None


# ------------------------------------------------------------------------------------- timing
def measure(calls: dict, repeats: int, sync, warmup: int = 1) -> dict:
    """Median milliseconds of one call of each callable: rounds of one call each, the first of a
    round rotating, after `warmup` untimed rounds; the garbage collector off (as in timeit)."""
    names, times = list(calls), {name: [] for name in calls}
    gc.collect()
    gc.disable()
    try:
        for round_ in range(warmup + repeats):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                sync()
                t0 = time.perf_counter()
                calls[name]()
                sync()
                if round_ >= warmup:
                    times[name].append(1e3 * (time.perf_counter() - t0))
    finally:
        gc.enable()
    return {name: statistics.median(ts) for name, ts in times.items()}


def row(group, case, ours, peer=None, theirs=None, unit="ms", note="", **extra) -> dict:
    """One table row. ratio = ours / theirs (None without a peer's value); `goal`: its TARGETS
    entry, if any; `met`: whether the ratio as printed meets it (None: nothing to judge)."""
    ratio, met = None if theirs is None else ours / theirs, None
    goal = next((words for words, (cases, peers) in TARGETS.items()
                 if re.fullmatch(peers, peer or "") and re.fullmatch(cases, case)), None)
    target = goal and " ".join(goal.split()[-2:])  # e.g. "<= 1.3"
    if goal and ratio is not None:  # judged as printed: a "1.05" never misses "<= 1.05"
        relation, bound, shown = *target.split(), round(ratio, 2)
        met = shown <= float(bound) if relation == "<=" else shown < float(bound)
    return dict(group=group, case=case, ours=ours, peer=peer, theirs=theirs, unit=unit,
                ratio=ratio, target=target, met=met, goal=goal, note=note, **extra)


# ------------------------------------------------------------------------------------- models
def batch(cfg, vocab: int, device, rows: int | None = None):
    """Random token ids x and targets y, each (rows or cfg.batch_size, block_size)."""
    g, shape = torch.Generator().manual_seed(SEED), (rows or cfg.batch_size, cfg.block_size)
    return tuple(torch.randint(vocab, shape, generator=g).to(device) for _ in range(2))


def options(method: str) -> dict:
    return dict(train.METHOD_DEFAULTS[method], targets=adapters.ALL_LINEAR, dropout=0.0)


def ours(method: str, base, device) -> torch.nn.Module:
    return train.prepare(method, copy.deepcopy(base), options(method), SEED).to(device)


def peft_model(peft, method: str, base, device) -> torch.nn.Module:
    """PEFT's adapter on a copy of the same base: same targets, rank, alpha (VeRA: same seed)."""
    opts = options(method)
    config = (peft.VeraConfig(r=opts["rank"], target_modules=PEFT_TARGET_MODULES,
                              projection_prng_key=SEED, d_initial=vera.DEFAULT_D_INITIAL)
              if method == "vera" else
              peft.LoraConfig(r=opts["rank"], lora_alpha=opts["alpha"], lora_dropout=0.0,
                              target_modules=PEFT_TARGET_MODULES, use_dora=method == "dora"))
    return peft.get_peft_model(copy.deepcopy(base), config).to(device)


def train_step(model, method: str, x, y):
    """One step: forward, backward, torch AdamW(foreach=False) over the trainable parameters at
    the method's learning rate (the same optimizer for every contender); .optimizer is it."""
    optimizer = train.make_optimizer(model, "adamw", train.METHOD_DEFAULTS[method]["lr"], None)

    def step():
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    step.optimizer = optimizer
    return step


def shape_note(base, cfg) -> str:
    return f"{base.num_parameters() / 1e6:.2f}M params, {cfg.batch_size}x{cfg.block_size} tokens"


# ------------------------------------------------------------------------------------- row groups

def bench_nf4(ctx) -> list:
    """NF4 quantize / dequantize by the lookups of fast_paths/nf4_lookup.py against bitsandbytes'
    (blocksize 64, double quantization) and against the references nf4.quantize_nf4 and
    nf4.dequantize_nf4 (same bits); dequantize against a copy of its output's size: into a new
    tensor (as it returns) or not."""
    bnb, side, rows = optional("bitsandbytes.functional"), ctx.nf4_side, []
    bnb_args = dict(blocksize=nf4.DEFAULT_BLOCKSIZE, compress_statistics=True, quant_type="nf4")
    tables = lookup_tables(nf4.nf4_code(), nf4.dynamic_code(), ctx.device)
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(SEED)
        w, src = (torch.randn(side, side, generator=g).to(ctx.device, dtype) for _ in range(2))
        q, dst, out = nf4.quantize_nf4(w), torch.empty_like(w), torch.empty_like(w)
        calls = {"quantize": lambda: quantize_nf4_chunked(w, nf4.DEFAULT_BLOCKSIZE, True, tables),
                 "dequantize": lambda: dequantize_nf4_chunked(q, dtype, tables),
                 "dequantize into": lambda: dequantize_nf4_chunked(q, dtype, tables, out=out),
                 "reference quantize": lambda: nf4.quantize_nf4(w),
                 "reference dequantize": lambda: nf4.dequantize_nf4(q),
                 "copy_": lambda: dst.copy_(src), "clone": src.clone}
        if bnb is not None:
            packed, state = bnb.quantize_4bit(w, **bnb_args)
            calls["bnb quantize"] = lambda: bnb.quantize_4bit(w, **bnb_args)
            calls["bnb dequantize"] = lambda: bnb.dequantize_4bit(packed, state)
        t, shape = measure(calls, ctx.repeats, ctx.sync), f"{str(dtype)[6:]} {side}x{side}"
        rows += [row("nf4", f"{case} {shape}", t[case], peer, t.get(key)) for case, peer, key in
                 [("quantize", "bitsandbytes", "bnb quantize"),
                  ("quantize", "reference", "reference quantize"),
                  ("dequantize", "bitsandbytes", "bnb dequantize"),
                  ("dequantize", "reference", "reference dequantize"),
                  ("dequantize", "copy, new tensor", "clone"),
                  ("dequantize into", "copy_, existing one", "copy_")]]
    return rows


def bench_train(ctx) -> list:
    """A training step of each method as train.prepare builds it and of PEFT's LoRA, DoRA, VeRA
    (same base, targets, rank, alpha): against full fine-tuning, LoRA and PEFT."""
    peft, rows = optional("peft"), []
    for name, cfg in ctx.sizes.items():
        base, (x, y) = train.build_model(cfg, ctx.vocab, "cpu"), batch(cfg, ctx.vocab, ctx.device)
        models = {m: ours(m, base, ctx.device) for m in METHODS}
        if peft is not None:
            models.update({f"peft {m}": peft_model(peft, m, base, ctx.device)
                           for m in PEFT_METHODS})
        calls = {k: train_step(m, k.split()[-1], x, y) for k, m in models.items()}
        t = measure(calls, max(1, ctx.repeats // SLOW.get(name, 1)), ctx.sync)
        rows.append(row("train", f"{name} full step", t["full"], note=shape_note(base, cfg)))
        pairs = [(m, f"our {p}", p) for m, p in
                 (("lora", "full"), ("qlora", "lora"), ("vera", "full"), ("dora", "lora"))]
        for method, peer, key in pairs + [(m, f"peft {m}", f"peft {m}") for m in PEFT_METHODS]:
            rows.append(row("train", f"{name} {method} step", t[method], peer, t.get(key)))
        del models, calls
    return rows


def bench_infer(ctx) -> list:
    """Eval forward of the base, the LoRA-adapted and the merged model (adapters.merge_adapters)
    for the training batch and one sequence; "base copy", the base timed twice, is the noise."""
    rows = []
    for name, cfg in ctx.sizes.items():
        base = train.build_model(cfg, ctx.vocab, ctx.device)
        adapted = ours("lora", base, ctx.device)
        with torch.no_grad():  # B = 0 at init would leave nothing to merge: give it an update
            for p in (p for p in adapted.parameters() if p.requires_grad):
                p.normal_(0, 0.02, generator=torch.Generator(p.device).manual_seed(SEED))
        models = {k: m.eval() for k, m in {"base": base, "base copy": copy.deepcopy(base),
                  "adapted": adapted, "merged": adapters.merge_adapters(adapted)}.items()}
        for rows_ in dict.fromkeys((cfg.batch_size, 1)):  # the training batch, one sequence
            x, _ = batch(cfg, ctx.vocab, ctx.device, rows_)
            t = measure({k: torch.no_grad()(lambda m=m: m(x)) for k, m in models.items()},
                        2 * ctx.repeats, ctx.sync)
            for case in ("base copy", "adapted", "merged"):
                label = "base copy" if case == "base copy" else f"{case} (lora)"
                rows.append(row("infer", f"{name} {label} forward, {rows_}x{cfg.block_size}",
                                t[case], "base", t["base"], note="noise" * (case == "base copy")))
    return rows


def bench_paged(ctx) -> list:
    """PagedAdamW.step against torch.optim.AdamW(foreach=False).step over all of a GPT's
    parameters: no device budget, a budget of half the state, and zero."""
    rows = []
    for name, cfg in ctx.sizes.items():
        base = train.build_model(cfg, ctx.vocab, ctx.device)
        state_bytes = 2 * sum(p.numel() * p.element_size() for p in base.parameters())  # m and v
        budgets = {"no budget": None, "half the state": state_bytes // 2, "zero budget": 0}
        optimizers, g = {}, torch.Generator().manual_seed(SEED)
        for label in ("adamw",) + tuple(budgets):
            params = [p.detach().clone().requires_grad_(True) for p in base.parameters()]
            for p in params:
                p.grad = 1e-3 * torch.randn(p.shape, generator=g).to(p.device, p.dtype)
            optimizers[label] = (
                torch.optim.AdamW(params, lr=1e-3, foreach=False) if label == "adamw"
                else PagedAdamW(params, lr=1e-3, device_budget_bytes=budgets[label]))
        t = measure({k: o.step for k, o in optimizers.items()},
                    max(1, 2 * ctx.repeats // SLOW.get(name, 1)), ctx.sync)
        for label, budget in budgets.items():
            steps = int(next(iter(optimizers[label].state.values()))["step"])
            note = f"{optimizers[label].stats.page_ins / steps:.0f} page-ins a step"
            rows.append(row("paged", f"{name} PagedAdamW step, {label}", t[label], "torch AdamW",
                            t["adamw"], note="" if budget is None else note))
    return rows


def bench_memory(ctx) -> list:
    """Bytes of weights, gradients and optimizer state after one step (train.training_memory)
    per method, against full fine-tuning; on CUDA also the step's peak allocated memory."""
    rows, cuda = [], ctx.device.type == "cuda"
    for name, cfg in ctx.sizes.items():
        base, (x, y) = train.build_model(cfg, ctx.vocab, "cpu"), batch(cfg, ctx.vocab, ctx.device)
        for method in METHODS:
            if cuda:
                torch.cuda.reset_peak_memory_stats(ctx.device)
            model = ours(method, base, ctx.device)
            (step := train_step(model, method, x, y))()
            mem, extra = train.training_memory(model, step.optimizer), {}
            note = ", ".join(f"{k} {train.human_bytes(mem[k])}" for k in MEMORY_PARTS)
            if method == "qlora":
                bits = memory.qlora_memory_report(model)["bits_per_parameter"]
                note += f"; NF4 base {bits:.3f} bits/param"
            if cuda:
                extra["cuda_peak_bytes"] = peak = torch.cuda.max_memory_allocated(ctx.device)
                note += f"; CUDA peak {train.human_bytes(peak)}"
            if method == "full":  # METHODS starts with full
                full = mem["total"]
            rows.append(row("memory", f"{name} {method} train state", mem["total"],
                            *(() if method == "full" else ("our full", full)), unit="bytes",
                            note=note, bytes=mem, **extra))
            del model, step
    return rows


def bench_sweep(ctx) -> list:
    """A LoRA step against a full step of GPTs that differ only in width (SWEEP): where LoRA's
    saved weight gradients and optimizer work start to outweigh its extra low-rank matmuls."""
    rows = []
    for cfg in ctx.sweep:
        base, (x, y) = train.build_model(cfg, ctx.vocab, "cpu"), batch(cfg, ctx.vocab, ctx.device)
        calls = {m: train_step(ours(m, base, ctx.device), m, x, y) for m in ("full", "lora")}
        # the wider models' steps take longest: fewer rounds, but at least 3 (a median)
        t = measure(calls, max(min(3, ctx.repeats), ctx.repeats * 256 // max(cfg.n_embd, 256)),
                    ctx.sync)
        rows.append(row("sweep", f"width {cfg.n_embd} lora step", t["lora"], "our full",
                        t["full"], note=f"{cfg.n_layer} layers, {shape_note(base, cfg)}",
                        width=cfg.n_embd))
    return rows


BENCHES = dict(nf4=bench_nf4, train=bench_train, infer=bench_infer, paged=bench_paged,
               memory=bench_memory, sweep=bench_sweep)


# ------------------------------------------------------------------------------------- report

def machine(device) -> str:
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else open(os.devnull) as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name")), cpu)
    cuda = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    peers = [f"{n} {m.__version__}" for n in ("peft", "bitsandbytes") if (m := optional(n))]
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}{cuda}"
            + (f"; peers: {', '.join(peers)}" if peers else "; no peer library installed"))


def amount(value, unit: str) -> str:
    if value is None:
        return "-"
    return train.human_bytes(value) if unit == "bytes" else f"{value:.2f} ms"


COLUMNS = (  # (header, cell(row) -> text, alignment) for train.format_table
    ("group", lambda r: r["group"], "<"), ("case", lambda r: r["case"], "<"),
    ("ours", lambda r: amount(r["ours"], r["unit"]), ">"),
    ("peer", lambda r: r["peer"] or "-", "<"),
    ("peer's", lambda r: amount(r["theirs"], r["unit"]), ">"),
    ("ours/peer", lambda r: "-" if r["ratio"] is None else f"{r['ratio']:.2f}", ">"),
    ("target", lambda r: r["target"] or "", ">"),
    ("met", lambda r: {True: "yes", False: "no", None: "-" * bool(r["target"])}[r["met"]], "<"),
    ("note", lambda r: r["note"], "<"))


def plot_sweep(rows: list, path: str) -> bool:
    """The sweep's LoRA / full ratio against width, as a PNG at `path`, if matplotlib is here."""
    if optional("matplotlib") is None:
        return False
    importlib.import_module("matplotlib").use("Agg")  # files only, no display
    plt = importlib.import_module("matplotlib.pyplot")
    figure, axes = plt.subplots(figsize=(6, 4))
    widths, (layers, _, tokens) = [r["width"] for r in rows], rows[0]["note"].split(", ")
    axes.plot(widths, [r["ratio"] for r in rows], "o-")
    axes.axhline(1.0, color="gray", linestyle="--")  # below it, a LoRA step is the faster
    axes.set_xscale("log", base=2)
    axes.set_xticks(widths, [str(w) for w in widths])
    axes.set(xlabel="width (n_embd)", ylabel="LoRA (r=8) step / full step",
             title=f"GPT of {layers}, {tokens}: below 1, LoRA is faster")
    figure.tight_layout()
    safetensors_io.atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=100))
    plt.close(figure)
    return True


# ------------------------------------------------------------------------------------- flags

def groups_flag(text: str) -> tuple:
    names = dict.fromkeys(name.strip() for name in text.split(","))  # each group runs once
    return tuple(checked(check_choice, str, choices=GROUPS)(name) for name in names)


def device_flag(text: str) -> str:
    if text == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda: torch finds no CUDA device here (use auto or cpu)")
    return checked(check_choice, str, choices=("auto", "cpu", "cuda"))(text)


def output_file(text: str) -> str:
    """An argparse `type`: the name of a file to write, in a folder that exists."""
    if not text or os.path.isdir(text) or not os.path.isdir(os.path.dirname(os.path.abspath(text))):
        raise argparse.ArgumentTypeError(f"must name a file in an existing folder, got {text!r}")
    return text


def build_parser() -> Parser:
    p = Parser(prog="bench.py", description=__doc__.split("\n")[0])
    p.add_argument("--only", type=groups_flag, default=GROUPS, help=f"some of {','.join(GROUPS)}")
    p.add_argument("--device", type=device_flag, default="auto", help="auto (CUDA if any), cpu")
    p.add_argument("--repeats", type=checked(check_int, low=1), default=7,
                   help="timed calls per contender, fewer for the larger models (default 7)")
    p.add_argument("--threads", type=checked(check_int, low=1), help="torch.set_num_threads first")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the bench")
    p.add_argument("--json", type=output_file, help="also write the rows to this file")
    p.add_argument("--plot", type=output_file, default=DEFAULT_PLOT,
                   help=f"where the sweep draws its plot, with matplotlib ({DEFAULT_PLOT})")
    return p


# ------------------------------------------------------------------------------------- main

def context(args) -> SimpleNamespace:
    """What every row group reads: device, sync, sizes, sweep, repeats, vocabulary size."""
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    return SimpleNamespace(
        device=torch.device("cuda" if cuda else "cpu"), repeats=args.repeats,
        sync=torch.cuda.synchronize if cuda else lambda: None,
        sizes={"quick": QUICK} if args.quick else SIZES,
        sweep=QUICK_SWEEP if args.quick else SWEEP,
        nf4_side=QUICK_NF4_SIDE if args.quick else NF4_SIDE,
        vocab=len(train.build_vocab(train.pretraining_text())))  # train.py's vocabulary


def main(argv=None) -> list:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    ctx, load_before, t0, rows = context(args), os.getloadavg()[0], time.perf_counter(), []
    for group in args.only:
        print(f"bench: {group} ...", file=sys.stderr, flush=True)
        rows += BENCHES[group](ctx)
    seconds, info = time.perf_counter() - t0, machine(ctx.device)
    load = f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    print(f"machine: {info}\ndevice: {ctx.device}; {seconds:.0f} s; 1-minute load average {load}\n")
    print(train.format_table(rows, COLUMNS))
    judged = [r for r in rows if r["met"] is not None]
    print("\nours/peer = our median / the peer's median in the same run: < 1, ours is faster "
          f"(smaller)\ntargets met: {sum(r['met'] for r in judged)} of {len(judged)} judged")
    if sweep := [r for r in rows if r["group"] == "sweep"]:
        print(f"sweep plot: {args.plot}" if plot_sweep(sweep, args.plot) else
              "sweep plot: not drawn, matplotlib is not installed (pip install matplotlib)")
    if args.json:
        payload = json.dumps(dict(machine=info, device=str(ctx.device), load_average=load,
                                  seconds=seconds, argv=sys.argv[1:] if argv is None else argv,
                                  rows=rows), indent=1)
        safetensors_io.atomic_write(args.json, lambda file: file.write(payload.encode()))
    return rows


if __name__ == "__main__":
    main()
