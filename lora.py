"""LoRA: low-rank adaptation of a frozen linear layer, and the adapter plumbing DoRA and VeRA share.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685, section 4.1.
The pretrained weight W0 (out, in) stays frozen; a rank-r update is learned beside it:

    h = W0 x + b + (alpha / r) B A x          A: (r, in), B: (out, r)        (paper eq. 3)

A starts Kaiming-uniform and B at zero, so a fresh adapter leaves the layer unchanged (section 4.1:
"zero for B, so ΔW = BA is zero at the beginning of training"). rsLoRA (Kalajdzievski 2023,
arXiv 2312.03732) scales by alpha / sqrt(r) instead, so the update's size does not shrink with r.
After training, W = W0 + (alpha / r) B A is a plain linear again: no extra inference cost.
Per adapted layer LoRA trains r * (in + out) parameters instead of in * out.

Shapes follow torch.nn.Linear: weight (out, in), y = x W^T + b. The paper writes W0 x with W0 of
shape (d, k) = (out, in), the same layout. Letters: N tokens (all leading dims flattened), r rank.

Plumbing (used by dora.py and vera.py): `find_targets`, `replace_targets`,
`mark_only_adapters_trainable`, `adapter_state_dict`, `load_adapter`, `merge_adapters`,
`atomic_save`. Every adapter is an `AdapterLinear`: it wraps a `base` module that has `in_features`,
`out_features`, a forward, and either a dense `weight` (nn.Linear) or a `dequantized_weight()`
(a quantized base such as qlora.NF4Linear, which also sets `linear_like = True`).
"""
from __future__ import annotations

import copy
import math
import os
import tempfile
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

ALL_LINEAR = "all-linear"
# Linears that "all-linear" leaves alone: the output head (PEFT excludes it too; adapting the
# vocabulary projection is a different method than adapting the blocks).
EXCLUDED_FROM_ALL_LINEAR = ("lm_head",)


# ---------------------------------------------------------------------------------------------------
# Pure functions: what an oracle user calls.

def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW = scaling · B A, shape (out, in)."""
    return scaling * (B @ A)  # (out, r) @ (r, in) -> (out, in)


def add_low_rank_(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                  scaling: float) -> torch.Tensor:
    """y += scaling · x A^T B^T in y's memory, for y (N, out), x (N, in); returns y.

    One BLAS call, the scaling applied to the small matmul, and no new (N, out) tensor. With
    `torch.addmm`, which copies y first, a LoRA step of the tiny GPT took 1.00-1.06x the time of full
    fine-tuning on the CPU; in place, 0.96-0.98x (bench.py). So y must be a tensor nothing else holds,
    such as a base layer's fresh output (autograd raises if a backward needs it). If y's dtype is
    not the adapter's (bfloat16 base, float32 adapters), the sum is taken in a copy and rounded back.
    """
    if y.dtype != A.dtype:
        return add_low_rank_(y.to(A.dtype), x, A, B, scaling).to(y.dtype)
    xa = x.to(A.dtype) @ A.t()  # (N, in) @ (in, r) -> (N, r)
    # h = W0 x + s B A x   (LoRA, eq. 3), with W0 x + b already in y
    return y.addmm_(xa, B.t(), alpha=scaling)  # (N, out) += s (N, r) @ (r, out)


def add_low_rank(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 scaling: float) -> torch.Tensor:
    """y + scaling · x A^T B^T for y (..., out), x (..., in), in y's dtype: y is left unchanged."""
    out = y.reshape(-1, y.shape[-1]).to(A.dtype, copy=True)  # (N, out): y itself is left alone
    add_low_rank_(out, x.reshape(-1, x.shape[-1]), A, B, scaling)
    return out.view(y.shape).to(y.dtype)


def lora_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                 B: torch.Tensor, scaling: float,
                 dropout: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """h = x W^T + b + scaling · d(x) A^T B^T, with d the dropout (identity when None)."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    y = F.linear(x2, weight, bias)  # (N, out), fresh: the low-rank term goes into it in place
    dx2 = x2 if dropout is None else dropout(x).reshape(x2.shape)  # (N, in): d(x)
    y = add_low_rank_(y, dx2, A, B, scaling)
    return y.view(*x.shape[:-1], y.shape[-1])  # (..., out)


def lora_scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """alpha / r (LoRA, section 4.1), or alpha / sqrt(r) (rsLoRA)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def check_rank(r) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"r (the rank) must be an int >= 1, got {r!r}")


def check_dropout(dropout) -> None:
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")


def adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Adapters train in the base's dtype when it is float32/float64, else in float32: beside a
    low-precision or quantized base (the QLoRA recipe: 16/32-bit adapters beside a 4-bit base)."""
    return weight_dtype if weight_dtype in (torch.float32, torch.float64) else torch.float32


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight as a dense (out, in) tensor: `weight`, or `dequantized_weight()`."""
    if hasattr(base, "dequantized_weight"):
        return base.dequantized_weight()
    return base.weight


# ---------------------------------------------------------------------------------------------------
# The adapter layers.

class AdapterLinear(nn.Module):
    """What every adapter shares: a frozen `base`, its shapes, and merge bookkeeping.

    Subclasses name their trainable tensors in `adapter_parameter_names` and implement
    `delta_weight()`; the additive `merge()`/`unmerge()` here then work for them. Merging happens only
    through an explicit call, never in `train()`/`eval()`, and is idempotent.
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
        base.requires_grad_(False)  # "W0 is frozen and does not receive gradient updates" (sec. 4.1)
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
            raise TypeError(f"cannot merge in place into a {type(self.base).__name__}: its weight is "
                            "not a dense tensor; use merge_adapters(model), which builds plain linears")
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


class LoRALinear(AdapterLinear):
    """`base(x) + scaling · B A dropout(x)`, with `lora_A` (r, in) and `lora_B` (out, r)."""
    adapter_parameter_names = ("lora_A", "lora_B")

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, generator: torch.Generator | None = None):
        super().__init__(base)
        check_rank(r)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0 \
                or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        check_dropout(dropout)
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = lora_scaling(r, alpha, rslora)
        W = dense_weight(base)
        dtype = adapter_dtype(W.dtype)
        # A like nn.Linear's default init (Kaiming-uniform, a = sqrt(5)); B = 0 so ΔW = 0 at start.
        # Drawn on the CPU so that a seed gives the same A on every device.
        A = torch.empty(r, self.in_features, dtype=dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(A.to(W.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=W.device, dtype=dtype))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        return lora_delta(self.lora_A, self.lora_B, self.scaling)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in); a wrong width is the base's error to raise
        y = self.base(x2)  # (N, out): W0 x + b (+ ΔW x when merged), a fresh tensor
        if not self.merged:
            dx2 = self.lora_dropout(x).reshape(x2.shape)  # (N, in): dropout sees x's own shape
            y = add_low_rank_(y, dx2, self.lora_A, self.lora_B, self.scaling)
        return y.view(*x.shape[:-1], self.out_features)  # (..., out)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, rslora={self.rslora}"


# ---------------------------------------------------------------------------------------------------
# Plumbing: find, replace, freeze, save, load, merge.

def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or getattr(module, "linear_like", False)


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
        raise ValueError(f"targets must be 'all-linear' or non-empty name suffixes, got {targets!r}")
    names = []
    for suffix in targets:
        matched = [n for n in modules if n == suffix or n.endswith("." + suffix)]
        if not matched:
            raise ValueError(f"targets: {suffix!r} matches no module of the model")
        for n in matched:
            if isinstance(modules[n], AdapterLinear):
                raise ValueError(f"targets: {n!r} already carries an adapter")
            if not is_linear_like(modules[n]):
                raise TypeError(f"targets: {n!r} is a {type(modules[n]).__name__}, not a linear layer")
        names.extend(matched)
    order = {n: i for i, n in enumerate(modules)}
    return sorted(set(names), key=order.__getitem__)


def replace_targets(model: nn.Module, targets, factory: Callable[[nn.Module], nn.Module]) -> list[str]:
    """Replace each target linear by `factory(linear)`, in place; return the replaced names."""
    names = find_targets(model, targets)
    if "" in names:
        raise ValueError("model is itself a linear layer: wrap it directly (e.g. LoRALinear(model, ...))")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, factory(getattr(parent, child)))
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
    for name in list(adapter_layers(merged)):
        parent_name, _, child = name.rpartition(".")
        parent = merged.get_submodule(parent_name)
        setattr(parent, child, getattr(parent, child).to_linear())
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


def apply_lora(model: nn.Module, targets=ALL_LINEAR, r: int = 8, alpha: float = 16.0,
               dropout: float = 0.0, rslora: bool = False, seed: int | None = None) -> nn.Module:
    """Wrap the target linears in LoRALinear, freeze everything else; returns `model` (in place).

    `seed` draws every lora_A from one torch.Generator in model order (None: the global RNG).
    """
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    replace_targets(model, targets,
                    lambda base: LoRALinear(base, r, alpha, dropout, rslora, generator=generator))
    mark_only_adapters_trainable(model)
    return model
