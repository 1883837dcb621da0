"""What the oracle's checkers guard besides the values: a candidate's inputs, its outputs' place.

A drop-in kernel that writes into its inputs breaks training even when its outputs are right, so
each checker hands the candidate its own copies of the inputs and compares every one with the
original after the call (and after the backward pass): a changed input is a failure naming the
input and its first changed element. An output is checked for device, dtype and shape before its
values are, so a meta or misplaced tensor reads as what it is, not as a crash. A checker's own
setup problem (device "cuda" on a machine without CUDA) is an error of the caller, raised before
any candidate runs: RuntimeError (no such device here) or ValueError (no device at all).
"""

from __future__ import annotations

import dataclasses

import torch

import nf4
from oracle_kit.contracts import raw_bits


def check_device(device) -> str:
    """The device a checker runs its cases on, as text; an error of the caller, not a finding."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda', got "
                         f"{device!r}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r}: CUDA is not available on this machine; this is "
                           f"the checker's setup, not the candidate: pass device='cpu'")
    if parsed.type == "meta":
        raise ValueError("device 'meta' holds no values to compare; pass a real device")
    return str(parsed)


def candidate_copy(value):
    """A copy of one input that the candidate may do anything to (a tensor or an NF4Weight)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, nf4.NF4Weight):
        copies = {name: tensor.clone() for name, tensor in value.tensors().items()}
        return dataclasses.replace(value, check_values=False, **copies)
    return value


def first_change(name: str, original, copy) -> str | None:
    """None if the candidate left its copy of input `name` as it was given, else a line naming the
    input and its first changed element (compared bit for bit: NaN and -0.0 included)."""
    if isinstance(original, nf4.NF4Weight):
        for field, tensor in original.tensors().items():
            problem = first_change(f"{name}.{field}", tensor, getattr(copy, field))
            if problem:
                return problem
        return None
    if not isinstance(original, torch.Tensor):
        return None
    if not isinstance(copy, torch.Tensor) or copy.shape != original.shape \
            or copy.dtype != original.dtype or copy.device != original.device:
        return (f"fn changed its input {name}: it was {_place(original)}, now {_place(copy)}; a "
                f"kernel must not write into its inputs")
    different = raw_bits(copy) != raw_bits(original)  # (n,)
    if not bool(different.any()):
        return None
    flat = int(different.nonzero()[0])
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(original.shape)))
    was = original.detach().reshape(-1)[flat].item()
    now = copy.detach().reshape(-1)[flat].item()
    return (f"fn changed its input {name}: at index {index} it was {was!r}, now {now!r} "
            f"({int(different.sum())} of {original.numel()} elements changed); a kernel must "
            f"not write into its inputs")


def changed_inputs(originals: dict, copies: dict) -> list:
    """A line per input of `copies` (the candidate's) that differs from `originals`."""
    lines = (first_change(name, originals[name], copy) for name, copy in copies.items())
    return [line for line in lines if line]


def input_device(inputs: dict) -> torch.device | None:
    """The device the inputs of a case were made on (every output must be there too)."""
    for value in inputs.values():
        if isinstance(value, torch.Tensor):
            return value.device
        if isinstance(value, nf4.NF4Weight):
            return value.packed.device
    return None


def placement_problem(name: str, have, device, dtype, shape) -> str | None:
    """A line if output `name` is not a tensor of `dtype` and `shape` on `device` (else None)."""
    if isinstance(have, torch.Tensor) and have.device == device and have.dtype == dtype \
            and have.shape == shape:
        return None
    return f"{name}: expected {dtype} {tuple(shape)} on {device}, got {_place(have)}"


def _place(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {tuple(value.shape)} on {value.device}"
    return f"{type(value).__name__} {value!r}"[:80]
