"""Pretrain the tiny GPT, fine-tune it with every method, and compare them in one table.

    python train.py                       # the main job: pretrain (or reuse the cache), then every method
    python train.py --method lora --rank 4 --alpha 8
    python train.py --quick               # a tiny model and a few steps (used by the tests)

Data ships with Python itself, so nothing is downloaded:
- pretraining text: the documentation topics of the standard library's `pydoc_data.topics`
  (the text behind `help("if")`, `help("with")`, ...): English prose about Python;
- fine-tuning text: the source code of a fixed list of pure-Python standard-library modules
  (`FINETUNE_MODULES`): a different domain (code) with the same characters mostly.
Both are split deterministically by position: the first 90% trains, the last 10% validates.

Tokens are characters. The vocabulary is the sorted set of characters in the pretraining text plus one
unknown token `UNK` (id 0). A fine-tuning character that pretraining never saw (a few non-ASCII
letters in docstrings) maps to `UNK` rather than growing the vocabulary, because fine-tuning methods
that freeze the embedding could never learn a new row; how many were mapped is printed.

The file reads top to bottom: config, data, model, methods, optimizer, loop, report.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
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
from paged_optim import PagedAdamW
from tiny_gpt import GPT, GPTConfig

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
    seed: int = 1337              # seeds weights, batches and adapters

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd)


# Small enough for the test-suite: seconds, not minutes.
QUICK = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=8, pretrain_steps=30,
             finetune_steps=10, warmup_steps=5, eval_batches=2, checkpoint_every=10)

# Each method's own defaults; flags override them. Learning rates were chosen on the default model
# by a small sweep (README, "Choosing the hyperparameters").
METHOD_DEFAULTS = {
    "full": dict(lr=1e-3),
    "lora": dict(lr=6e-3, rank=8, alpha=16.0),
    "qlora": dict(lr=6e-3, rank=8, alpha=16.0),
    "dora": dict(lr=6e-3, rank=8, alpha=16.0),
    "vera": dict(lr=1e-1, rank=64),     # C/2 at the default width: 12x fewer parameters than LoRA r=8
}
METHODS = tuple(METHOD_DEFAULTS)

# --------------------------------------------------------------------------------------------- data

FINETUNE_MODULES = ("textwrap", "heapq", "bisect", "fnmatch", "colorsys", "queue", "calendar",
                    "string", "glob", "sched", "graphlib", "contextlib", "functools", "fractions",
                    "statistics", "pprint")
UNK = "\x00"      # the unknown character; id 0
VAL_FRACTION = 0.1


def pretraining_text() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[key] for key in sorted(topics))


def finetuning_text() -> str:
    parts = []
    for name in FINETUNE_MODULES:
        with open(importlib.util.find_spec(name).origin, encoding="utf-8") as f:
            parts.append(f"# ---- {name}.py\n{f.read()}")
    return "\n".join(parts)


@dataclass
class Corpus:
    vocab: str                    # id -> character; vocab[0] is UNK
    train: torch.Tensor           # (N_train,) token ids
    val: torch.Tensor             # (N_val,) token ids
    unknown: int                  # characters mapped to UNK

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(self.vocab.encode())
        h.update(self.train.numpy().tobytes())
        h.update(self.val.numpy().tobytes())
        return h.hexdigest()[:16]


def build_vocab(text: str) -> str:
    return UNK + "".join(sorted(set(text) - {UNK}))


def encode(text: str, vocab: str) -> tuple[torch.Tensor, int]:
    """Character ids; characters outside `vocab` become UNK (id 0). Returns (ids, how many)."""
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = [index.get(ch, 0) for ch in text]
    unknown = sum(1 for ch in text if ch not in index)
    return torch.tensor(ids, dtype=torch.long), unknown


def make_corpus(text: str, vocab: str) -> Corpus:
    ids, unknown = encode(text, vocab)
    n_train = int(len(ids) * (1 - VAL_FRACTION))
    return Corpus(vocab, ids[:n_train], ids[n_train:], unknown)


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


# -------------------------------------------------------------------------------------------- model

def build_model(cfg: TrainConfig, vocab_size: int, device) -> GPT:
    return GPT(cfg.model_config(vocab_size), generator=torch.Generator().manual_seed(cfg.seed)).to(device)


def load_checkpoint(path: str, model: torch.nn.Module | None = None) -> dict:
    """torch.load(weights_only=True); with a model, check the config and load the weights."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if model is not None:
        if ckpt.get("model_config") != model.config.to_dict():
            raise ValueError(f"checkpoint {path} was made for model config {ckpt.get('model_config')}, "
                             f"not {model.config.to_dict()}")
        model.load_state_dict(ckpt["model"])
    return ckpt


