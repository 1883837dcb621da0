"""What a run is made of: the texts and their tokens, and the run folder that train.py fills (its
files and their checksums), from which sample.py loads a finished run.

The texts ship with Python itself, so nothing is downloaded: pretraining reads the standard
library's documentation topics (`pydoc_data.topics`, the text behind `help("if")`), English prose
about Python; fine-tuning reads the source of a fixed list of pure-Python standard-library modules
(FINETUNE_MODULES), code. Each is split by position: the first 90% trains, the rest validates.
Tokens are characters: the sorted characters of the pretraining text after UNK (id 0), to which a
fine-tuning character that pretraining never saw maps, since a method that freezes the embedding
could never learn a new row.

A run folder (train.py --out) holds:
    base-<key>.pt          the pretrained base: a checkpoint keyed by config and data (a cache)
    finetune-<method>.pt   each method's latest checkpoint, which `train.py --resume` continues
    adapter-<method>/      lora, qlora, dora, vera in PEFT's format: adapter_config.json and
                           adapter_model.safetensors (peft.PeftModel.from_pretrained reads it)
    full.safetensors       the fully fine-tuned model's state dict
    run.json               per method, and for "base": its weights, options and seed, and the base
                           it was trained on (checkpoint, fingerprint, vocabulary, model config)
    results.json           the table's rows, one per method run into this folder
Every file carries a SHA-256 of its contents that loading verifies: a checkpoint is a line holding
the SHA-256 of the torch.save bytes after it; a JSON file is {"sha256": ..., "payload": ...}; a
safetensors file carries its own in its metadata (safetensors_io). A file that fails is named in a
one-line error; train.py sets a corrupt cache aside (renamed *.corrupt) and builds it again.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import re
import sys
from dataclasses import dataclass

import torch

import qlora
from formats import adapter_files, safe_open, safetensors_io
from tiny_gpt import GPT, GPTConfig
from training import locks

UNK = "\x00"  # the unknown character; id 0
CHECKPOINT_MAGIC = b"tiny-gpt checkpoint, sha256 of the torch.save bytes after this line: "

# ------------------------------------------------------------------- texts and their tokens

FINETUNE_MODULES = ("textwrap", "heapq", "bisect", "fnmatch", "colorsys", "queue", "calendar",
                    "string", "glob", "sched", "graphlib", "contextlib", "functools", "fractions",
                    "statistics", "pprint")
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
        data = self.vocab.encode() + self.train.numpy().tobytes() + self.val.numpy().tobytes()
        return hashlib.sha256(data).hexdigest()[:16]


def make_corpus(text: str, vocab: str) -> Corpus:
    ids, unknown = encode(text, vocab)
    n_train = int(len(ids) * (1 - VAL_FRACTION))
    return Corpus(vocab, ids[:n_train], ids[n_train:], unknown)


def build_vocab(text: str) -> str:
    return UNK + "".join(sorted(set(text) - {UNK}))


def encode(text: str, vocab: str) -> tuple[torch.Tensor, int]:
    """Character ids; characters outside `vocab` become UNK (id 0). Returns (ids, how many)."""
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = [index.get(ch, 0) for ch in text]
    return torch.tensor(ids, dtype=torch.long), sum(1 for ch in text if ch not in index)


def decode(ids, vocab: str) -> str:
    return "".join(vocab[i] if i else "\ufffd" for i in ids)  # UNK shows as the replacement mark


# ------------------------------------------------------------------ the run folder's files

class CorruptFile(ValueError):
    """A file of a run that cannot be trusted: empty, truncated, or not what its checksum says."""


class MissingRun(ValueError):
    """A run folder, method or file that does not exist (yet)."""


class OtherRun(ValueError):
    """A checkpoint made by another method, or with other options or configs."""


def save_checkpoint(state: dict, path: str) -> None:
    """torch.save bytes behind a line holding their SHA-256, written atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    file_bytes = CHECKPOINT_MAGIC + digest + b"\n" + payload
    safetensors_io.atomic_write(path, lambda f: f.write(file_bytes), make_folder=False)


def read_checkpoint(path: str, identity: dict | None = None) -> dict:
    """Verify the checksum, then torch.load(weights_only=True); a bad file is a CorruptFile.

    With `identity` (the method, its options, the configs), refuse a checkpoint made with another,
    naming each field that differs with both values (OtherRun).
    """
    payload = _verified_payload(path)
    checkpoint = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    if identity is not None:
        made, wanted = flat(checkpoint.get("identity", {})), flat(identity)
        differ = [f"{key} {made.get(key)!r} there, {wanted.get(key)!r} here"
                  for key in sorted(set(made) | set(wanted)) if made.get(key) != wanted.get(key)]
        if differ:
            raise OtherRun(f"cannot resume from {path}: it was made with other options "
                           f"({'; '.join(differ)})")
    return checkpoint


