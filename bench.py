"""Speed and memory of this project's methods next to the peers a user would otherwise pick.

    python bench.py                                # every row group (a few minutes on 2 cores)
    python bench.py --only nf4,train --json out.json
    python bench.py --quick                        # tiny sizes, seconds (what the smoke test runs)

Row groups (names for --only):
  nf4     quantize_nf4 / dequantize_nf4 of a 4096x4096 float32 and bfloat16 matrix, against
          bitsandbytes' quantize_4bit / dequantize_4bit (nf4, blocksize 64, double quantization);
          dequantize also against the memory-bandwidth floor, a plain copy of a tensor of the
          output's size and dtype: into a new tensor (which dequantize must return), and into an
          existing one.
  train   one training step (forward, backward, AdamW(foreach=False) over the trainable parameters)
          of the tiny GPT (train.py's model and batch) and of a ~25 M-parameter GPT: full
          fine-tuning, LoRA, QLoRA, VeRA, DoRA as train.prepare builds them, and PEFT's LoRA, DoRA
          and VeRA on the same base, targets (the six block linears), rank and alpha.
  infer   forward latency (eval, no_grad) of the base, the LoRA-adapted and the merged model
          (adapters.merge_adapters), for the training batch and one sequence; "base copy" is the base
          timed twice: the noise floor.
  paged   PagedAdamW.step against torch.optim.AdamW(foreach=False).step over all of a GPT's
          parameters: no device budget, a budget of half the state, and zero.
  memory  bytes of weights, gradients and optimizer state after one step (train.training_memory),
          per method, against full fine-tuning; on CUDA also the step's peak allocated memory.
  switch  one base model switched among N=8 adapters read once from their files: VeRA's
          use_vera_adapter against LoRA's load_adapter; and the bytes of one file of each.

Reading the table: a time is the median of --repeats timed calls after a warm-up round (half as
many for the 25 M model). The contenders of a group run interleaved (a b c, b c a, c a b, ...) in
one process, so a change in the machine's load hits all of them alike. ratio = ours / peer: below
1 ours is faster (or smaller). Compare ratios, not absolute times, between machines.
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

import adapters
import lora
import nf4
import qlora
import train
import vera
from paged_optim import PagedAdamW
from tiny_gpt import GPT, GPTConfig

GROUPS = ("nf4", "train", "infer", "paged", "memory", "switch")
METHODS = ("full", "lora", "qlora", "vera", "dora")
PEFT_METHODS = ("lora", "dora", "vera")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]  # adapters.ALL_LINEAR here
N_ADAPTERS = 8
SEED = 0
_TINY = train.TrainConfig()  # the tiny GPT: train.py's default model and batch
SIZES = {  # GPT shape, a batch of `batch` x block_size tokens, and `slow`: divides the repeats
    "tiny": dict(n_layer=_TINY.n_layer, n_head=_TINY.n_head, n_embd=_TINY.n_embd,
                 block_size=_TINY.block_size, batch=_TINY.batch_size, slow=1),
    "25M": dict(n_layer=8, n_head=8, n_embd=512, block_size=128, batch=4, slow=2),
}
QUICK_SIZES = {"quick": dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch=2, slow=1)}
NF4_SIDE, QUICK_NF4_SIDE = 4096, 256


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
            for k in range(len(names)):
                name = names[(round_ + k) % len(names)]
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
    """One table row; ratio = ours / theirs, None without a peer's value."""
    return dict(group=group, case=case, ours=ours, peer=peer, theirs=theirs, unit=unit,
                ratio=None if theirs is None else ours / theirs, note=note, **extra)


# ------------------------------------------------------------------------------------- models

def base_model(size: dict, vocab: int) -> GPT:
    return GPT(GPTConfig(vocab_size=vocab, block_size=size["block_size"], n_layer=size["n_layer"],
                         n_head=size["n_head"], n_embd=size["n_embd"]),
               generator=torch.Generator().manual_seed(SEED))


def batch(size: dict, vocab: int, device, rows: int | None = None):
    """Random token ids x and targets y, each (rows or size["batch"], block_size)."""
    g, shape = torch.Generator().manual_seed(SEED), (rows or size["batch"], size["block_size"])
    return tuple(torch.randint(vocab, shape, generator=g).to(device) for _ in range(2))


def options(method: str) -> dict:
    return dict(train.METHOD_DEFAULTS[method], targets=adapters.ALL_LINEAR, dropout=0.0)