# ------------------------------------------------------------------------------------------ methods

def prepare(method: str, base: GPT, opts: dict, seed: int) -> torch.nn.Module:
    """Turn the base model into the model the method trains, in place (the caller loaded a fresh copy)."""
    if method == "full":
        base.requires_grad_(True)
        return base
    if method == "lora":
        return lora.apply_lora(base, opts["targets"], r=opts["rank"], alpha=opts["alpha"],
                               dropout=opts["dropout"], seed=seed)
    if method == "dora":
        return dora.apply_dora(base, opts["targets"], r=opts["rank"], alpha=opts["alpha"],
                               dropout=opts["dropout"], seed=seed)
    if method == "vera":
        return vera.apply_vera(base, opts["targets"], r=opts["rank"], seed=seed)
    if method == "qlora":
        qlora.quantize_model(base, opts["targets"], compute_dtype=torch.float32)
        return lora.apply_lora(base, opts["targets"], r=opts["rank"], alpha=opts["alpha"],
                               dropout=opts["dropout"], seed=seed)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def save_adapter(method: str, model: torch.nn.Module, path: str) -> int:
    """Write the method's own small file (the whole model for `full`); return its size in bytes."""
    if method == "full":
        adapters.atomic_save(model.state_dict(), path)
    elif method == "vera":
        vera.save_vera_adapter(model, path)
    else:
        adapters.atomic_save(adapters.adapter_state_dict(model), path)
    return os.path.getsize(path)


# ---------------------------------------------------------------------------------------- optimizer

def make_optimizer(model: torch.nn.Module, kind: str, lr: float, budget: int | None):
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=False)
    if kind == "paged_adamw":
        return PagedAdamW(params, lr=lr, weight_decay=0.0, device_budget_bytes=budget)
    raise ValueError(f"optimizer must be 'adamw' or 'paged_adamw', got {kind!r}")


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak` over `warmup` steps, then cosine decay to a tenth of it by `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def training_memory(model: torch.nn.Module, optimizer) -> dict:
    """Bytes of weights (parameters and buffers), gradients and optimizer state, from the tensors."""
    weights = tensor_bytes(list(model.parameters()) + list(model.buffers()))
    grads = tensor_bytes(p.grad for p in model.parameters())
    state = qlora.optimizer_state_bytes(optimizer)  # counts PagedAdamW's pages where they lie
    return dict(weights=weights, grads=grads, optimizer=state, total=weights + grads + state)


# ------------------------------------------------------------------------------------------- loop

def train_loop(model, optimizer, data: torch.Tensor, cfg: TrainConfig, steps: int, peak_lr: float,
               warmup: int, checkpoint: str, label: str, resume: bool, device, callback=None):
    """AdamW steps on random batches, checkpointing atomically every `cfg.checkpoint_every` steps.

    The checkpoint holds the model, the optimizer, the batch generator's state and the step, so a
    resumed run draws the same batches and reaches the same weights bit for bit. `callback(step)`
    runs after each step (the tests use it to simulate a crash). Returns ms per step (median).
    """
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    start = 0
    if resume and os.path.exists(checkpoint):
        ckpt = load_checkpoint(checkpoint, model)
        if ckpt["train_config"] != asdict(cfg):
            raise ValueError(f"cannot resume from {checkpoint}: it was made with {ckpt['train_config']}, "
                             f"this run has {asdict(cfg)}")
        optimizer.load_state_dict(ckpt["optimizer"])
        generator.set_state(ckpt["generator"])
        start = ckpt["step"]
    model.train()
    times, t_start = [], time.perf_counter()
    for step in range(start, steps):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr, warmup)
        x, y = get_batch(data, cfg.batch_size, cfg.block_size, generator)
        _, loss = model(x.to(device), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == steps:
            adapters.atomic_save({"model": model.state_dict(), "model_config": model.config.to_dict(),
                              "train_config": asdict(cfg), "optimizer": optimizer.state_dict(),
                              "generator": generator.get_state(), "step": done}, checkpoint)
        progress(label, done, steps, loss.item(), cfg, time.perf_counter() - t_start, done - start)
        if callback is not None:
            callback(done)
    progress_end()
    return 1000 * statistics.median(times[min(3, len(times) - 1):]) if times else float("nan")


def progress(label, done, steps, loss, cfg, elapsed, steps_here):
    tokens_per_s = steps_here * cfg.batch_size * cfg.block_size / max(elapsed, 1e-9)
    left = elapsed / max(steps_here, 1) * (steps - done)
    line = (f"{label:>10} step {done:>4}/{steps}  loss {loss:.3f}  "
            f"{tokens_per_s / 1e3:6.1f}k tok/s  {left:5.1f}s left")
    if sys.stderr.isatty():
        print("\r" + line, end="", file=sys.stderr, flush=True)
    elif done == steps or done % max(1, steps // 5) == 0:
        print(line, file=sys.stderr, flush=True)


def progress_end():
    if sys.stderr.isatty():
        print(file=sys.stderr)


# ------------------------------------------------------------------------------------------- report

def format_table(rows: list[dict]) -> str:
    """One aligned text table, a row per method."""
    header = ["method", "trainable", "% of model", "adapter file", "weights", "train memory",
              "ms/step", "val before", "val after"]
    lines = [[r["method"], f"{r['trainable']:,}", f"{100 * r['trainable_fraction']:.2f}%",
              human_bytes(r["adapter_bytes"]), human_bytes(r["memory"]["weights"]),
              human_bytes(r["memory"]["total"]),
              f"{r['ms_per_step']:.1f}", f"{r['val_before']:.3f}", f"{r['val_after']:.3f}"]
             for r in rows]
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines])


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


