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
import torch.nn.functional as F


@dataclass(frozen=True)
class Exercise:
    name: str                     # MODULE.FUNCTION or MODULE.Class.method: what to rebuild
    reading: str                  # the paper section (or docs page) to read first
    wrong_answers: dict[str, Callable] = field(default_factory=dict)  # label -> a wrong version


def resolve(name: str):
    """(owner, attribute name, function) for MODULE.FUNCTION or MODULE.Class.method."""
    module_name, *path = name.split(".")
    owner = importlib.import_module(module_name)
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


EXERCISES = [
    Exercise("tiny_gpt.CausalSelfAttention.forward",
             "Vaswani et al. 2017 (arXiv 1706.03762) sec. 3.2.1; docs/tiny_gpt.md",
             {"no causal mask": attention_without_mask, "no 1/sqrt(hs)": attention_without_scale}),
]
