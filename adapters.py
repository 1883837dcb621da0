"""What every adapter shares: the adapter base class, finding and replacing target linears,
freezing, adapter state, merging and atomic writes.

LoRA (lora.py), DoRA (dora.py) and VeRA (vera.py) are each an `AdapterLinear`: a module that wraps a
frozen `base` with `in_features`, `out_features`, a forward, and either a dense `weight`
(nn.Linear) or a `dequantized_weight()` (a quantized base such as qlora.NF4Linear, which also sets
`linear_like = True`). A subclass names its trainable tensors in `adapter_parameter_names` and
computes `delta_weight()`; everything here then works for it.
"""
from __future__ import annotations

import copy
import os
import tempfile
from typing import Callable, Iterable

import torch
import torch.nn as nn

ALL_LINEAR = "all-linear"
# Linears that "all-linear" leaves alone: the output head (PEFT excludes it too; adapting the
# vocabulary projection is a different method than adapting the blocks).
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


class AdapterLinear(nn.Module):
    """What every adapter shares: a frozen `base`, its shapes, and merge bookkeeping.

    Subclasses name their trainable tensors in `adapter_parameter_names` and implement
    `delta_weight()`; the additive `merge()`/`unmerge()` here then work for them. Merging happens
    only through an explicit call, never in `train()`/`eval()`, and is idempotent.
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
        # "W0 is frozen and does not receive gradient updates" (LoRA, sec. 4.1)
        base.requires_grad_(False)
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        """The dense weight of the adapted layer, W0 + ΔW, whether or not merged into the base."""
        W = dense_weight(self.base)
        return W if self.merged else W + self.delta_weight().to(W.dtype)

    def _mergeable_weight(self) -> torch.Tensor:
        if not isinstance(getattr(self.base, "weight", None), torch.Tensor) or \
                hasattr(self.base, "dequantized_weight"):
            raise TypeError(f"cannot merge in place into a {type(self.base).__name__}: its weight "
                            "is not a dense tensor; use merge_adapters(model), which builds plain "
                            "linears")
        return self.base.weight

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + ΔW in the base weight's own dtype. A second call does nothing."""
        if self.merged:
            return
        W = self._mergeable_weight()
        W.add_(self.delta_weight().to(W.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W - ΔW. Exact up to one rounding of the sum per element (see README)."""
        if not self.merged:
            return
        W = self._mergeable_weight()
        W.sub_(self.delta_weight().to(W.dtype))
        self.merged = False

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear computing the adapted layer (dtype of the dense base weight)."""
        W = self.merged_weight()
        bias = getattr(self.base, "bias", None)
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                           device=W.device, dtype=W.dtype)
        linear.weight.copy_(W)
        if bias is not None:
            linear.bias.copy_(bias)
        linear.requires_grad_(False)  # the merged model is frozen like the base it came from
        return linear


# --------------------------------------------------------------------------------------------------
# Plumbing: find, replace, freeze, save, load, merge.

def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or getattr(module, "linear_like", False)


def replace_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where the submodule called `name` (e.g. "blocks.0.attn.q_proj") is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def find_targets(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """Qualified names of the linear layers to adapt, in model order.

    `targets` is "all-linear" (every linear but `lm_head`) or name suffixes such as ("q_proj",
    "v_proj"): a module matches when its name is the suffix or ends with "." + suffix.
    """
    modules = dict(model.named_modules())
    if targets == ALL_LINEAR:
        names = [n for n, m in modules.items()
                 if is_linear_like(m) and n.rsplit(".", 1)[-1] not in EXCLUDED_FROM_ALL_LINEAR
                 and not isinstance(modules.get(n.rsplit(".", 1)[0]), AdapterLinear)]
        if not names:
            raise ValueError("targets='all-linear' found no linear layer to adapt")
        return names
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"targets must be 'all-linear' or non-empty name suffixes, "
                         f"got {targets!r}")
    names = []
    for suffix in targets:
        matched = [n for n in modules if n == suffix or n.endswith("." + suffix)]
        if not matched:
            raise ValueError(f"targets: {suffix!r} matches no module of the model")
        for n in matched:
            if isinstance(modules[n], AdapterLinear):
                raise ValueError(f"targets: {n!r} already carries an adapter")
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
    if "" in names:
        raise ValueError("model is itself a linear layer: wrap it directly "
                         "(e.g. LoRALinear(model, ...))")
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


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, keyed "<layer name>.<tensor name>", detached copies."""
    state = {f"{n}.{p}": getattr(layer, p).detach().clone()
             for n, layer in adapter_layers(model).items() for p in layer.adapter_parameter_names}
    if not state:
        raise ValueError("model has no adapter layers")
    return state


@torch.no_grad()
def load_adapter(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy an adapter state dict into the model's adapters, after checking it fits exactly."""
    layers = adapter_layers(model)
    expected = {f"{n}.{p}": getattr(layer, p)
                for n, layer in layers.items() for p in layer.adapter_parameter_names}
    if not expected:
        raise ValueError("model has no adapter layers to load into")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter state does not fit the model: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    for key, param in expected.items():
        if not isinstance(state[key], torch.Tensor) or not state[key].is_floating_point():
            raise TypeError(f"adapter state {key!r} must be a floating-point tensor")
        if not torch.isfinite(state[key]).all():
            raise ValueError(f"adapter state {key!r} contains NaN or Inf")
        if tuple(state[key].shape) != tuple(param.shape):
            raise ValueError(f"adapter state {key!r} has shape {tuple(state[key].shape)}, "
                             f"the model expects {tuple(param.shape)}")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("unmerge the adapters before loading new ones (a merged base would keep "
                         "the old update)")
    for key, param in expected.items():
        param.copy_(state[key])


def merge_adapters(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A model where every adapter layer is replaced by the plain linear it computes.

    The result has exactly the base model's architecture and parameter count. With `inplace=False`
    (the default) the adapted model is left untouched and a copy is returned.
    """
    merged = model if inplace else copy.deepcopy(model)
    for name, layer in list(adapter_layers(merged).items()):
        replace_submodule(merged, name, layer.to_linear())
    return merged


def atomic_save(obj, path: str, write: Callable | None = None) -> None:
    """Save `obj` to a temporary file beside `path`, then os.replace: never a half-written file.

    `write(obj, file)` does the writing; torch.save by default.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "wb") as f:
            (write or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file torch.save's usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
