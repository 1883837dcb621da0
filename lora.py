"""LoRA: low-rank adaptation of a frozen linear layer.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685, section 4.1.
The pretrained weight W0 (out, in) stays frozen; a rank-r update is learned beside it:

    h = W0 x + b + (alpha / r) B A x          A: (r, in), B: (out, r)        (paper eq. 3)

Eq. 3 reads h = W0 x + ΔW x = W0 x + B A x; the scale s = alpha / r is in the text below it
("We then scale ΔW x by alpha / r"), so eq. 3 is written here with s folded in.
B starts at zero, so a fresh adapter leaves the layer unchanged (section 4.1: "zero for B, so ΔW =
BA is zero at the beginning of training"). Section 4.1 draws A from a Gaussian; we draw it
Kaiming-uniform (a = sqrt(5), nn.Linear's default), as PEFT does: a deviation (docs/lora.md).
rsLoRA (Kalajdzievski 2023, arXiv 2312.03732) scales by alpha / sqrt(r) instead, so the update's
size does not shrink with r.
After training, W = W0 + (alpha / r) B A is a plain linear again: no extra inference cost.
Per adapted layer LoRA trains r * (in + out) parameters instead of in * out.

Shapes follow torch.nn.Linear: weight (out, in), y = x W^T + b. The paper writes W0 x with W0 of
shape (d, k) = (out, in), the same layout. Letters: N tokens (all leading dims flattened), r rank.

The plumbing every adapter shares (finding targets, freezing, merging, files) is in adapters.py.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapters import (
    ALL_LINEAR,
    AdapterLinear,
    adapter_dtype,
    dense_weight,
    find_targets,
    mark_only_adapters_trainable,
    replace_targets,
)
from checks import check_bool, check_number, check_probability, check_rank
from fast_paths.low_rank import add_low_rank_

# --------------------------------------------------------------------------------------------------
# The math, in the paper's order: what an oracle user calls.


def lora_scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """alpha / r (LoRA, section 4.1), or alpha / sqrt(r) (rsLoRA)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW = scaling · B A, shape (out, in)."""
    return scaling * (B @ A)  # (out, r) @ (r, in) -> (out, in)


def lora_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                 B: torch.Tensor, scaling: float,
                 dropout: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """h = x W0^T + b + scaling · d(x) A^T B^T (eq. 3), d the dropout (None: none), for x (..., in).

    The sum is taken in the adapters' dtype and returned in x's dtype, as LoRALinear does.
    """
    dropped = x if dropout is None else dropout(x)  # d(x): the update's input only
    frozen = F.linear(x, weight, bias)  # (..., out): W0 x + b
    update = (dropped.to(A.dtype) @ A.t()) @ B.t()  # (..., in) @ (in, r) @ (r, out) -> (..., out)
    return (frozen.to(A.dtype) + scaling * update).to(x.dtype)


def lora_grads(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
               scaling: float, grad_out: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/dA, dL/dB) of eq. 3 without dropout, by the chain rule, given grad_out = dL/dh.

    x (..., in), weight W0 (out, in), A (r, in), B (out, r), scaling s, grad_out (..., out), all
    in one floating dtype. Returns dL/dx of x's shape, dL/dA (r, in) and dL/dB (out, r). W0 and b
    are frozen (section 4.1): they get none. The bias does not enter the gradients.
    """
    # With G = dL/dh (N, out) and X (N, in), the tokens as rows (sums over tokens are the matmuls):
    #     dL/dB = s G^T (X A^T)       (out, r): the output side sees A x
    #     dL/dA = s (G B)^T X         (r, in):  the gradient reaching the rank-r bottleneck, G B
    #     dL/dx = G W0 + s (G B) A    (..., in): the frozen path passes its gradient on too
    X = x.reshape(-1, x.shape[-1])  # (N, in)
    G = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
    GB = G @ B  # (N, out) @ (out, r) -> (N, r)
    grad_B = scaling * G.t() @ (X @ A.t())  # (out, N) @ (N, r) -> (out, r)
    grad_A = scaling * GB.t() @ X  # (r, N) @ (N, in) -> (r, in)
    grad_x = G @ weight + scaling * GB @ A  # (N, out) @ (out, in) + (N, r) @ (r, in) -> (N, in)
    return grad_x.view(x.shape), grad_A, grad_B


# --------------------------------------------------------------------------------------------------
# The layer.

class LoRALinear(AdapterLinear):
    """`base(x) + scaling · B A dropout(x)`, with `lora_A` (r, in) and `lora_B` (out, r)."""
    adapter_parameter_names = ("lora_A", "lora_B")

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, generator: torch.Generator | None = None):
        super().__init__(base)  # checks base first: the rank check needs its widths
        check_rank(r, self.in_features, self.out_features, "the base layer")
        check_number(alpha, "alpha", low=0, low_open=True)
        check_probability(dropout, "dropout")
        check_bool(rslora, "rslora")
        self.r = r
        self.alpha = alpha
        self.rslora = rslora
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
        self.check_input(x)
        tokens = x.reshape(-1, x.shape[-1])  # (N, in): check_input checked its width
        y = self.base(tokens)  # (N, out): W0 x + b (+ ΔW x when merged), a fresh tensor
        if not self.merged:
            dropped = self.lora_dropout(x).reshape(tokens.shape)  # (N, in): d(x), on x's shape
            # lora_forward's eq. 3, added in place into the fresh y (fast_paths/low_rank.py; equal
            # within FAST_PATH_TOL: tests/test_lora.py::test_forward_equals_formula)
            y = add_low_rank_(y, dropped, self.lora_A, self.lora_B, self.scaling)
        return y.view(*x.shape[:-1], self.out_features)  # (..., out)

    def adapter_config(self) -> dict:
        dropout = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0
        return {"peft_type": "LORA", "r": self.r, "lora_alpha": self.alpha,
                "use_rslora": self.rslora, "use_dora": False, "lora_dropout": dropout}

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, rslora={self.rslora}"


def check_targets_rank(model: nn.Module, targets, r) -> list[str]:
    """find_targets, and check_rank against each target before anything is allocated."""
    names = find_targets(model, targets)
    for name in names:
        layer = model.get_submodule(name)
        check_rank(r, layer.in_features, layer.out_features, repr(name))
    return names


def apply_lora(model: nn.Module, targets=ALL_LINEAR, r: int = 8, alpha: float = 16.0,
               dropout: float = 0.0, rslora: bool = False, seed: int | None = None) -> nn.Module:
    """Wrap the target linears in LoRALinear, freeze everything else; returns `model` (in place).

    `seed` draws every lora_A from one torch.Generator in model order (None: the global RNG).
    """
    names = check_targets_rank(model, targets, r)
    check_number(alpha, "alpha", low=0, low_open=True)  # before any layer is touched
    check_probability(dropout, "dropout")
    check_bool(rslora, "rslora")
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    replace_targets(model, names,
                    lambda base: LoRALinear(base, r, alpha, dropout, rslora, generator=generator))
    mark_only_adapters_trainable(model)
    return model