def ours(method: str, base: GPT, device) -> torch.nn.Module:
    return train.prepare(method, copy.deepcopy(base), options(method), SEED).to(device)


def peft_model(peft, method: str, base: GPT, device) -> torch.nn.Module:
    """PEFT's adapter on a copy of the same base: same targets, rank, alpha (VeRA: same seed)."""
    opts = options(method)
    if method == "vera":
        config = peft.VeraConfig(r=opts["rank"], target_modules=TARGETS, projection_prng_key=SEED,
                                 d_initial=vera.DEFAULT_D_INITIAL)
    else:
        config = peft.LoraConfig(r=opts["rank"], lora_alpha=opts["alpha"], lora_dropout=0.0,
                                 target_modules=TARGETS, use_dora=method == "dora")
    return peft.get_peft_model(copy.deepcopy(base), config).to(device)


def adamw(model, method: str):
    """torch AdamW(foreach=False) over the trainable parameters: one optimizer for every contender."""
    return train.make_optimizer(model, "adamw", train.METHOD_DEFAULTS[method]["lr"], None)


def train_step(model, optimizer, x, y):
    def step():
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


# ------------------------------------------------------------------------------------- row groups

def bench_nf4(ctx) -> list:
    bnb, side, rows = optional("bitsandbytes.functional"), ctx.nf4_side, []
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(side, side, generator=torch.Generator().manual_seed(SEED)).to(ctx.device, dtype)
        q = nf4.quantize_nf4(w)
        src, dst = torch.randn_like(w), torch.empty_like(w)  # the dequantized output's size and dtype
        calls = {"quantize": lambda: nf4.quantize_nf4(w), "dequantize": lambda: nf4.dequantize_nf4(q),
                 "clone": src.clone, "copy_": lambda: dst.copy_(src)}
        if bnb is not None:
            bnb_args = dict(blocksize=nf4.DEFAULT_BLOCKSIZE, compress_statistics=True, quant_type="nf4")
            packed, state = bnb.quantize_4bit(w, **bnb_args)
            calls["bnb quantize"] = lambda: bnb.quantize_4bit(w, **bnb_args)
            calls["bnb dequantize"] = lambda: bnb.dequantize_4bit(packed, state)
        t = measure(calls, ctx.repeats, ctx.sync)
        shape = f"{str(dtype).removeprefix('torch.')} {side}x{side}"
        rows += [row("nf4", f"quantize {shape}", t["quantize"], "bitsandbytes", t.get("bnb quantize"))]
        rows += [row("nf4", f"dequantize {shape}", t["dequantize"], peer, t.get(key))
                 for peer, key in (("bitsandbytes", "bnb dequantize"), ("copy, new tensor", "clone"),
                                   ("copy_, existing one", "copy_"))]
    return rows


