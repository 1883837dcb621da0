"""The exercises of docs/exercises.md in teaching order, and the means to blank a function.

Each `Exercise` names the function a student rebuilds (`MODULE.FUNCTION` or `MODULE.Class.method`),
what to read, and the known wrong answers: implementations the exercise's tests must reject.
tests/test_exercises.py checks, for every exercise, that its tests fail when the function is blanked
(its body replaced by `raise NotImplementedError`) and when each wrong answer stands in for it.
"""
from __future__ import annotations

import contextlib
import importlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class Exercise:
    name: str                     # MODULE.FUNCTION or MODULE.Class.method: what to rebuild
    reading: str                  # the paper section (or docs page) to read first
    wrong_answers: dict[str, Callable] = field(default_factory=dict)  # label -> a wrong version
    breaks: tuple[str, ...] = ()  # other exercises whose tests also fail while this one is blank


def resolve(name: str):
    """(owner, attribute name, function) for MODULE.FUNCTION or MODULE.Class.method, where MODULE
    may be a package's module (formats.safetensors_io)."""
    parts = name.split(".")
    owner = importlib.import_module(parts[0])
    path = parts[1:]
    while hasattr(owner, "__path__") and len(path) > 1:  # a package: go down to its module
        owner = importlib.import_module(f"{owner.__name__}.{path.pop(0)}")
    for part in path[:-1]:
        owner = getattr(owner, part)
    raw = vars(owner)[path[-1]] if isinstance(owner, type) else getattr(owner, path[-1])
    function = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
    return owner, path[-1], function


def _trampoline(*args, **kwargs):
    return __exercise_substitute__(*args, **kwargs)  # noqa: F821 (set in the function's module)


@contextlib.contextmanager
def substituted(name: str, replacement: Callable):
    """Calls of `name` run `replacement` instead, wherever `name` is referenced from.

    The function's code becomes a trampoline to `replacement`, so callers that imported it by name
    (`from lora import lora_delta`) see the change too. A function whose code has free variables
    (e.g. a method that calls `super()`) is replaced on its class or module instead. Everything
    comes back on exit.
    """
    owner, attribute, function = resolve(name)
    if function.__code__.co_freevars:
        raw = vars(owner)[attribute] if isinstance(owner, type) else getattr(owner, attribute)
        setattr(owner, attribute, replacement)
        try:
            yield
        finally:
            setattr(owner, attribute, raw)
        return
    module_globals = function.__globals__
    original = function.__code__
    module_globals["__exercise_substitute__"] = replacement
    function.__code__ = _trampoline.__code__
    try:
        yield
    finally:
        function.__code__ = original
        del module_globals["__exercise_substitute__"]


def blanked(name: str):
    """`name` with its body replaced by `raise NotImplementedError`, as a student receives it."""
    def blank(*args, **kwargs):
        raise NotImplementedError("this function is an exercise: rebuild it")
    return substituted(name, blank)


# --------------------------------------------------------------------------- known wrong answers

def attention_without_mask(self, x):
    B, T, C = x.shape
    hs = C // self.n_head
    q = self.q_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)
    k = self.k_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)
    v = self.v_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)
    y = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hs), dim=-1) @ v
    return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


def attention_without_scale(self, x):
    B, T, C = x.shape
    hs = C // self.n_head
    q = self.q_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)
    k = self.k_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)
    v = self.v_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)
    scores = q @ k.transpose(-2, -1)  # forgot / sqrt(hs)
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    y = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v
    return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


# qlora: the input gradient of the frozen NF4 base

def input_grad_with_transposed_weight(grad_out, q, compute_dtype=torch.bfloat16):
    import qlora
    return grad_out.matmul(qlora.double_dequant(q, compute_dtype).t())  # W^T: the forward's matrix


def input_grad_without_block_scales(grad_out, q, compute_dtype=torch.bfloat16):
    import nf4
    codes = nf4.nf4_code()[nf4.unpack_nibbles(q.packed, q.numel).long()]  # q[k], never times c_b
    return grad_out.matmul(codes.view(q.shape).to(compute_dtype))


