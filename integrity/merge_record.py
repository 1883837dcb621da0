"""The merge record: what an adapter layer remembers while its update is merged into its weight.

merge() adds ΔW, computed from some tensors (the adapter's `delta_inputs`), into W0. unmerge()
subtracts ΔW computed from the tensors as they are then. If they were edited in between, the
subtraction removes an update that was never added and W0 comes back wrong. So merge() keeps:

- a copy of each tensor (`snapshot`), which unmerge() compares against (`check_unchanged`);
- their SHA-256 (`digest`), a (32,) uint8 buffer that travels in the state dict, so that a merged
  state whose adapter tensors are not those merged into its weight is refused on load
  (`edited_while_merged`).

adapters.AdapterLinear calls these in a few lines; PEFT keeps the same kind of state (its merged
flags). Imports torch and the standard library only (the ground floor).
"""
from __future__ import annotations

import hashlib

import torch

DIGEST_BYTES = 32  # SHA-256


def digest(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """SHA-256 of each name and the raw bytes of its tensor, in order: (32,) uint8 on the CPU."""
    sha = hashlib.sha256()
    for name, tensor in tensors.items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        sha.update(name.encode() + flat.view(torch.uint8).numpy().tobytes())
    return torch.frombuffer(bytearray(sha.digest()), dtype=torch.uint8)


def snapshot(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached copies of the tensors ΔW was computed from, taken at merge()."""
    return {name: tensor.detach().clone() for name, tensor in tensors.items()}


def check_unchanged(remembered: dict[str, torch.Tensor] | None,
                    tensors: dict[str, torch.Tensor]) -> None:
    """ValueError naming the first tensor that differs from its copy taken at merge()."""
    for name, merged_value in (remembered or {}).items():
        now = tensors[name]
        if not torch.equal(now, merged_value.to(now)):
            raise ValueError(f"{name} changed while the adapter was merged: unmerging would "
                             "subtract a ΔW that was never added and leave W0 wrong; put the "
                             "merged values back (or reload the whole state dict) first")


def forgive_missing(state_dict: dict, keys: tuple[str, ...], missing_keys: list[str]) -> None:
    """A state dict saved before these buffers existed (merging was not state) lacks them: that
    is no error, so drop them from `missing_keys`."""
    for key in keys:
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)


def edited_while_merged(saved: torch.Tensor | None, now: torch.Tensor) -> bool:
    """Whether a loaded merged state's digest differs from that of the tensors it loaded."""
    return saved is not None and not torch.equal(saved, now)


def edited_message(layer: str) -> str:
    return (f"{layer}: its adapter tensors are not those merged into its weight (edited while "
            "merged?): unmerging would leave W0 wrong; save the state unmerged")
