"""Argument checks shared by every module: one place for "what did the caller pass".

Each checker raises a ValueError or TypeError whose message names the argument, says what it
accepts and shows what it got, and returns the value so a constructor can write
`self.r = check_int(r, "r", low=1)`. Checks run where a value enters the library (constructors,
public functions, a layer's input), not on every use of it. The last section turns them into the
argparse types of train.py, bench.py and sample.py: a bad flag is one line naming it, status 2.
"""
from __future__ import annotations

import argparse
import math
import os
import re

try:
    # Python 3.11+; before, the same parser was the module sre_parse
    from re import _parser as sre_parse
except ImportError:
    import sre_parse

import torch


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_int(value, name: str, low: int | None = None, high: int | None = None) -> int:
    """An int (not a bool) in [low, high]; either bound may be None."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        if low is not None and high is not None:
            bounds = f" in [{low}, {high}]"
        else:
            bounds = f" >= {low}" if low is not None else f" <= {high}" if high is not None else ""
        raise ValueError(f"{name} must be an int{bounds}, got {value!r}")
    return value


def check_number(value, name: str, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """A finite int or float in the interval; `low_open`/`high_open` exclude the bound itself.

    NaN and +-Inf are always refused: no hyperparameter of this project means anything at Inf.
    """
    ok = _is_number(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        left = "(" if low_open or low is None else "["  # an infinite bound is never included
        right = ")" if high_open or high is None else "]"
        span = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"{name} must be a finite number in {span}, got {value!r}")
    return value


def check_probability(value, name: str) -> float:
    """A dropout-like probability in [0, 1)."""
    return check_number(value, name, 0.0, 1.0, high_open=True)


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r}")
    return value


def check_choice(value, name: str, choices) -> object:
    if value not in tuple(choices):
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_tensor(t, name: str, dtypes=None, ndim: int | None = None, finite: bool = False,
                 allow_meta: bool = False) -> torch.Tensor:
    """A torch.Tensor, optionally of one of `dtypes`, of `ndim` dimensions, without NaN/Inf.

    Meta tensors (no data, shapes only) are refused unless `allow_meta`: a check of their values or
    an arithmetic on them would fail later with a message about something else.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_meta and not allow_meta:
        raise ValueError(f"{name} is a meta tensor (no data): materialize it first (.to_empty)")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        raise TypeError(f"{name} must have dtype {' or '.join(str(d) for d in dtypes)}, "
                        f"got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def check_features(x, in_features: int, name: str = "x") -> torch.Tensor:
    """A floating-point tensor of shape (..., in_features): what a linear layer takes."""
    shape = f"of shape (..., in_features={in_features})"
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor {shape}, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{name} must be a tensor {shape}, got shape {tuple(x.shape)}")
    return x


def check_rank(r, in_features: int, out_features: int, layer: str) -> int:
    """r >= 1 and r <= max(in, out). ΔW has rank at most min(in, out), so a larger r adds no rank;
    ranks up to max(in, out) are accepted because PEFT accepts them (its files may use them), and
    anything larger (a typo such as 10**6) is refused before it allocates."""
    check_int(r, "r (the rank)", low=1)
    if r > max(in_features, out_features):
        raise ValueError(f"r (the rank) = {r} is larger than both widths of {layer} "
                         f"({in_features} in, {out_features} out); ΔW has rank at most "
                         f"min(in, out) = {min(in_features, out_features)}")
    return r

# --------------------------------------------------------------------------- command-line flags


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line ("train.py: argument --rank: must be ..."), status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message}\n")


def checked(check, convert=int, **bounds):
    """An argparse `type`: convert the text, then check the value with a checker of checks.py."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = text  # not a number at all: the checker says what the flag accepts
        try:
            return check(value, "value", **bounds)
        except (ValueError, TypeError) as error:
            raise argparse.ArgumentTypeError(str(error).removeprefix("value ")) from None
    return parse


def folder(text: str) -> str:
    if not text or os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"must name a folder, got {text!r}"
                                         + (", which is a file" if text else ""))
    return text


def writable_folder(text: str) -> str:
    """A folder to write into: it exists, or its nearest existing ancestor is a writable folder."""
    ancestor = os.path.abspath(folder(text))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK):
        why = "not writable" if os.path.isdir(ancestor) else "a file"
        raise argparse.ArgumentTypeError(f"cannot make or write {text!r}: {ancestor} is {why}")
    return text


def text_flag(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must be at least one character")
    return text


# A target_modules regular expression is matched against every layer name of a model, and a
# downloaded adapter's config is untrusted: Python's backtracking matcher takes time exponential in
# the name's length on patterns such as (.|.)*x or (a+)+x. check_target_pattern refuses the shapes
# that backtrack exponentially: a repeat (*, +, {m,n} with n > 1) around an alternation, around
# another repeat, and back-references. What remains backtracks at most polynomially, with degree
# the number of repeats, so that number is bounded too; docs/adapter_files.md has the measured cost.
MAX_TARGET_PATTERN_CHARS = 1000
MAX_TARGET_PATTERN_REPEATS = 3


def check_target_pattern(pattern: str, name: str) -> str:
    """`pattern` if it is a regular expression safe to match against untrusted names (above)."""
    if len(pattern) > MAX_TARGET_PATTERN_CHARS:
        raise ValueError(f"{name} is a regular expression of {len(pattern)} characters; at most "
                         f"{MAX_TARGET_PATTERN_CHARS}")
    try:
        tree = sre_parse.parse(pattern)
    except re.error as error:
        raise ValueError(f"{name} is no regular expression ({error})") from None
    repeats = _repeats(tree, sre_parse.MAXREPEAT, name, pattern)
    if repeats > MAX_TARGET_PATTERN_REPEATS:
        raise ValueError(f"{name} {pattern!r} has {repeats} repeats (*, +, {{m,n}}); at most "
                         f"{MAX_TARGET_PATTERN_REPEATS}, which bound its matching time")
    return pattern


def _repeats(tree, maxrepeat, name: str, pattern: str, inside_repeat: bool = False) -> int:
    """The repeats with an upper bound above 1 in a parsed pattern; a ValueError for a shape that
    backtracks exponentially (a repeat inside a repeat, an alternation inside a repeat,
    back-references)."""
    def refuse(what: str):
        raise ValueError(f"{name} {pattern!r} has {what}, which can make matching take time "
                         f"exponential in the name's length; write it without (e.g. a list of "
                         f"names, or .*\\.(q_proj|v_proj) with the alternation outside any repeat)")
    count = 0
    for op, value in tree:
        op = str(op)
        if op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, high, body = value
            repeats = high == maxrepeat or high > 1
            if repeats and inside_repeat:
                refuse("a repeat inside a repeat, such as (a+)*")
            count += repeats + _repeats(body, maxrepeat, name, pattern, inside_repeat or repeats)
        elif op == "BRANCH":
            if inside_repeat:
                refuse("an alternation inside a repeat, such as (a|b.)*")
            count += sum(_repeats(branch, maxrepeat, name, pattern) for branch in value[1])
        elif op in ("GROUPREF", "GROUPREF_EXISTS"):
            refuse("a back-reference")
        elif op == "SUBPATTERN":
            count += _repeats(value[-1], maxrepeat, name, pattern, inside_repeat)
        elif op in ("ASSERT", "ASSERT_NOT"):
            count += _repeats(value[1], maxrepeat, name, pattern, inside_repeat)
        elif op == "ATOMIC_GROUP":
            count += _repeats(value, maxrepeat, name, pattern, inside_repeat)
    return count
