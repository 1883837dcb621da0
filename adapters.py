"""What every adapter shares: the adapter base class, finding and replacing target linears,
freezing, and merging.

LoRA (lora.py), DoRA (dora.py) and VeRA (vera.py) are each an `AdapterLinear`: a module that wraps a
frozen `base` with `in_features`, `out_features`, a forward, and either a dense `weight`
(nn.Linear) or a `dequantized_weight()` (a quantized base such as qlora.NF4Linear, which also sets
`linear_like = True`). A subclass names its trainable tensors in `adapter_parameter_names`, computes
`delta_weight()` and describes itself for files (`adapter_config`); everything here then works for
it. Adapter directories in PEFT's format (save_adapter, load_adapter, apply_saved_adapter) are in
formats/adapter_files.py; what merge() remembers to refuse an edited merged state is in
integrity/merge_record.py.

Merging is W0 <- W0 + ΔW (LoRA, section 4.1: "we can explicitly compute and store W = W0 + BA");
unmerging subtracts the same ΔW.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch
import torch.nn as nn

from checks import check_features, check_tensor
from integrity import merge_record

ALL_LINEAR = "all-linear"
# Linears that "all-linear" leaves alone: the output head (adapting the vocabulary projection is a
# different method than adapting the blocks). PEFT's "all-linear" excludes it only for transformers
# models; on a plain nn.Module it adapts it too, so PEFT round trips name their targets.
EXCLUDED_FROM_ALL_LINEAR = ("lm_head",)


def adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Adapters train in the base's dtype when it is float32/float64, else in float32: beside a
    low-precision or quantized base (the QLoRA recipe: 16/32-bit adapters beside a 4-bit base)."""
    return weight_dtype if weight_dtype in (torch.float32, torch.float64) else torch.float32


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight as a dense (out, in) tensor: `weight`, or `dequantized_weight()`."""
    if hasattr(base, "dequantized_weight"):
        return base.dequantized_weight()
    return base.weight


def base_dtype(base: nn.Module) -> torch.dtype:
    """The dtype of the linear a base layer is or was made from: what its model's activations are
    in. For a quantized base (qlora.NF4Linear) that is `quantized_weight.dtype`, not the compute
    dtype it dequantizes to."""
    quantized = getattr(base, "quantized_weight", None)
    return quantized.dtype if quantized is not None else dense_weight(base).dtype


class AdapterLinear(nn.Module):
    """What every adapter shares: a frozen `base`, its shapes, and merge bookkeeping.

    Merging happens only through an explicit call, never in `train()`/`eval()`, and is idempotent.
    The merged state is module state: buffer `adapter_merged` travels in `state_dict()`, so a merged
    model's state loads into a fresh adapted model as merged (a state dict without it, from before
    the buffer existed, loads as unmerged). `merge()` keeps a copy of what ΔW was computed from
    (delta_inputs) and `unmerge()` refuses to subtract anything else: editing them while merged is
    an error. Their SHA-256 travels as `adapter_merged_digest`: a merged state dict whose adapter
    tensors are not those merged into its weight (edited while merged, then saved) is refused.
    The machinery is integrity/merge_record.py.
    """
    adapter_parameter_names: tuple[str, ...] = ()

    def __init__(self, base: nn.Module):
        super().__init__()
        for attr in ("in_features", "out_features"):
            if not isinstance(getattr(base, attr, None), int):
                raise TypeError(f"base must have an int `{attr}` (a linear layer), "
                                f"got {type(base).__name__}")
        if isinstance(base, AdapterLinear):
            raise TypeError("base already carries an adapter; adapters do not stack")
        W = check_tensor(dense_weight(base), "base weight")  # refuses meta tensors (no data)
        # "W0 is frozen and does not receive gradient updates" (LoRA, sec. 4.1)
        base.requires_grad_(False)
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.merged = False  # mirrors the buffer, so a forward never reads a (device) tensor
        self.register_buffer("adapter_merged", torch.tensor(False, device=W.device))
        self.register_buffer("adapter_merged_digest",
                             W.new_zeros(merge_record.DIGEST_BYTES, dtype=torch.uint8))
        self._merge_snapshot: dict[str, torch.Tensor] | None = None

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def delta_inputs(self) -> dict[str, torch.Tensor]:
        """The tensors delta_weight() is computed from (VeRA adds its shared pair)."""
        return {name: getattr(self, name) for name in self.adapter_parameter_names}

    def adapter_config(self) -> dict:
        """The PEFT config fields (formats/adapter_files.py) that describe this layer."""
        raise NotImplementedError

    def adapter_metadata(self) -> dict[str, str]:
        """What PEFT does not know about this layer, for the safetensors `__metadata__`."""
        return {}

    def check_input(self, x) -> None:
        check_features(x, self.in_features)

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W0 + ΔW, dense (out, in), merged or not, rounded to `dtype` (default: W0's dtype, with
        the rounding `merge()` does; another dtype sums in the wider of the two first)."""
        W = dense_weight(self.base)
        if self.merged:
            return W.to(dtype or W.dtype)
        delta = self.delta_weight()
        if dtype is None or dtype == W.dtype:
            return W + delta.to(W.dtype)
        wide = torch.promote_types(torch.promote_types(W.dtype, delta.dtype), dtype)
        return (W.to(wide) + delta.to(wide)).to(dtype)

    def _mergeable_weight(self) -> torch.Tensor:
        if not isinstance(getattr(self.base, "weight", None), torch.Tensor) or \
                hasattr(self.base, "dequantized_weight"):
            raise TypeError(f"cannot merge in place into a {type(self.base).__name__}: its weight "
                            "is not a dense tensor; use merge_adapters(model), which builds plain "
                            "linears")
        return self.base.weight

    def _set_merged(self, merged: bool) -> None:
        """Set the flag and the merge record: copies of delta_inputs and their digest."""
        self.merged = merged
        self.adapter_merged.fill_(merged)
        if merged:
            self._merge_snapshot = merge_record.snapshot(self.delta_inputs())
            self.adapter_merged_digest.copy_(merge_record.digest(self.delta_inputs()))
        else:
            self._merge_snapshot = None
            self.adapter_merged_digest.zero_()

    def _check_unchanged_since_merge(self) -> None:
        merge_record.check_unchanged(self._merge_snapshot, self.delta_inputs())

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + ΔW in the base weight's own dtype. A second call does nothing."""
        if self.merged:
            return
        W = self._mergeable_weight()
        W.add_(self.delta_weight().to(W.dtype))
        self._set_merged(True)

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W - ΔW. Exact up to one rounding of the sum per element (see docs)."""
        if not self.merged:
            return
        self._check_unchanged_since_merge()
        W = self._mergeable_weight()
        W.sub_(self.delta_weight().to(W.dtype))
        self._set_merged(False)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        flag = prefix + "adapter_merged"
        digest = prefix + "adapter_merged_digest"
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        merge_record.forgive_missing(state_dict, (flag, digest), missing_keys)
        if flag not in state_dict:
            self.adapter_merged.fill_(False)
        saved = self.adapter_merged_digest.clone() if digest in state_dict else None
        # the record of the tensors loaded now, compared with the one that came with them
        self._set_merged(bool(self.adapter_merged))
        if self.merged and merge_record.edited_while_merged(saved, self.adapter_merged_digest):
            error_msgs.append(merge_record.edited_message(prefix[:-1] or "the layer"))

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain frozen nn.Linear computing the adapted layer in `dtype` (default: base_dtype)."""
        dtype = dtype or base_dtype(self.base)
        W = self.merged_weight(dtype)
        bias = getattr(self.base, "bias", None)
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                           device=W.device, dtype=dtype)
        linear.weight.copy_(W)
        if bias is not None:
            linear.bias.copy_(bias)
        return linear.requires_grad_(False)  # frozen like the base it came from