def input_grad_with_stored_scales(grad_out, q, compute_dtype=torch.bfloat16):
    import nf4
    indices = nf4.unpack_nibbles(q.packed, q.numel)  # the 8-bit codes of the scales taken as scales
    W = nf4.dequantize_blockwise(indices, q.absmax.float(), nf4.nf4_code(), q.blocksize)
    return grad_out.matmul(W.view(q.shape).to(compute_dtype))


# safetensors_io: the header

def _write_safetensors(tensors, path, metadata=None, pad=True, by_size=True, length="little",
                       from_file_start=False):
    import json

    from formats import safetensors_io as io
    header = {io.METADATA_KEY: {io.CHECKSUM_KEY: "0" * io.CHECKSUM_DIGITS, **(metadata or {})}}
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n)) if by_size else tensors
    chunks, offset = [], 0
    for name in names:
        tensor = tensors[name].detach().contiguous().clone()
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": io.DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    if pad:
        header_bytes += b" " * (-len(header_bytes) % io.HEADER_ALIGNMENT)
    if from_file_start:  # offsets counted from byte 0 of the file, not from the first data byte
        shift = io.LENGTH_BYTES + len(header_bytes)
        for name in names:
            header[name]["data_offsets"] = [o + shift for o in header[name]["data_offsets"]]
        header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    file_bytes = bytearray(len(header_bytes).to_bytes(io.LENGTH_BYTES, length) + header_bytes)
    file_bytes += b"".join(chunks)
    start = io.LENGTH_BYTES + len(io.CHECKSUM_PREFIX)
    file_bytes[start:start + io.CHECKSUM_DIGITS] = io.file_checksum(file_bytes).encode("ascii")
    io.atomic_write(path, lambda file: file.write(file_bytes))


def save_without_padding(tensors, path, metadata=None):
    _write_safetensors(tensors, path, metadata, pad=False)


def save_in_the_dicts_order(tensors, path, metadata=None):
    _write_safetensors(tensors, path, metadata, by_size=False)


def save_with_a_big_endian_length(tensors, path, metadata=None):
    _write_safetensors(tensors, path, metadata, length="big")


def save_offsets_from_the_file_start(tensors, path, metadata=None):
    _write_safetensors(tensors, path, metadata, from_file_start=True)


ATTENTION = [
    Exercise("tiny_gpt.CausalSelfAttention.forward",
             "Vaswani et al. 2017 (arXiv 1706.03762) sec. 3.2.1; docs/tiny_gpt.md",
             {"no causal mask": attention_without_mask, "no 1/sqrt(hs)": attention_without_scale}),
]
QLORA = [
    Exercise("qlora.nf4_linear_input_grad", "QLoRA (arXiv 2305.14314) sec. 3, eq. 5 and 6",
             {"W^T instead of W": input_grad_with_transposed_weight,
              "codes without their block scales": input_grad_without_block_scales,
              "8-bit scale codes used as scales": input_grad_with_stored_scales}),
]
FILES = [
    Exercise("formats.safetensors_io.save_file",
             "the safetensors README, section Format; formats/safetensors_io.py's docstring",
             {"header not padded to 8 bytes": save_without_padding,
              "tensors in the dict's order": save_in_the_dicts_order,
              "big-endian header length": save_with_a_big_endian_length,
              "offsets from the file's start": save_offsets_from_the_file_start}),
]

# The exercises of the adapters (lora, dora, vera) and of quantization and the optimizer (nf4,
# paged_optim) live in files of their own; all of them here, in teaching order.
from exercises_adapters import ADAPTER_EXERCISES  # noqa: E402 (they import Exercise from here)
from exercises_quantization import NF4_EXERCISES, OPTIMIZER_EXERCISES  # noqa: E402

EXERCISES = (ATTENTION + ADAPTER_EXERCISES + NF4_EXERCISES + QLORA + OPTIMIZER_EXERCISES + FILES)
