"""What a QLoRA run stores, in bytes, counted from the tensors themselves (tier 2).

The accounting behind train.py's memory lines and bench.py's memory rows: the NF4 storage of
qlora.NF4Linear layers, the adapters, gradients and the optimizer's state (PagedAdamW's pages
wherever they lie). Moved out of qlora.py, which holds the paper's equations and the layer.
"""
import torch
import torch.nn as nn

import adapters
from paged_optim import PagedAdamW
from qlora import NF4Linear


def _tensor_groups(model: nn.Module):
    """Weights stored in NF4; {id: (name, tensor)} of NF4 storage; {id: tensor} of adapters, all."""
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    storage = {id(getattr(m, n)): (n, getattr(m, n)) for m in layers for n in m._storage_names}
    adapter = {id(t): t for layer in adapters.adapter_layers(model).values()
               for t in (getattr(layer, n) for n in layer.adapter_parameter_names)}
    everything = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(m.in_features * m.out_features for m in layers), storage, adapter, everything


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of the optimizer's state tensors (not scalar step counters), wherever they are."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                total += value.nbytes
            elif isinstance(value, list):  # PagedAdamW's pages
                total += sum(page.nbytes for page in value if page.location != "unallocated")
    return total


def qlora_memory_report(model: nn.Module, optimizer=None) -> dict:
    """Bytes of each kind of stored tensor, each counted once: nf4_weights (packed codes),
    nf4_statistics (absmax or its codes, nested absmax, offset), other_weights (every other
    parameter or buffer but the adapters), adapters, gradients, optimizer_state and, for PagedAdamW,
    optimizer_state_on_device; then quantized_parameters and their bits_per_parameter."""
    quantized, storage, adapter, everything = _tensor_groups(model)
    report = dict(
        nf4_weights=sum(t.nbytes for n, t in storage.values() if n == "packed"),
        nf4_statistics=sum(t.nbytes for n, t in storage.values() if n != "packed"),
        other_weights=sum(t.nbytes for i, t in everything.items()
                          if i not in storage and i not in adapter),
        adapters=sum(t.nbytes for t in adapter.values()),
        gradients=sum(p.grad.nbytes for p in model.parameters() if p.grad is not None),
        optimizer_state=0 if optimizer is None else optimizer_state_bytes(optimizer))
    report["total"] = sum(report.values())
    if isinstance(optimizer, PagedAdamW):
        report["optimizer_state_on_device"] = optimizer.stats.resident_bytes
    report["quantized_parameters"] = quantized
    nf4_bytes = report["nf4_weights"] + report["nf4_statistics"]
    report["bits_per_parameter"] = 8 * nf4_bytes / quantized if quantized else float("nan")
    return report


def dense_weight_bytes(model: nn.Module, dtype: torch.dtype) -> dict:
    """The same base stored densely in `dtype`: quantized_layers (the weights that are NF4 in
    `model`) and base_model (those plus every floating-point tensor that is not an adapter)."""
    quantized, storage, adapter, everything = _tensor_groups(model)
    other = sum(t.numel() for i, t in everything.items()
                if i not in storage and i not in adapter and t.is_floating_point())
    return dict(quantized_layers=quantized * dtype.itemsize,
                base_model=(quantized + other) * dtype.itemsize)