# --------------------------------------------------------------------------------------------- main

def pretrain(cfg: TrainConfig, corpus: Corpus, out: str, device, resume: bool) -> tuple[GPT, str]:
    """Pretrain the base model, or reuse a finished checkpoint made with the same config and data."""
    model = build_model(cfg, len(corpus.vocab), device)
    key = hashlib.sha256(json.dumps([asdict(cfg), corpus.fingerprint]).encode()).hexdigest()[:12]
    path = os.path.join(out, f"base-{key}.pt")
    if os.path.exists(path):
        ckpt = load_checkpoint(path, model)
        if ckpt["step"] == cfg.pretrain_steps:
            print(f"reusing the pretrained base model {path}", file=sys.stderr)
            return model, path
    optimizer = make_optimizer(model, "adamw", cfg.pretrain_lr, None)
    train_loop(model, optimizer, corpus.train, cfg, cfg.pretrain_steps, cfg.pretrain_lr,
               cfg.warmup_steps, path, "pretrain", resume or os.path.exists(path), device)
    return model, path


def finetune(method: str, cfg: TrainConfig, base_path: str, corpus: Corpus, windows, opts: dict,
             out: str, device, resume: bool) -> dict:
    model = build_model(cfg, len(corpus.vocab), device)
    load_checkpoint(base_path, model)
    n_base = model.num_parameters()
    model = prepare(method, model, opts, cfg.seed)
    # After prepare: a fresh adapter equals the base, but QLoRA's base is already the 4-bit one.
    val_before = estimate_loss(model, windows, device)
    optimizer = make_optimizer(model, opts["optimizer"], opts["lr"], opts["budget"])
    ms = train_loop(model, optimizer, corpus.train, cfg, cfg.finetune_steps, opts["lr"], 0,
                    os.path.join(out, f"finetune-{method}.pt"), method, resume, device)
    memory = training_memory(model, optimizer)
    trainable = adapters.count_trainable(model)
    adapter_bytes = save_adapter(method, model, os.path.join(out, f"adapter-{method}.pt"))
    row = dict(method=method, trainable=trainable, trainable_fraction=trainable / n_base,
               adapter_bytes=adapter_bytes, memory=memory, ms_per_step=ms, val_before=val_before,
               val_after=estimate_loss(model, windows, device))
    if isinstance(optimizer, PagedAdamW):
        row["paging"] = optimizer.stats.as_dict()
    if method == "qlora":
        report = qlora.qlora_memory_report(model, optimizer)
        row["nf4"] = dict(bytes=report["nf4_weights"] + report["nf4_statistics"],
                          float32_bytes=qlora.dense_weight_bytes(model, torch.float32)["quantized_layers"],
                          bits_per_parameter=report["bits_per_parameter"])
    return row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", default="all",
                   help=f"'all' or a comma-separated list of {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per method")
    p.add_argument("--pretrain-steps", type=int, default=None, help="pretraining steps")
    p.add_argument("--seed", type=int, default=None, help="seed for weights, batches and adapters")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to train; auto takes CUDA when available")
    p.add_argument("--out", default="runs", help="folder for checkpoints, adapters and results")
    p.add_argument("--quick", action="store_true", help="a tiny model and a few steps (tests)")
    p.add_argument("--resume", action="store_true", help="continue interrupted fine-tuning runs from their checkpoints (an "
                   "interrupted pretraining always continues: its checkpoint is keyed by config and data)")
    p.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate (method default)")
    p.add_argument("--rank", type=int, default=None, help="adapter rank r (method default)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA/DoRA/QLoRA alpha (default 2r)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapter input")
    p.add_argument("--targets", default=adapters.ALL_LINEAR,
                   help="'all-linear' or comma-separated layer names, e.g. q_proj,v_proj")
    p.add_argument("--optimizer", default=None, choices=("adamw", "paged_adamw"),
                   help="optimizer (default: paged_adamw for qlora, adamw otherwise)")
    p.add_argument("--budget", type=int, default=None,
                   help="PagedAdamW device budget in bytes for optimizer state (default: no limit)")
    return p.parse_args(argv)


