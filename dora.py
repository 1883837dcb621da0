"""DoRA: LoRA on the direction of each weight row, plus a trainable magnitude per row.

Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353. Section 3.2
writes a weight as magnitude times direction, W = m V / ||V||_c (eq. 2, as weight normalization
does); section 4.1 trains the magnitude m directly and the direction with LoRA (eq. 5):

    W' = m ⊙ V / ||V||,   V = W0 + s B A,   m initialised to ||W0||,   s = alpha / r

Eq. 5 writes V = W0 + B A: the scale s is LoRA's (its section 4.1 text), which PEFT applies to
DoRA's update too; it is folded in here.
||.||_c is "the vector-wise norm of a matrix across each column" (section 3.2), with W of shape
(d, k); the paper does not say which of d and k is the output, so the layout is ambiguous (LoRA,
which DoRA builds on, has W0 x with W0 (d, k) = (out, in), which would make the norms per input).
We follow PEFT: one norm per output, the norm of each *row* of this project's nn.Linear layout
(out, in), and m has shape (out,). Below, "⊙" scales row i of a matrix, or column i of
activations, by entry i of an (out,) vector. A fresh adapter has B = 0, so V = W0 and
m = ||V||: W' = W0, the base.

The forward, without building W' for the activations (`dora_forward`; this form is ours, not the
paper's: its section 4.3 is the detached norm). With n = ||V|| and g = m / n, both (out,), the
update is ΔW = W' − W0 = g ⊙ V − W0 = (g − 1) ⊙ W0 + g ⊙ s B A.
Dropout d acts, as in LoRA, on the input of the update only; the frozen path W0 x + b sees x:

    y = W0 x + b + ΔW d(x) = W0 x + b + (g − 1) ⊙ W0 d(x) + g ⊙ s B A d(x)          (F)

The bias belongs to the frozen path and is not rescaled (as in PEFT, and as in the merged layer
W' x + b). Regrouping (F) gives the cheapest exact forms, with V d(x) = W0 d(x) + s B (A d(x)):
  * no dropout (p = 0, or eval mode): d(x) = x and y = g ⊙ V x + b. One big GEMM for W0 x, the
    rank-r pair fused into it by one addmm, a product and a sum: LoRA's GEMMs, plus the row norm
    (its cost does not grow with the number of tokens) and elementwise passes over (N, out).
  * dropout: y = W0 (x − d(x)) + b + g ⊙ V d(x). Two big GEMMs, as x and d(x) differ.
Autograd through x W'^T would instead build the dense (out, in) gradient of W' in the backward,
a GEMM as large as full fine-tuning's, which is what low-rank adaptation exists to avoid.

Detached norm (section 4.3): the paper treats ||V|| as a constant in backpropagation; it follows
B and A in the forward but gets no gradient, which drops the projection that section 4.2's
gradient of V applies to each row (eq. 6); m's gradient (eq. 7) is unchanged, as m is not in the
norm (`dora_grads` computes both forms). Here the norm is computed under torch.no_grad(): no graph
is kept for V, and the backward is LoRA's with the output gradient scaled row by row by m / ||V||,
plus one (out,) reduction for m's gradient.
`detach_norm=False` keeps the norm in the graph (the exact gradient of eq. 5): autograd then
saves V, an (out, in) tensor per adapted layer (a second copy of every adapted weight), until the
backward, and builds a dense (out, in) gradient along V for the norm, which it sends through the
addmm into A and B (two more GEMMs of size out · in · r).

Zero rows: where a row of V is all zeros, ||V|| = 0 and m / ||V|| is 0 / 0 (PEFT returns NaN
there: its issue 2049). The norm is taken as max(||V||, DORA_NORM_EPS), as
torch.nn.functional.normalize does, so rows with ||V|| >= DORA_NORM_EPS are computed exactly as
without it. A zero row of W0 gets m = 0: its output stays b, and neither m nor that row of B gets
a gradient. DoRA gives a zero vector no direction to learn, so the row stays zero (not NaN).

Per adapted layer DoRA trains r (in + out) + out parameters: LoRA's plus m.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapters import ALL_LINEAR, dense_weight, mark_only_adapters_trainable, replace_targets
from checks import check_bool, check_tensor
from fast_paths.low_rank import add_low_rank_
from lora import LoRALinear, check_targets_rank

# Floor on the row norm ||V|| in m / ||V||. 1e-12 is torch.nn.functional.normalize's eps; it is a
# normal number in float32, float64 and bfloat16, and leaves every row with ||V|| >= 1e-12 exact.
DORA_NORM_EPS = 1e-12


# --------------------------------------------------------------------------------------------------
# The math, in the paper's order: what an oracle user calls. No checks here: the layer built its
# tensors itself, and a caller passing its own checks them once with check_dora_inputs.
# Letters: N tokens (leading dims flattened), r rank.

def dora_direction(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   scaling: float) -> torch.Tensor:
    """V = W0 + s B A, (out, in), in the adapters' dtype, in one fused addmm."""
    return torch.addmm(weight.to(A.dtype), B, A, alpha=scaling)  # (out, in) + (out, r) @ (r, in)


