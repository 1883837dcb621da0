"""Pretrain the tiny GPT, fine-tune it with every method, compare them in one table, show samples.

    python train.py                    # pretrain (or reuse the cache), fine-tune with every method
    python train.py --method lora --rank 4 --alpha 8
    python train.py --quick            # a tiny model and a few steps (used by the tests)

The texts (they ship with Python: nothing is downloaded), their tokens, and the run folder `--out`
that this file fills are training/runs.py's; sample.py draws text from a finished run. This file
reads top to bottom: config, batches, methods, optimizer, loop, report, main.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch

import adapters
import dora
import lora
import nf4
import qlora
import vera
from checks import check_int, check_number, check_probability
from formats import safe_open, safetensors_io
from paged_optim import PagedAdamW
from sample import print_samples
from tiny_gpt import GPT, GPTConfig
from training import distributed, locks, memory
from training.flags import Parser, checked, writable_folder
from training.runs import (
    Corpus,
    CorruptFile,
    OtherRun,
    build_vocab,
    finetuning_text,
    make_corpus,
    occupied,
    pretraining_text,
    read_checkpoint,
    record,
    save_checkpoint,
    save_weights,
    set_aside,
    weights_fingerprint,
    weights_name,
)

# ------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TrainConfig:
    n_layer: int = 4              # transformer blocks of the base model
    n_head: int = 4               # attention heads
    n_embd: int = 128             # model width
    block_size: int = 64          # context length, tokens
    batch_size: int = 32          # sequences per step
    pretrain_steps: int = 700     # AdamW steps on the pretraining text
    pretrain_lr: float = 3e-3     # peak learning rate of pretraining (warm-up, then cosine decay)
    finetune_steps: int = 150     # steps of each fine-tuning method
    warmup_steps: int = 30        # linear warm-up of the learning rate, pretraining only
    eval_batches: int = 8         # fixed validation batches (of batch_size windows) per estimate
    checkpoint_every: int = 100   # steps between checkpoints while training
    seed: int = 1337              # seeds weights, batches, dropout and adapters


# Small enough for the test-suite: seconds, not minutes.
QUICK = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=8, pretrain_steps=30,
             finetune_steps=10, warmup_steps=5, eval_batches=2, checkpoint_every=10)

# Each method's options with their defaults: a flag a method has overrides its default, a flag it
# lacks is an error; --alpha defaults to 2r when --rank is given. Learning rates were chosen on the
# default model by a small sweep (docs, "Choosing the hyperparameters").
LOW_RANK = dict(rank=8, alpha=16.0, rslora=False, dropout=0.0, targets=adapters.ALL_LINEAR)
METHOD_DEFAULTS = {"full": dict(lr=1e-3), "lora": dict(lr=6e-3, **LOW_RANK),
                   "qlora": dict(lr=6e-3, **LOW_RANK), "dora": dict(lr=6e-3, **LOW_RANK),
                   # VeRA: r = C/2 at the default width, 12x fewer parameters than LoRA r=8
                   "vera": dict(lr=1e-1, rank=64, dropout=0.0, targets=adapters.ALL_LINEAR)}
METHODS = tuple(METHOD_DEFAULTS)
# QLoRA's base: NF4 with double quantization (QLoRA sec. 3); the tiny GPT computes in float32.
QUANTIZATION = dict(blocksize=nf4.DEFAULT_BLOCKSIZE, double_quant=True, compute_dtype="float32")
SEED_MAX = 2**63 - 1  # torch.manual_seed takes < 2**64, and the run adds small offsets to the seed

# ------------------------------------------------------------------------------------------ batches


def get_batch(data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator):
    """Random windows: x = data[i : i+T], y = data[i+1 : i+T+1], each (batch_size, T)."""
    starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)  # (B,)
    offsets = torch.arange(block_size)  # (T,)
    x = data[starts[:, None] + offsets]  # (B, T)
    y = data[starts[:, None] + offsets + 1]  # (B, T)
    return x, y


def eval_windows(data: torch.Tensor, batches: int, batch_size: int, block_size: int):
    """Fixed, evenly spaced validation windows: the same for every model and method."""
    count = batches * batch_size
    starts = torch.linspace(0, len(data) - block_size - 1, count).long()  # (count,)
    offsets = torch.arange(block_size)
    x = data[starts[:, None] + offsets]  # (count, T)
    y = data[starts[:, None] + offsets + 1]
    return list(zip(x.split(batch_size), y.split(batch_size)))


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, windows, device) -> float:
    """Mean cross-entropy over fixed windows, in eval mode (no dropout), then back to train mode."""
    was_training = model.training
    model.eval()
    losses = [model(x.to(device), y.to(device))[1].item() for x, y in windows]
    model.train(was_training)
    return sum(losses) / len(losses)


# ------------------------------------------------------------------------------------------ methods

def build_model(cfg: TrainConfig, vocab_size: int, device) -> GPT:
    config = GPTConfig(vocab_size=vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                       n_head=cfg.n_head, n_embd=cfg.n_embd)
    return GPT(config, generator=torch.Generator().manual_seed(cfg.seed)).to(device)


def prepare(method: str, base: GPT, opts: dict, seed: int) -> torch.nn.Module:
    """Turn the base model into the model the method trains, in place (the caller passes a copy)."""
    if method == "full":
        return base.requires_grad_(True)
    low_rank = dict(r=opts["rank"], alpha=opts.get("alpha"), dropout=opts["dropout"],
                    rslora=opts.get("rslora", False), seed=seed)
    if method == "lora":
        return lora.apply_lora(base, opts["targets"], **low_rank)
    if method == "dora":
        return dora.apply_dora(base, opts["targets"], **low_rank)
    if method == "vera":
        return vera.apply_vera(base, opts["targets"], opts["rank"], seed,
                               opts.get("d_initial", vera.DEFAULT_D_INITIAL), opts["dropout"])
    if method == "qlora":
        quant = opts.get("quantization", QUANTIZATION)
        qlora.quantize_model(base, opts["targets"], quant["blocksize"], quant["double_quant"],
                             getattr(torch, quant["compute_dtype"]))
        return lora.apply_lora(base, opts["targets"], **low_rank)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


# ---------------------------------------------------------------------------------------- optimizer

def make_optimizer(model: torch.nn.Module, kind: str, lr: float, budget: int | None):
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=False)
    if kind == "paged_adamw":
        return PagedAdamW(params, lr=lr, weight_decay=0.0, device_budget_bytes=budget)
    raise ValueError(f"optimizer must be 'adamw' or 'paged_adamw', got {kind!r}")


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak` over `warmup` steps, then cosine decay to peak/10 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def training_memory(model: torch.nn.Module, optimizer) -> dict:
    """Bytes of weights (parameters and buffers), gradients and optimizer state (the tensors')."""
    def tensor_bytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)
    weights = tensor_bytes(list(model.parameters()) + list(model.buffers()))
    grads = tensor_bytes(p.grad for p in model.parameters())
    state = memory.optimizer_state_bytes(optimizer)  # counts PagedAdamW's pages where they lie
    return dict(weights=weights, grads=grads, optimizer=state, total=weights + grads + state)


