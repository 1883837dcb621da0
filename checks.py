"""Argument checks shared by every module: one place for "what did the caller pass".

Each checker raises a ValueError or TypeError whose message names the argument, says what it
accepts and shows what it got, and returns the value so a constructor can write
`self.r = check_int(r, "r", low=1)`. Checks run where a value enters the library (constructors,
public functions, a layer's input), not on every use of it. The entry points' flags are built on
them in training/flags.py; the target_modules patterns of adapter files are checked in
formats/target_patterns.py.
"""
from __future__ import annotations

import math

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


def check_instance(value, cls: type, name: str, made_by: str = "") -> object:
    """TypeError unless value is a `cls`; `made_by` says where one comes from."""
    if not isinstance(value, cls):
        where = f" (from {made_by})" if made_by else ""
        raise TypeError(f"{name} must be an instance of {cls.__name__}{where}, "
                        f"got {type(value).__name__}")
    return value


def check_dtype(dtype, name: str, dtypes) -> torch.dtype:
    """TypeError unless dtype is one of `dtypes`."""
    if dtype not in tuple(dtypes):
        raise TypeError(f"{name} must be one of {', '.join(map(str, dtypes))}, got {dtype!r}")
    return dtype


def check_blocksize(blocksize, allowed, name: str = "blocksize") -> int:
    """An int in `allowed` (NF4's: nf4.ALLOWED_BLOCKSIZES, bitsandbytes' powers of two)."""
    return check_choice(check_int(blocksize, name, low=min(allowed), high=max(allowed)), name,
                        allowed)


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


def check_stored(tensors: dict, expected: dict, context, finite: bool = True) -> None:
    """Each stored tensor has its expected (dtype, numel), or is None where `expected` says False;
    with finite=True, none is a meta tensor or holds NaN or Inf. `context` names the whole."""
    for name, tensor in tensors.items():
        wanted = expected[name]
        got = None if tensor is None else (tensor.dtype, tensor.numel())
        if got != (wanted or None):
            raise ValueError(f"{name} must be {wanted or 'None'} (dtype, numel) for {context}, "
                             f"got {got}")
        if finite and tensor is not None:
            check_tensor(tensor, name, finite=True)


def check_quantized_state(state_dict, prefix: str, own: dict, nf4_format: torch.Tensor) -> None:
    """A state dict for qlora.NF4Linear at `prefix`: its nf4_format (out, in, blocksize,
    nested_blocksize) is this layer's, each storage tensor has this layer's shape and dtype, and
    none holds NaN or Inf or a negative scale (a negative absmax flips its block's sign; a NaN in
    the scales, the offset or the bias poisons every output). Missing keys are the loader's to
    report."""
    key = prefix + "nf4_format"
    if key in state_dict and state_dict[key].tolist() != nf4_format.tolist():
        raise ValueError(f"state dict for NF4Linear {prefix!r} has nf4_format [out, in, "
                         f"blocksize, nested_blocksize] = {state_dict[key].tolist()}, this "
                         f"layer is {nf4_format.tolist()}")
    for name, tensor in own.items():
        key = prefix + name
        if key not in state_dict:
            continue
        new = check_tensor(state_dict[key], f"state dict entry {key!r}", finite=True)
        if name in ("absmax", "nested_absmax") and bool((new.float() < 0).any()):
            raise ValueError(f"state dict entry {key!r} has negative values: it holds "
                             "largest magnitudes (a negative one flips its block's sign)")
        if name != "bias" and (new.shape, new.dtype) != (tensor.shape, tensor.dtype):
            raise ValueError(f"state dict entry {key!r} is {new.dtype} {tuple(new.shape)}, "
                             f"NF4Linear expects {tensor.dtype} {tuple(tensor.shape)} (another "
                             "shape, blocksize or double_quant)")


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


# The door for tensors a caller brings to dora.py's math (the oracle kit, a reader's experiment).
def check_dora_inputs(weight, A, B, magnitude, scaling) -> None:
    """TypeError/ValueError unless W0 is (out, in), A (r, in), B (out, r), m (out,), A, B and m
    share one floating dtype, and the scaling is a finite number."""
    for name, t in (("A", A), ("B", B), ("magnitude", magnitude)):
        check_tensor(t, name, allow_meta=True)
    check_tensor(weight, "weight", ndim=2, allow_meta=True)  # (out, in)
    out_features, in_features = weight.shape
    if A.dim() != 2 or A.shape[1] != in_features:
        raise ValueError(f"A must have shape (r, in={in_features}), got {tuple(A.shape)}")
    if B.shape != (out_features, A.shape[0]):
        raise ValueError(f"B must have shape (out={out_features}, r={A.shape[0]}), "
                         f"got {tuple(B.shape)}")
    if magnitude.shape != (out_features,):
        raise ValueError(f"magnitude must have shape (out={out_features},), "
                         f"got {tuple(magnitude.shape)}")
    if not A.is_floating_point() or B.dtype != A.dtype or magnitude.dtype != A.dtype:
        raise TypeError(f"A, B and magnitude must share one floating dtype, got {A.dtype}, "
                        f"{B.dtype}, {magnitude.dtype}")
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool) \
            or not math.isfinite(scaling):
        raise TypeError(f"scaling must be a finite number, got {scaling!r}")