def _verified_payload(path: str) -> bytes:
    """The torch.save bytes of a checkpoint file, after its first line and its SHA-256 are checked.

    Memory: the first line is read first (a file without it is refused having read 136 bytes),
    the SHA-256 is computed piece by piece, and only a file that matches is read whole (and
    hashed again in memory, in case it changed in between).
    """
    start = len(CHECKPOINT_MAGIC) + 65  # the magic words, 64 hex digits and a newline
    file, size = safe_open.open_regular(path)  # a FIFO, device or folder: one line
    with file:
        if size == 0:
            raise CorruptFile(f"{path} is empty (an interrupted write?)")
        first = file.read(start)
        if not first.startswith(CHECKPOINT_MAGIC) or len(first) < start:
            raise CorruptFile(f"{path} is not a checkpoint of this project (or its first line is "
                              f"damaged)")
        stored, digest = first[len(CHECKPOINT_MAGIC):start - 1], hashlib.sha256()
        while chunk := file.read(safe_open.CHUNK_BYTES):
            digest.update(chunk)
        if digest.hexdigest().encode() != stored:
            raise CorruptFile(f"{path} does not match its SHA-256: the file is corrupt or "
                              f"truncated")
        file.seek(start)
        payload = safe_open.read_exactly(file, size - start, path)
    if hashlib.sha256(payload).hexdigest().encode() != stored:
        raise CorruptFile(f"{path} changed while being read")
    return payload


def flat(tree: dict) -> dict:
    """Nested dicts as one: {"options": {"rank": 8}} -> {"rank": 8}."""
    return {key: value for name, branch in tree.items()
            for key, value in (flat(branch).items() if isinstance(branch, dict)
                               else [(name, branch)])}


def json_digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def write_json(path: str, payload) -> None:
    text = json.dumps({"sha256": json_digest(payload), "payload": payload}, indent=1)
    safetensors_io.atomic_write(path, lambda f: f.write(text.encode()), make_folder=False)


def read_json(path: str):
    try:
        data = safe_open.load_json(path)  # a FIFO or folder: NotRegularFile, never set aside
        matches = json_digest(data["payload"]) == data["sha256"]
    except safe_open.NotRegularFile:
        raise
    except (ValueError, KeyError, TypeError, RecursionError) as error:
        why = str(error).removeprefix(f"{path}: ")
        raise CorruptFile(f"{path} is not a JSON file of this project ({why})") from None
    if not matches:
        raise CorruptFile(f"{path} does not match its SHA-256: the file is corrupt")
    return data["payload"]


def set_aside(path: str, reason: Exception) -> None:
    """Rename a corrupt file to `<path>.corrupt[-n]`: kept for a look, never trusted again."""
    target, n = f"{path}.corrupt", 1
    while os.path.exists(target):
        target, n = f"{path}.corrupt-{n}", n + 1
    os.replace(path, target)
    print(f"{reason}; set aside as {target}", file=sys.stderr)


def record(out: str, name: str, entry: dict, row: dict | None = None, order=()) -> None:
    """`name`'s entry into run.json and its row into results.json, ordered by `order`; the other
    methods' stay. Under the folder's records lock: runs sharing the folder lose no entry."""
    with locks.shared_file_lock(out, "records"):
        _record(out, name, entry, row, order)


def _record(out: str, name: str, entry: dict, row: dict | None, order) -> None:
    update_json(os.path.join(out, "run.json"), lambda run: {**(run or {}), name: entry})
    if row is not None:
        def rows(old_rows):
            kept = [r for r in old_rows or [] if r["method"] != name]
            return sorted(kept + [row], key=lambda r: order.index(r["method"]))

        update_json(os.path.join(out, "results.json"), rows)


def update_json(path: str, update) -> None:
    """Rewrite a JSON file of the run as `update(payload)` (None when there is none yet); a
    corrupt file is set aside and counts as none."""
    payload = None
    if os.path.exists(path):
        try:
            payload = read_json(path)
        except CorruptFile as error:
            set_aside(path, error)
    write_json(path, update(payload))


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor's name and bytes: which base an adapter was trained on."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def weights_name(method: str) -> str:
    return "full.safetensors" if method == "full" else f"adapter-{method}"