# --------------------------------------------------------------------------------------------------
# Find, replace, freeze.

def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or getattr(module, "linear_like", False)


def replace_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where the submodule called `name` (e.g. "blocks.0.attn.q_proj") is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def find_targets(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """Qualified names of the linear layers to adapt, in model order; never inside an adapter.

    `targets` is "all-linear" (every linear but `lm_head`) or name suffixes such as ("q_proj",
    "v_proj"): a module matches when its name is the suffix or ends with "." + suffix.
    """
    modules = dict(model.named_modules())
    adapted = [a for a, m in modules.items() if isinstance(m, AdapterLinear)]
    inside = {n for n in modules for a in adapted if n != a and n.startswith(a + "." if a else "")}
    if targets == ALL_LINEAR:
        names = [n for n, m in modules.items() if is_linear_like(m) and n not in inside
                 and n.rsplit(".", 1)[-1] not in EXCLUDED_FROM_ALL_LINEAR]
        if not names:
            raise ValueError("targets='all-linear' found no linear layer to adapt (outside "
                             "adapters and lm_head)")
        if names == [""]:
            raise ValueError("model is itself a linear layer: wrap it directly "
                             "(e.g. LoRALinear(model, ...))")
        return names
    suffixes = (targets,) if isinstance(targets, str) else targets
    if not isinstance(suffixes, Iterable) or not (suffixes := tuple(suffixes)) or \
            not all(isinstance(t, str) and t for t in suffixes):
        raise ValueError(f"targets must be 'all-linear', a name suffix or a list of name "
                         f"suffixes such as ['q_proj', 'v_proj'], got {targets!r}")
    names = []
    for suffix in suffixes:
        matched = [n for n in modules if n == suffix or n.endswith("." + suffix)]
        if not matched:
            raise ValueError(f"targets: {suffix!r} matches no module of the model")
        for n in matched:
            if isinstance(modules[n], AdapterLinear):
                raise ValueError(f"targets: {n!r} already carries an adapter")
            if n in inside:
                raise ValueError(f"targets: {n!r} is part of an adapter; adapters do not nest")
            if not is_linear_like(modules[n]):
                raise TypeError(f"targets: {n!r} is a {type(modules[n]).__name__}, "
                                "not a linear layer")
        names.extend(matched)
    order = {n: i for i, n in enumerate(modules)}
    return sorted(set(names), key=order.__getitem__)


def replace_targets(model: nn.Module, targets,
                    factory: Callable[[nn.Module], nn.Module]) -> list[str]:
    """Replace each target linear by `factory(linear)`, in place; return the replaced names."""
    names = find_targets(model, targets)
    for name in names:
        replace_submodule(model, name, factory(model.get_submodule(name)))
    return names


def adapter_layers(model: nn.Module) -> dict[str, AdapterLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLinear)}