def bench_train(ctx) -> list:
    peft, rows = optional("peft"), []
    for name, size in ctx.sizes.items():
        base, (x, y) = base_model(size, ctx.vocab), batch(size, ctx.vocab, ctx.device)
        models = {m: ours(m, base, ctx.device) for m in METHODS}
        if peft is not None:
            models.update({f"peft {m}": peft_model(peft, m, base, ctx.device) for m in PEFT_METHODS})
        calls = {k: train_step(m, adamw(m, k.split()[-1]), x, y) for k, m in models.items()}
        t = measure(calls, max(1, ctx.repeats // size["slow"]), ctx.sync)
        tokens = f"{base.num_parameters() / 1e6:.2f}M params, {size['batch']}x{size['block_size']} tokens"
        rows.append(row("train", f"{name} full step", t["full"], note=tokens))
        pairs = [(m, f"our {p}", p) for m, p in (("lora", "full"), ("qlora", "lora"), ("vera", "full"),
                                                 ("dora", "lora"))]
        for method, peer, key in pairs + [(m, f"peft {m}", f"peft {m}") for m in PEFT_METHODS]:
            rows.append(row("train", f"{name} {method} step", t[method], peer, t.get(key)))
        del models, calls
    return rows


def bench_infer(ctx) -> list:
    rows = []
    for name, size in ctx.sizes.items():
        base = base_model(size, ctx.vocab)
        adapted = ours("lora", base, ctx.device)
        with torch.no_grad():  # B = 0 at init would leave nothing to merge: give it an update
            for p in (p for p in adapted.parameters() if p.requires_grad):
                p.normal_(0, 0.02, generator=torch.Generator(p.device).manual_seed(SEED))
        models = {"base": base.to(ctx.device), "base copy": copy.deepcopy(base).to(ctx.device),
                  "adapted": adapted, "merged": adapters.merge_adapters(adapted)}
        for model in models.values():
            model.eval()
        for batch_rows in dict.fromkeys((size["batch"], 1)):  # the training batch, one sequence
            x, _ = batch(size, ctx.vocab, ctx.device, batch_rows)
            forward = lambda model: torch.no_grad()(lambda: model(x))
            t = measure({k: forward(m) for k, m in models.items()}, 2 * ctx.repeats, ctx.sync)
            for case in ("base copy", "adapted", "merged"):
                label = "base copy" if case == "base copy" else f"{case} (lora)"
                rows.append(row("infer", f"{name} {label} forward, {batch_rows}x{size['block_size']}",
                                t[case], "base", t["base"], note="noise" if case == "base copy" else ""))
    return rows


def bench_paged(ctx) -> list:
    rows = []
    for name, size in ctx.sizes.items():
        base = base_model(size, ctx.vocab).to(ctx.device)
        state_bytes = 2 * sum(p.numel() * p.element_size() for p in base.parameters())  # m and v
        budgets = {"no budget": None, "half the state": state_bytes // 2, "zero budget": 0}
        optimizers, g = {}, torch.Generator().manual_seed(SEED)
        for label in ("adamw",) + tuple(budgets):
            params = [p.detach().clone().requires_grad_(True) for p in base.parameters()]
            for p in params:
                p.grad = 1e-3 * torch.randn(p.shape, generator=g).to(p.device, p.dtype)
            optimizers[label] = (torch.optim.AdamW(params, lr=1e-3, foreach=False) if label == "adamw"
                                 else PagedAdamW(params, lr=1e-3, device_budget_bytes=budgets[label]))
        t = measure({k: o.step for k, o in optimizers.items()},
                    max(1, 2 * ctx.repeats // size["slow"]), ctx.sync)
        for label in budgets:
            optimizer = optimizers[label]
            steps = int(next(iter(optimizer.state.values()))["step"])
            note = f"{optimizer.stats.page_ins / steps:.0f} page-ins a step" if budgets[label] is not None else ""
            rows.append(row("paged", f"{name} PagedAdamW step, {label}", t[label], "torch AdamW",
                            t["adamw"], note=note))
    return rows


def bench_memory(ctx) -> list:
    rows, cuda = [], ctx.device.type == "cuda"
    for name, size in ctx.sizes.items():
        base, (x, y) = base_model(size, ctx.vocab), batch(size, ctx.vocab, ctx.device)
        full = None
        for method in METHODS:
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(ctx.device)
            model = ours(method, base, ctx.device)
            optimizer = adamw(model, method)
            train_step(model, optimizer, x, y)()
            mem, extra = train.training_memory(model, optimizer), {}
            note = ", ".join(f"{k} {train.human_bytes(mem[k])}" for k in ("weights", "grads", "optimizer"))
            if method == "qlora":
                note += f"; NF4 base {qlora.qlora_memory_report(model)['bits_per_parameter']:.3f} bits/param"
            if cuda:
                extra["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(ctx.device)
                note += f"; CUDA peak {train.human_bytes(extra['cuda_peak_bytes'])}"
            full = mem["total"] if method == "full" else full
            rows.append(row("memory", f"{name} {method} train state", mem["total"],
                            None if method == "full" else "our full", None if method == "full" else full,
                            unit="bytes", note=note, bytes=mem, **extra))
            del model, optimizer
    return rows


def bench_switch(ctx) -> list:
    size = next(iter(ctx.sizes.values()))  # the smallest model: a switch walks the layers
    base, g = base_model(size, ctx.vocab), torch.Generator().manual_seed(SEED)
    models = {"vera": ours("vera", base, ctx.device), "lora": ours("lora", base, ctx.device)}
    saved, file_bytes = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for method, model in models.items():
            paths = [os.path.join(folder, f"{method}-{i}.pt") for i in range(N_ADAPTERS)]
            for path in paths:  # N different adapters
                with torch.no_grad():
                    for p in (p for p in model.parameters() if p.requires_grad):
                        p.copy_(0.01 * torch.randn(p.shape, generator=g))
                train.save_adapter(method, model, path)
            file_bytes[method] = statistics.mean(os.path.getsize(p) for p in paths)
            read = (lambda p: vera.read_vera_adapter(p, ctx.device)) if method == "vera" else \
                (lambda p: torch.load(p, map_location=ctx.device, weights_only=True))
            saved[method] = itertools.cycle([read(p) for p in paths])  # read once, then switch
    switch = {"vera": lambda: vera.use_vera_adapter(models["vera"], next(saved["vera"])),
              "lora": lambda: adapters.load_adapter(models["lora"], next(saved["lora"]))}
    t = measure(switch, N_ADAPTERS * max(ctx.repeats, 5), ctx.sync, warmup=N_ADAPTERS)
    ranks = f"{next(iter(ctx.sizes))} GPT; VeRA r={options('vera')['rank']}, LoRA r={options('lora')['rank']}"
    return [row("switch", f"VeRA adapter switch (N={N_ADAPTERS})", t["vera"], "LoRA load_adapter",
                t["lora"], note=ranks),
            row("switch", "VeRA adapter file", file_bytes["vera"], "LoRA adapter file",
                file_bytes["lora"], unit="bytes", note=ranks)]


BENCHES = dict(nf4=bench_nf4, train=bench_train, infer=bench_infer, paged=bench_paged,
               memory=bench_memory, switch=bench_switch)


# ------------------------------------------------------------------------------------- report

def machine(device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    line = (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")
    if device.type == "cuda":
        line += f", {torch.cuda.get_device_name(device)}"
    peers = [f"{n} {m.__version__}" for n in ("peft", "bitsandbytes") if (m := optional(n))]
    return line + (f"; peers: {', '.join(peers)}" if peers else "; no peer library installed")


def format_table(rows: list) -> str:
    fmt = lambda v, unit: "-" if v is None else train.human_bytes(v) if unit == "bytes" else f"{v:.2f} ms"
    header = ["group", "case", "ours", "peer", "peer's", "ours/peer", "note"]
    lines = [[r["group"], r["case"], fmt(r["ours"], r["unit"]), r["peer"] or "-",
              fmt(r["theirs"], r["unit"]), "-" if r["ratio"] is None else f"{r['ratio']:.2f}",
              r["note"]] for r in rows]
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) if i in (2, 4, 5) else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(l) for l in lines])


def write_json(path: str, payload: dict) -> None:
    """Write atomically: a temporary file beside `path`, then os.replace."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


class Context:
    """What every row group reads: device, sync, sizes, repeats, vocabulary size."""

    def __init__(self, args):
        self.device = torch.device("cuda" if args.device == "cuda" or
                                   (args.device == "auto" and torch.cuda.is_available()) else "cpu")
        self.sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        self.sizes = QUICK_SIZES if args.quick else SIZES
        self.nf4_side = QUICK_NF4_SIDE if args.quick else NF4_SIDE
        self.repeats = args.repeats
        self.vocab = len(train.build_vocab(train.pretraining_text()))  # train.py's vocabulary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", default=",".join(GROUPS), help="comma-separated row groups to run")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to run; auto takes CUDA when available")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per contender (half for 25M)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads first (default: torch's own choice)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the bench")
    p.add_argument("--json", default=None, help="also write the machine and the rows to this file")
    return p.parse_args(argv)


def main(argv=None) -> list:
    args = parse_args(argv)
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    if not groups or any(g not in GROUPS for g in groups):
        raise SystemExit(f"--only takes some of {', '.join(GROUPS)}; got {args.only!r}")
    if args.repeats < 1 or (args.threads is not None and args.threads < 1):
        raise SystemExit("--repeats and --threads must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    ctx, load_before, t0 = Context(args), os.getloadavg()[0], time.perf_counter()
    rows = []
    for group in groups:
        print(f"bench: {group} ...", file=sys.stderr, flush=True)
        rows += BENCHES[group](ctx)
    seconds, info = time.perf_counter() - t0, machine(ctx.device)
    load = f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    print(f"machine: {info}\ndevice: {ctx.device}; {seconds:.0f} s; 1-minute load average {load}\n")
    print(format_table(rows))
    print("\nours/peer = our median / the peer's median in the same run: < 1, ours is faster (smaller)")
    if args.json:
        write_json(args.json, dict(machine=info, device=str(ctx.device), load_average=load,
                                   seconds=seconds, argv=sys.argv[1:] if argv is None else list(argv),
                                   rows=rows))
    return rows


if __name__ == "__main__":
    main()