def row_norm(V: torch.Tensor) -> torch.Tensor:
    """max(||V_i||, DORA_NORM_EPS) for each row i: the paper's column norm ||V||_c, shape (out,)."""
    return torch.linalg.vector_norm(V, dim=1).clamp_min(DORA_NORM_EPS)  # (out, in) -> (out,)


def dora_weight(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor,
                scaling: float, detach_norm: bool = True) -> torch.Tensor:
    """W' = m ⊙ V / ||V|| with V = W0 + s B A (eq. 5): (out, in), in the adapters' dtype.

    With `detach_norm` the norm is a constant for autograd (section 4.3), as in `dora_forward`.
    """
    V = dora_direction(weight, A, B, scaling)  # (out, in)
    norm = row_norm(V)  # (out,)
    if detach_norm:
        norm = norm.detach()
    return (magnitude / norm).unsqueeze(1) * V  # (out, 1) * (out, in): W' = m ⊙ V / ||V||


def dora_grads(V: torch.Tensor, magnitude: torch.Tensor, grad_weight: torch.Tensor,
               detach_norm: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(∇_m L, ∇_V L) of W' = m ⊙ V / ||V|| from G = ∇_W' L (section 4.2, eq. 6 and 7; 4.3).

    V = W0 + s B A (out, in) is the paper's V' = W0 + ΔW, magnitude m (out,), grad_weight G
    (out, in). Returns ∇_m L (out,) and ∇_V L (out, in). The norm is per row of V (row_norm), the
    paper's column norm: row i here is the paper's column i. With `detach_norm` (section 4.3) the
    norm is a constant for autograd. A row whose norm is under DORA_NORM_EPS has the constant
    floor as its norm. LoRA's factors follow by the chain rule through V = W0 + s B A.
    """
    # With n = ||V||, g = m / n and c = Σ_in G ⊙ V (out,), the part of each row of G along V:
    #     ∇_m L = c / n                                              (out,)      (eq. 7)
    #     ∇_V L = g ⊙ (G − (c / n^2) ⊙ V) = g ⊙ (I − V V^T / n^2) G  (out, in)   (eq. 6)
    # The projection drops G's component along V: moving V along itself changes only ||V||, which
    # the division cancels. `detach_norm`: n is a constant, ∇_V L = g ⊙ G; ∇_m L is the same (m is
    # not in n). Under the floor, n does not follow V: no projection there.
    # LoRA's factors: ∇_B = s ∇_V A^T, ∇_A = s B^T ∇_V.
    norm = row_norm(V)  # (out,)
    c = (grad_weight * V).sum(dim=1)  # (out, in) -> (out,): <G_i, V_i> for each row i
    grad_magnitude = c / norm  # (out,)   (eq. 7)
    g = (magnitude / norm).unsqueeze(1)  # (out, 1): m / ||V||
    if detach_norm:
        return grad_magnitude, g * grad_weight  # (out, in)   (section 4.3)
    unfloored = torch.linalg.vector_norm(V, dim=1) >= DORA_NORM_EPS  # (out,): n follows V there
    along_V = torch.where(unfloored, c / norm**2, 0.0).unsqueeze(1)  # (out, 1): c / n^2
    return grad_magnitude, g * (grad_weight - along_V * V)  # (out, in)   (eq. 6)


def dora_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor, scaling: float,
                 dropout: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 detach_norm: bool = True) -> torch.Tensor:
    """y = W0 x + b + (m/||V|| − 1) ⊙ W0 d(x) + (m/||V||) ⊙ s B A d(x), d the dropout (None: none).

    With `dropout` None this is x W'^T + b for W' = `dora_weight(...)`, in value and in gradient
    for the same `detach_norm`; the module docstring derives it. The frozen GEMM runs in the
    weight's dtype (x and b are cast to it, as a quantized base computes in its compute dtype),
    the rest in the adapters' dtype; y is returned in x's dtype.
    """
    with torch.no_grad() if detach_norm else contextlib.nullcontext():
        norm = row_norm(dora_direction(weight, A, B, scaling))  # (out,): ||W0 + s B A|| per row
    g = magnitude / norm  # (out,): m / ||V||
    tokens = x.reshape(-1, x.shape[-1])  # (N, in)
    dropped = tokens if dropout is None else dropout(x).reshape(tokens.shape)  # (N, in): d(x)
    frozen = F.linear(dropped.to(weight.dtype), weight)  # (N, in) @ (in, out) -> (N, out): W0 d(x)
    # V d(x) = W0 d(x) + s B A d(x), added in place into the fresh `frozen` (fast_paths/low_rank.py;
    # equal to lora.lora_forward's sum: tests/test_lora.py::test_forward_equals_formula)
    direction = add_low_rank_(frozen.to(A.dtype), dropped, A, B, scaling)  # (N, out)
    if dropout is None:
        rest = bias  # y = g ⊙ V x + b   ((F) with d(x) = x)
    else:
        # W0 (x − d(x)) + b: the frozen path on x, less the W0 d(x) that g ⊙ V d(x) holds
        b = None if bias is None else bias.to(weight.dtype)
        rest = F.linear((tokens - dropped).to(weight.dtype), weight, b)  # (N, out)
    # y = rest + (m/||V||) ⊙ V d(x)   (F); a product, then a sum: torch.addcmul would fuse them on
    # AVX2 builds and not on others, and the oracle's golden values must not depend on the build
    y = g * direction if rest is None else rest.to(A.dtype) + g * direction
    return y.view(*x.shape[:-1], -1).to(x.dtype)  # (..., out)


# --------------------------------------------------------------------------------------------------
# The door for tensors a caller brings to the math above (the oracle kit, a reader's experiment).

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


# --------------------------------------------------------------------------------------------------
# The layer.

class DoRALinear(LoRALinear):
    """LoRALinear plus `magnitude` (out,): y = m ⊙ (W0 + s B A) / ||W0 + s B A|| x + b.

    A, B, scaling (alpha/r, or alpha/sqrt(r) with rslora), dropout, init and the generator come
    from LoRALinear. `magnitude` starts at the norm of each output row of W0, which is the paper's
    column norm ||W0||_c of its (in, out)-shaped W (section 4.1), so a fresh adapter computes the
    base layer. `detach_norm` (default True, section 4.3) treats ||V|| as a constant in
    backpropagation; False keeps it in the graph (more memory; see the module docstring).

    `merge()` writes W' into the base weight and keeps a copy of W0, which `unmerge()` restores
    bit for bit. (PEFT keeps ||V|| instead and divides by m / ||V||, which rounds, and cannot
    restore a row with m = 0.)
    """
    adapter_parameter_names = ("lora_A", "lora_B", "magnitude")

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, generator: torch.Generator | None = None, *,
                 detach_norm: bool = True):
        super().__init__(base, r, alpha, dropout, rslora, generator)
        self.detach_norm = check_bool(detach_norm, "detach_norm")
        W0 = dense_weight(base).detach().to(self.lora_A.dtype)
        # m = ||W0||_c (section 4.1). With B = 0 the forward's ||V|| is this same value, bit for
        # bit, so m / ||V|| = 1 exactly (and 0 / eps = 0 on a zero row).
        self.magnitude = nn.Parameter(torch.linalg.vector_norm(W0, dim=1))  # (out,)
        # W0 while merged, else None (then not in the state dict): a merged model's state dict
        # holds it, so it loads as merged and unmerges exactly.
        self.register_buffer("_unmerged_weight", None)

    def _base_weight(self) -> torch.Tensor:
        """W0, the frozen base weight, whether or not W' is merged into the base."""
        return self._unmerged_weight if self.merged else dense_weight(self.base)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = W' − W0, (out, in) in the adapters' dtype: W0 + ΔW is the DoRA weight."""
        W0 = self._base_weight()
        return dora_weight(W0, self.lora_A, self.lora_B, self.magnitude, self.scaling,
                           self.detach_norm) - W0.to(self.lora_A.dtype)

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W' = m ⊙ V / ||V||, (out, in), merged or not, in `dtype` (default: the base weight's)."""
        W = dense_weight(self.base)
        if not self.merged:
            W = dora_weight(W, self.lora_A, self.lora_B, self.magnitude, self.scaling,
                            self.detach_norm)
        return W.to(dtype or dense_weight(self.base).dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W' in the base weight's dtype, keeping W0 for `unmerge`. Idempotent."""
        if self.merged:
            return
        W = self._mergeable_weight()
        merged = dora_weight(W, self.lora_A, self.lora_B, self.magnitude, self.scaling)
        self._unmerged_weight = W.clone()
        W.copy_(merged.to(W.dtype))
        self._set_merged(True)

    @torch.no_grad()
    def unmerge(self) -> None:
        """W' <- W0, restored bit for bit from the copy `merge` kept. Idempotent."""
        if not self.merged:
            return
        self._check_unchanged_since_merge()
        self._mergeable_weight().copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self._set_merged(False)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        # A merged state holds W0: make room for it, so the loader copies it in (and checks it).
        key = prefix + "_unmerged_weight"
        if bool(state_dict.get(prefix + "adapter_merged", False)) and key not in state_dict:
            raise ValueError(f"state dict for DoRALinear {prefix!r} is merged but holds no "
                             f"{key!r} (W0), so it could never be unmerged")
        if key in state_dict and self._unmerged_weight is None:
            self._unmerged_weight = torch.empty_like(dense_weight(self.base))
        super()._load_from_state_dict(state_dict, prefix, *args)
        if not self.merged:
            self._unmerged_weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self.merged:
            return self.base(x)  # W' x + b
        # nn.Dropout is the identity in eval mode: take the one-GEMM form of (F) then.
        dropout = None if isinstance(self.lora_dropout, nn.Identity) or not self.training \
            else self.lora_dropout
        return dora_forward(x, dense_weight(self.base), getattr(self.base, "bias", None),
                            self.lora_A, self.lora_B, self.magnitude, self.scaling, dropout,
                            self.detach_norm)

    def adapter_config(self) -> dict:
        return dict(super().adapter_config(), use_dora=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, detach_norm={self.detach_norm}"


def apply_dora(model: nn.Module, targets=ALL_LINEAR, r: int = 8, alpha: float = 16.0,
               dropout: float = 0.0, rslora: bool = False, seed: int | None = None,
               detach_norm: bool = True) -> nn.Module:
    """Wrap the target linears in DoRALinear, freeze everything else; returns `model` (in place).

    `seed` draws every lora_A from one torch.Generator in model order (None: the global RNG), so
    the same seed gives the same A as `lora.apply_lora`. Trainable per layer: r (in + out) + out.
    """
    names = check_targets_rank(model, targets, r)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    replace_targets(model, names, lambda base: DoRALinear(
        base, r, alpha, dropout, rslora, generator, detach_norm=detach_norm))
    mark_only_adapters_trainable(model)
    return model