def mark_only_adapters_trainable(model: nn.Module) -> None:
    """Freeze every parameter except the adapters' own (`adapter_parameter_names`)."""
    model.requires_grad_(False)
    for layer in adapter_layers(model).values():
        for pname in layer.adapter_parameter_names:
            getattr(layer, pname).requires_grad_(True)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_adapters(model: nn.Module, inplace: bool = False,
                   dtype: torch.dtype | None = None) -> nn.Module:
    """A model where every adapter layer is replaced by the plain linear it computes.

    The result has the base model's architecture. Each linear is built in `dtype`, by default the
    dtype of the linear the base was made from (`base_dtype`: for a quantized base not its compute
    dtype), so the merged model takes the inputs the adapted one takes. `inplace=False` (default)
    leaves the adapted model untouched and returns a copy.
    """
    merged = model if inplace else copy.deepcopy(model)
    for name, layer in list(adapter_layers(merged).items()):
        replace_submodule(merged, name, layer.to_linear(dtype))
    return merged


# --------------------------------------------------------------------------------------------------
# Adapter state: bare tensor dicts (in memory) and directories in PEFT's format (on disk).

def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, keyed "<layer name>.<tensor name>", detached copies."""
    state = {f"{n}.{p}": getattr(layer, p).detach().clone()
             for n, layer in adapter_layers(model).items() for p in layer.adapter_parameter_names}
    if not state:
        raise ValueError("model has no adapter layers")
    return state