def save_weights(method: str, model: torch.nn.Module, path: str) -> int:
    """Write what `method` trained (an adapter folder in PEFT's format; for `full`, the state dict
    as a safetensors file) to `path`; return its size in bytes. The run folder must still be
    there: a run whose folder was deleted stops (locks.RunFolderGone) rather than recreate it."""
    locks.check_folder_is_there(os.path.dirname(path) or ".")
    if method == "full":
        safetensors_io.save_file(model.state_dict(), path)
    else:
        adapter_files.save_adapter(model, path)
    return path_bytes(path)


def path_bytes(path: str) -> int:
    """A file's size, or the sum of the sizes of the files in a folder."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))


def make_command(out: str, method: str) -> str:
    return f"`python train.py --out {out}" + ("`" if method == "base" else f" --method {method}`")


def load_model(out: str, method: str) -> tuple[torch.nn.Module, str]:
    """The model `method` trained in the run folder `out` ("base": the pretrained base), in eval
    mode, and its vocabulary. MissingRun or CorruptFile say which file and what to do."""
    make = make_command(out, method)
    run_file = os.path.join(out, "run.json")
    if not os.path.exists(run_file):
        raise MissingRun(f"{out} holds no run ({run_file} is missing): make one with {make}")
    run = read_json(run_file)
    entry = run.get(method) if isinstance(run, dict) else None
    if entry is None:
        raise MissingRun(f"{out} holds no {method} run: make one with {make}")
    check_run_entry(run_file, method, entry)
    base, weights = entry["base"], entry["weights"] and os.path.join(out, entry["weights"])
    checkpoint = os.path.join(out, base["checkpoint"])
    for path in (checkpoint, weights):
        if path and not os.path.exists(path):
            raise MissingRun(f"{path} is missing: make it with {make}")
    model = GPT(GPTConfig(**base["model_config"]))
    if len(base["vocab"]) != model.config.vocab_size:
        raise CorruptFile(f"{run_file}: {method}'s vocabulary has {len(base['vocab'])} "
                          f"characters but its model {model.config.vocab_size}")
    model.load_state_dict(read_checkpoint(checkpoint)["model"])
    if weights_fingerprint(model) != base["fingerprint"]:
        raise CorruptFile(f"{checkpoint} holds another base than the one {method} was "
                          f"trained on")
    if method == "full":
        model.load_state_dict(safetensors_io.load_file(weights)[0])
    elif weights:
        if method == "qlora":  # the adapter sits on the same 4-bit base it was trained on
            options, quantization = entry["options"], entry["options"]["quantization"]
            targets = options["targets"] if isinstance(options["targets"], str) else tuple(
                options["targets"])
            qlora.quantize_model(model, targets, quantization["blocksize"],
                                 quantization["double_quant"],
                                 getattr(torch, quantization["compute_dtype"]))
        saved = adapter_files.read_adapter(weights)
        if saved.method != ADAPTER_METHOD.get(method, method):
            raise CorruptFile(f"{weights} holds a {saved.method} adapter, not {method}'s")
        model = adapter_files.apply_saved_adapter(model, saved)
    return model.eval(), base["vocab"]


# What each method's adapter folder holds: QLoRA trains a LoRA adapter on its 4-bit base.
ADAPTER_METHOD = {"qlora": "lora"}
BASE_CHECKPOINT = re.compile(r"base-[0-9a-f]{12}\.pt")


def check_run_entry(run_file: str, method: str, entry) -> None:
    """A run.json entry names only its own files, in its own folder, and a vocabulary that can be
    one: a CorruptFile naming the field otherwise (run.json's checksum can be recomputed by
    anyone, so what it names is checked like any input)."""
    def refuse(what: str):
        raise CorruptFile(f"{run_file}: {method}'s {what}")
    base = entry.get("base") if isinstance(entry, dict) else None
    if not isinstance(base, dict) or not isinstance(base.get("model_config"), dict):
        refuse("entry is not one train.py writes (no base or model_config)")
    expected = None if method == "base" else weights_name(method)
    if entry.get("weights") != expected:
        refuse(f"weights are {entry.get('weights')!r}; train.py writes {expected!r} there")
    checkpoint = base.get("checkpoint")
    if not isinstance(checkpoint, str) or not BASE_CHECKPOINT.fullmatch(checkpoint):
        refuse(f"base checkpoint is {checkpoint!r}, not a base-<12 hex digits>.pt of its folder")
    vocab = base.get("vocab")
    if not isinstance(vocab, str) or not vocab.startswith(UNK) or len(set(vocab)) != len(vocab):
        refuse("vocabulary is not UNK followed by distinct characters")


def occupied(out: str, methods) -> str | None:
    """The first path of `out` where a method's weights go that holds the wrong kind of entry."""
    for path in (os.path.join(out, weights_name(m)) for m in methods):
        if os.path.exists(path) and os.path.isdir(path) == path.endswith(".safetensors"):
            return path
    return None