# ------------------------------------------------------------------------------------------- loop

class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the run stops, and its weights are not saved."""


def check_finite(model, loss: torch.Tensor, label: str, step: int, lr: float) -> None:
    grads = (p.grad for p in model.parameters() if p.grad is not None)
    what = "loss" if not torch.isfinite(loss) else None
    what = what or next(("gradient" for g in grads if not bool(torch.isfinite(g).all())), None)
    if what:
        raise TrainingDiverged(f"{label}: the {what} is not finite at step {step} (learning rate "
                               f"{lr:g}): the learning rate is likely too high; try a smaller --lr")


def train_loop(model, optimizer, data: torch.Tensor, cfg: TrainConfig, steps: int, peak_lr: float,
               warmup: int, checkpoint: str, identity: dict, resume: bool, device, label: str,
               callback=None, world: distributed.World | None = None, batch_size_at=None):
    """AdamW steps on random batches, checkpointing atomically every `cfg.checkpoint_every` steps.

    A checkpoint holds the model, the optimizer, the step and every random state the run draws
    from (the batch generator; torch's global one, behind dropout), so a resumed run reaches the
    same weights bit for bit; to resume, its `identity` (method, options, configs) must match.
    `callback(step)` runs after each step (tests crash there); `batch_size_at(step)`, if given,
    is the batch size of each step (default cfg.batch_size; the paged-spike experiment's spikes).
    Returns ms/step (median) or None.
    Under torchrun (`world`), each rank trains on its share of every batch through DDP, draws its
    own dropout, and rank 0 alone writes the checkpoint, which holds every rank's random state.
    """
    world = world or distributed.World()
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    # dropout: the same draws whatever ran before this loop; each rank its own
    torch.manual_seed(cfg.seed + 2 + world.rank)
    start = 0
    if resume and os.path.exists(checkpoint):
        ckpt = read_checkpoint(checkpoint, identity)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        generator.set_state(ckpt["random"]["batches"])
        ranks = ckpt["random"].get("ranks")  # written under torchrun, with as many ranks
        mine = ranks[world.rank] if ranks and len(ranks) == world.size else ckpt["random"]
        torch.set_rng_state(mine["torch"])
        torch.cuda.set_rng_state_all(mine["cuda"])  # [] without CUDA: nothing to do
        start = ckpt["step"]
    model.train()
    forward = distributed.wrap(model, world, label) if world.launched else model
    times, t_start = [], time.perf_counter()
    for step in range(start, steps):
        t0 = time.perf_counter()
        lr = lr_at(step, steps, peak_lr, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch_size = cfg.batch_size if batch_size_at is None else batch_size_at(step)
        x, y = distributed.shard(*get_batch(data, batch_size, cfg.block_size, generator), world)
        _, loss = forward(x.to(device), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        check_finite(model, loss, label, step + 1, lr)
        optimizer.step()
        times.append(time.perf_counter() - t0)
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == steps:
            cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
            random = dict(batches=generator.get_state(), torch=torch.get_rng_state(), cuda=cuda)
            if world.launched:
                random["ranks"] = distributed.gather_random_states(world)
            if world.is_main:
                save_checkpoint(dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                                     identity=identity, random=random, step=done), checkpoint)
        progress(label, done, steps, loss.item(), cfg, time.perf_counter() - t_start, done - start)
        if callback is not None:
            callback(done)
    return 1000 * statistics.median(times[min(3, len(times) - 1):]) if times else None


def progress(label, done, steps, loss, cfg, elapsed, steps_here):
    """A line on stderr: rewritten in place on a terminal, else at every fifth of the run."""
    tokens_per_s = steps_here * cfg.batch_size * cfg.block_size / max(elapsed, 1e-9)
    left = elapsed / max(steps_here, 1) * (steps - done)
    line = (f"{label:>10} step {done:>4}/{steps}  loss {loss:.3f}  "
            f"{tokens_per_s / 1e3:6.1f}k tok/s  {left:5.1f}s left")
    if sys.stderr.isatty():
        print("\r" + line, end="\n" if done == steps else "", file=sys.stderr, flush=True)
    elif done == steps or done % max(1, steps // 5) == 0:
        print(line, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- report

def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):  # binary units: each is 1024 of the one before
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


# (header, cell(row) -> text, alignment '<' or '>'): the columns of the table train.py prints.
RESULT_COLUMNS = (
    ("method", lambda r: r["method"], "<"),
    ("trainable", lambda r: f"{r['trainable']:,}", ">"),
    ("% of model", lambda r: f"{100 * r['trainable_fraction']:.2f}%", ">"),
    ("adapter file", lambda r: human_bytes(r["adapter_bytes"]), ">"),
    ("weights", lambda r: human_bytes(r["memory"]["weights"]), ">"),
    ("all-reduce/step", lambda r: "-" if r["allreduce_bytes"] is None
     else human_bytes(r["allreduce_bytes"]), ">"),
    ("train memory", lambda r: human_bytes(r["memory"]["total"]), ">"),
    ("ms/step", lambda r: "-" if r["ms_per_step"] is None else f"{r['ms_per_step']:.1f}", ">"),
    ("val before", lambda r: f"{r['val_before']:.3f}", ">"),
    ("val after", lambda r: f"{r['val_after']:.3f}", ">"),
)


def format_table(rows: list[dict], columns=RESULT_COLUMNS) -> str:
    """An aligned text table, a line per row; `columns` holds (header, cell, alignment) triples."""
    cells = [[cell(row) for _, cell, _ in columns] for row in rows]
    widths = [max([len(header)] + [len(line[i]) for line in cells])
              for i, (header, _, _) in enumerate(columns)]

    def line(texts):
        return "  ".join(f"{text:{align}{width}}" for text, (_, _, align), width
                         in zip(texts, columns, widths)).rstrip()
    return "\n".join([line([h for h, _, _ in columns]), line(["-" * w for w in widths])]
                     + [line(texts) for texts in cells])


def print_report(rows: list[dict], note: str, models: list, vocab: str, out: str) -> None:
    """The table, what QLoRA's NF4 and paging did, and a sample from each model (base first)."""
    print(f"{format_table(rows)}\n\n{note}")
    for row in (row for row in rows if "nf4" in row):
        nf4_bytes, dense = row["nf4"]["bytes"], row["nf4"]["float32_bytes"]
        print(f"{row['method']}: the quantized linears take {nf4_bytes:,} bytes "
              f"({row['nf4']['bits_per_parameter']:.3f} bits a weight), "
              f"{100 * nf4_bytes / dense:.1f}% of their {dense:,} bytes in float32")
    for row in (row for row in rows if "paging" in row):
        print(f"{row['method']} paging:", ", ".join(f"{k} {v:,}" for k, v in row["paging"].items()))
    for row in (row for row in rows if "distributed" in row):  # under torchrun only
        ddp = row["distributed"]
        print(f"{row['method']} data parallel: {ddp['world_size']} ranks, {ddp['buckets']} "
              f"buckets all-reduced a step; buffers {ddp['buffer_bytes']:,} bytes, "
              f"{'broadcast before' if ddp['broadcast_buffers'] else 'not sent at'} each step; "
              f"DDP's pre-forward {ddp['pre_forward_ms'] or 0:.2f} ms (median)")
    print_samples(dict(zip(["base"] + [row["method"] for row in rows], models)), vocab, out)


# --------------------------------------------------------------------------------------------- main

def pretrain(cfg: TrainConfig, corpus: Corpus, out: str, device,
             world: distributed.World | None = None) -> tuple[GPT, dict]:
    """Pretrain the base model, or reuse a finished checkpoint of the same config and data (its
    name is a hash of both); an unfinished one continues, a corrupt one is set aside."""
    model = build_model(cfg, len(corpus.vocab), device)
    identity = dict(method="pretrain", data=corpus.fingerprint, model_config=model.config.to_dict(),
                    train_config=asdict(replace(cfg, finetune_steps=0)))
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    path, ckpt, corrupt = os.path.join(out, f"base-{key}.pt"), None, None
    world = world or distributed.World()
    # under torchrun rank 0 arrives holding the folder's base lock: no rank reads the cache while
    # another run into the same folder is still writing it
    distributed.barrier(world)
    try:
        ckpt = read_checkpoint(path) if os.path.exists(path) else None
    except CorruptFile as error:  # a cache is never trusted blindly: set it aside, pretrain again
        corrupt = error
    distributed.barrier(world)  # every rank has read the cache before rank 0 moves it
    if corrupt is not None and world.is_main:
        set_aside(path, corrupt)
    if ckpt is not None and ckpt["step"] == cfg.pretrain_steps:
        model.load_state_dict(ckpt["model"])
        print(f"reusing the pretrained base model {path}", file=sys.stderr)
    else:
        optimizer = make_optimizer(model, "adamw", cfg.pretrain_lr, None)
        train_loop(model, optimizer, corpus.train, cfg, cfg.pretrain_steps, cfg.pretrain_lr,
                   cfg.warmup_steps, path, identity, True, device, "pretrain", world=world)
    return model, dict(checkpoint=os.path.basename(path), fingerprint=weights_fingerprint(model),
                       vocab=corpus.vocab, model_config=model.config.to_dict())


def finetune(method: str, cfg: TrainConfig, base: GPT, base_info: dict, corpus: Corpus, windows,
             opts: dict, out: str, device, resume: bool, callback=None,
             world: distributed.World | None = None):
    """Fine-tune a copy of `base` with one method and write its weights (rank 0); returns (row,
    model). The row's allreduce_bytes: under torchrun, what DDP all-reduced at the last step;
    under plain python, what one backward through DDP would all-reduce (one batch, a copy)."""
    world = world or distributed.World()
    model = prepare(method, copy.deepcopy(base), opts, cfg.seed)
    # After prepare: a fresh adapter equals the base, but QLoRA's base is already the 4-bit one.
    val_before = estimate_loss(model, windows, device)
    optimizer = make_optimizer(model, opts["optimizer"], opts["lr"], opts["budget"])
    identity = dict(method=method, options=opts, train_config=asdict(cfg),
                    base=base_info["fingerprint"])
    ms = train_loop(model, optimizer, corpus.train, cfg, cfg.finetune_steps, opts["lr"], 0,
                    os.path.join(out, f"finetune-{method}.pt"), identity, resume, device, method,
                    callback, world=world)
    check_finite(model, torch.tensor(val_after := estimate_loss(model, windows, device)),
                 f"{method} validation", cfg.finetune_steps, opts["lr"])  # the last update's
    trainable = adapters.count_trainable(model)
    weights = os.path.join(out, weights_name(method))
    if world.launched:
        traffic = world.traffic[method]
        allreduce = traffic.per_step[-1] if traffic.per_step else None  # None: no step left
    else:
        x, y = get_batch(corpus.train, cfg.batch_size, cfg.block_size,
                         torch.Generator().manual_seed(cfg.seed))
        allreduce = distributed.allreduce_bytes(model, x.to(device), y.to(device))
    row = dict(method=method, trainable=trainable,
               trainable_fraction=trainable / base.num_parameters(),
               adapter_bytes=save_weights(method, model, weights) if world.is_main else None,
               memory=training_memory(model, optimizer), allreduce_bytes=allreduce,
               ms_per_step=ms, val_before=val_before, val_after=val_after)
    if world.launched:
        row["distributed"] = dict(world_size=world.size, buckets=traffic.buckets,
                                  broadcast_buffers=traffic.broadcast_buffers,
                                  buffer_bytes=traffic.buffer_bytes, pre_forward_ms=(
                                      1000 * statistics.median(traffic.pre_forward)
                                      if traffic.pre_forward else None))
    if method == "qlora":
        report = memory.qlora_memory_report(model, optimizer)
        row["nf4"] = dict(bytes=report["nf4_weights"] + report["nf4_statistics"],
                          bits_per_parameter=report["bits_per_parameter"], float32_bytes=(
                              memory.dense_weight_bytes(model, torch.float32)["quantized_layers"]))
    if isinstance(optimizer, PagedAdamW):
        row["paging"] = asdict(optimizer.stats)
    return row, model


def build_parser() -> Parser:
    p = Parser(prog="train.py", description=__doc__.split("\n")[0])
    positive = checked(check_number, float, low=0, low_open=True, high=1e30)  # as PagedAdamW
    count = checked(check_int, low=1)
    add = p.add_argument
    add("--method", default="all", help=f"'all' or some of {','.join(METHODS)}")
    add("--steps", type=count, help="fine-tuning steps per method")
    add("--pretrain-steps", type=count, help="pretraining steps")
    add("--seed", type=checked(check_int, low=0, high=SEED_MAX), help="seeds every random draw")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA if present")
    add("--out", type=writable_folder, default="runs", help="the run folder (default runs)")
    add("--quick", action="store_true", help="a tiny model and a few steps (tests)")
    add("--resume", action="store_true", help="continue fine-tuning from its checkpoints")
    add("--lr", type=positive, help="fine-tuning learning rate (method default)")
    add("--rank", type=count, help="adapter rank r (method default)")
    add("--alpha", type=positive, help="LoRA/DoRA/QLoRA alpha (default 2r)")
    add("--rslora", action="store_true", default=None, help="scale by alpha/sqrt(r), not alpha/r")
    add("--dropout", type=checked(check_probability, float), help="on adapter inputs (default 0)")
    add("--targets", type=lambda text: text if text == adapters.ALL_LINEAR else tuple(
        name.strip() for name in text.split(",")), help="'all-linear' or e.g. q_proj,v_proj")
    add("--optimizer", choices=("adamw", "paged_adamw"), help="default: paged_adamw for qlora")
    add("--budget", type=checked(check_int, low=0), help="PagedAdamW's device bytes (no limit)")
    add("--broadcast-buffers", action="store_true",
        help="under torchrun: let DDP broadcast the buffers each step (to measure the cost)")
    return p


def method_options(method: str, args) -> dict:
    """Everything the method trains with: its defaults, overridden by the flags given."""
    opts = dict(METHOD_DEFAULTS[method], budget=None,
                optimizer="paged_adamw" if method == "qlora" else "adamw")
    opts.update({k: getattr(args, k) for k in opts if getattr(args, k) is not None})
    if args.rank is not None and args.alpha is None and "alpha" in opts:
        opts["alpha"] = 2.0 * args.rank
    return dict(opts, quantization=dict(QUANTIZATION)) if method == "qlora" else opts


def check_options(parser: Parser, args, vocab_size: int, cfg: TrainConfig) -> dict:
    """Each chosen method's options, or one line: an unknown method, a flag a chosen method lacks,
    a value it refuses (a rank too large for the model, a target that is no linear...)."""
    args.method = METHODS if args.method == "all" else tuple(args.method.split(","))
    if not set(args.method) <= set(METHODS) or len(set(args.method)) < len(args.method):
        parser.error(f"argument --method: must be 'all' or a comma-separated list of "
                     f"{', '.join(METHODS)}, each once")
    for flag in LOW_RANK:
        without = [m for m in args.method if flag not in METHOD_DEFAULTS[m]]
        if getattr(args, flag) is not None and without:
            parser.error(f"argument --{flag}: not an option of {', '.join(without)} (only of "
                         f"{', '.join(m for m in METHODS if flag in METHOD_DEFAULTS[m])})")
    options = {method: method_options(method, args) for method in args.method}
    unpaged = [m for m, opts in options.items() if opts["optimizer"] != "paged_adamw"]
    if args.budget is not None and unpaged:
        parser.error(f"argument --budget: {', '.join(unpaged)} would train with adamw, which has "
                     f"no budget (pass --optimizer paged_adamw)")
    for method, opts in options.items():
        try:
            prepare(method, build_model(cfg, vocab_size, "cpu"), opts, cfg.seed)
        except (ValueError, TypeError) as error:
            parser.error(f"the options of --method {method}: {error}")
    return options


def main(argv=None) -> list[dict]:
    args = (parser := build_parser()).parse_args(argv)
    given = dict(finetune_steps=args.steps, pretrain_steps=args.pretrain_steps, seed=args.seed)
    cfg = replace(TrainConfig(**QUICK) if args.quick else TrainConfig(),
                  **{k: v for k, v in given.items() if v is not None})
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: CUDA is not available on this machine")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if args.broadcast_buffers and not distributed.launched():
        parser.error("argument --broadcast-buffers: only under torchrun")
    # under torchrun: join the other ranks; only rank 0 prints and writes from here on
    world, device = distributed.start(device, args.broadcast_buffers)
    distributed.quiet(world)
    try:
        distributed.check_batch(cfg.batch_size, world)
    except ValueError as error:
        parser.error(f"torchrun --nproc_per_node: {error}")
    vocab = build_vocab(pre_text := pretraining_text())
    options = check_options(parser, args, len(vocab), cfg)
    if in_the_way := occupied(args.out, options):
        parser.error(f"argument --out: {in_the_way} is in the way of what train.py writes there")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as error:  # a name too long, /proc, a read-only file system
        parser.error(f"argument --out: cannot make {error.filename or args.out}: "
                     f"{error.strerror or error}")
    # RunBusy: another run trains one of them here; under torchrun rank 0 holds them for all
    held = locks.MethodLocks(args.out, options) if world.is_main else None
    try:
        return train_methods(args, cfg, device, world, vocab, pre_text, options)
    finally:
        if held is not None:
            held.release()


def train_methods(args, cfg: TrainConfig, device, world, vocab: str, pre_text: str,
                  options: dict) -> list[dict]:
    """What main does once the flags are checked and the methods' locks are held."""
    for where in [args.out] + [os.path.join(args.out, weights_name(m)) for m in METHODS]:
        for path in safetensors_io.remove_stale_temporaries(where, root=args.out) \
                if world.is_main else ():
            print(f"removed {path}, left by an interrupted save", file=sys.stderr)
    distributed.barrier(world)  # no rank reads the folder while rank 0 tidies it
    pre, fine = make_corpus(pre_text, vocab), make_corpus(finetuning_text(), vocab)
    print(f"pretraining text: {len(pre_text):,} characters, vocabulary {len(vocab)} (with UNK); "
          f"fine-tuning text: {len(fine.train) + len(fine.val):,} characters, {fine.unknown} "
          f"mapped to UNK; device {device}", file=sys.stderr)

    t0 = time.perf_counter()
    # a second run into this folder waits, then reuses the cache; under torchrun rank 0 alone
    # writes the base, so it alone takes the folder's locks
    with locks.shared_file_lock(args.out, "base") if world.is_main else contextlib.nullcontext():
        base, base_info = pretrain(cfg, pre, args.out, device, world)
    if world.is_main:
        record(args.out, "base", dict(weights=None, seed=cfg.seed, base=base_info))
    pre_windows = eval_windows(pre.val, cfg.eval_batches, cfg.batch_size, cfg.block_size)
    print(f"base model: {base.num_parameters():,} parameters, pretraining val loss "
          f"{estimate_loss(base, pre_windows, device):.3f}", file=sys.stderr)
    windows = eval_windows(fine.val, cfg.eval_batches, cfg.batch_size, cfg.block_size)
    rows, models = [], [base]
    for method, opts in options.items():
        try:
            row, model = finetune(method, cfg, base, base_info, fine, windows, opts, args.out,
                                  device, args.resume, world=world)
        except (TrainingDiverged, CorruptFile, OtherRun) as error:
            hint = "its weights were not saved" if isinstance(error, TrainingDiverged) else \
                f"delete it, or run without --resume to start {method} over"
            print(f"train.py: {error}; {hint}", file=sys.stderr)
            raise SystemExit(1) from None
        if world.is_main:
            record(args.out, method, dict(weights=weights_name(method), seed=cfg.seed,
                                          options=opts, base=base_info), row, METHODS)
        rows.append(row)
        models.append(model)
    note = (f"{time.perf_counter() - t0:.0f} s in all; fine-tuning {cfg.finetune_steps} steps of "
            f"{cfg.batch_size}x{cfg.block_size} tokens per method; val = cross-entropy (nats/char) "
            f"on held-out fine-tuning text")
    if world.is_main:
        print_report(rows, note, models, vocab, args.out)
    distributed.finish(world)
    return rows


def cli(argv=None) -> int:
    """main as a command: every failure of a file or folder is one line, Ctrl-C says how to go
    on; returns the exit status (130 after Ctrl-C, as a shell reports SIGINT)."""
    try:
        main(argv)
    except KeyboardInterrupt:
        print("train.py: interrupted; resume with --resume (the same flags and --resume continue "
              "from the last checkpoint)", file=sys.stderr)
        return 130
    except OSError as error:  # a full disk, a file size limit, a read-only or vanished folder
        where = f" {error.filename}" if error.filename else ""
        print(f"train.py: cannot read or write{where}: {error.strerror or error}",
              file=sys.stderr)
        return 1
    except (safe_open.NotRegularFile, CorruptFile, OtherRun, locks.RunBusy,
            locks.RunFolderGone) as error:
        print(f"train.py: {str(error).splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