def method_options(method: str, args) -> dict:
    opts = dict(METHOD_DEFAULTS[method])
    for name in ("lr", "rank", "alpha"):
        if getattr(args, name) is not None and (name in opts or name == "lr"):
            opts[name] = getattr(args, name)
    if args.rank is not None and args.alpha is None and "alpha" in opts:
        opts["alpha"] = 2.0 * args.rank
    opts["targets"] = (adapters.ALL_LINEAR if args.targets == adapters.ALL_LINEAR
                       else tuple(t.strip() for t in args.targets.split(",")))
    opts["dropout"] = args.dropout
    opts["optimizer"] = args.optimizer or ("paged_adamw" if method == "qlora" else "adamw")
    opts["budget"] = args.budget
    return opts


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    cfg = TrainConfig(**QUICK) if args.quick else TrainConfig()
    overrides = {k: v for k, v in (("finetune_steps", args.steps), ("pretrain_steps", args.pretrain_steps),
                                   ("seed", args.seed)) if v is not None}
    cfg = replace(cfg, **overrides)
    methods = METHODS if args.method == "all" else tuple(m.strip() for m in args.method.split(","))
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--method: {m!r} is not one of {', '.join(METHODS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    device = torch.device("cuda" if args.device == "cuda" or
                          (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    torch.manual_seed(cfg.seed)  # nothing should draw from the global RNG; this makes sure of it

    pre_text = pretraining_text()
    vocab = build_vocab(pre_text)
    pre, fine = make_corpus(pre_text, vocab), make_corpus(finetuning_text(), vocab)
    print(f"pretraining text: {len(pre_text):,} characters, vocabulary {len(vocab)} (with UNK); "
          f"fine-tuning text: {len(fine.train) + len(fine.val):,} characters, {fine.unknown} mapped "
          f"to UNK; device {device}", file=sys.stderr)

    t0 = time.perf_counter()
    base, base_path = pretrain(cfg, pre, args.out, device, args.resume)
    windows = eval_windows(fine.val, cfg.eval_batches, cfg.batch_size, cfg.block_size)
    print(f"base model: {base.num_parameters():,} parameters, pretraining val loss "
          f"{estimate_loss(base, eval_windows(pre.val, cfg.eval_batches, cfg.batch_size, cfg.block_size), device):.3f}",
          file=sys.stderr)
    rows = [finetune(m, cfg, base_path, fine, windows, method_options(m, args), args.out, device,
                     args.resume) for m in methods]
    print(format_table(rows))
    print(f"\n{time.perf_counter() - t0:.0f} s in all; fine-tuning {cfg.finetune_steps} steps of "
          f"{cfg.batch_size}x{cfg.block_size} tokens per method; val = cross-entropy (nats/char) on "
          f"held-out fine-tuning text")
    for row in rows:
        if row.get("nf4"):
            nf4_row = row["nf4"]
            print(f"{row['method']}: the quantized linears take {nf4_row['bytes']:,} bytes "
                  f"({nf4_row['bits_per_parameter']:.3f} bits a weight), "
                  f"{100 * nf4_row['bytes'] / nf4_row['float32_bytes']:.1f}% of their "
                  f"{nf4_row['float32_bytes']:,} bytes in float32")
        if row.get("paging"):
            print(f"{row['method']} paging: " + ", ".join(f"{k} {v:,}" for k, v in row["paging"].items()))
    adapters.atomic_save(rows, os.path.join(args.out, "results.json"),
                     write=lambda obj, f: f.write(json.dumps(obj, indent=1).encode()))
    return rows


if __name__ == "__main__":
    main()
