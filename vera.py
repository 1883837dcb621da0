"""VeRA: one pair of frozen random matrices shared by all adapted layers, scaled by trained vectors.

Kopiczko, Blankevoort, Asano 2023, "VeRA: Vector-based Random Matrix Adaptation", arXiv 2310.11454,
section 3. LoRA (lora.py) trains its own A (r, in) and B (out, r) in every layer. VeRA draws one
random pair, freezes it, shares it among all adapted layers, and trains two vectors per layer:

    h = W0 x + b + Λ_b B Λ_d A x      Λ_d = diag(lambda_d), (r,);  Λ_b = diag(lambda_b), (out,)

(section 3, eq. 2; the paper's vectors d and b are `lambda_d` and `lambda_b` here, `b` is the bias).
Initialisation (section 3, "Initialization strategies"): A and B Kaiming-uniform and frozen;
lambda_b = 0, so a fresh adapter leaves the model unchanged; every element of lambda_d = d_initial.
Per adapted layer VeRA trains r + out numbers, LoRA r (in + out) (section 3, "Parameter count").

Layers differ in shape, so, as in PEFT, A is drawn as (r, max_in) and B as (max_out, r) for the
widest input and output among the targets, and a layer uses the views A[:, :in] and B[:out, :].
The pair is never saved: an adapter directory (formats.adapter_files.save_adapter, PEFT's format
with save_projection = false) holds the vectors, the seed and a SHA-256 of the drawn matrices, so a
load regenerates them and refuses to go on if they came out different.

Shapes follow torch.nn.Linear: weight (out, in), y = x W^T + b; the paper's W0 x has the same (out,
in) layout. Letters: N tokens (leading dims flattened), r rank, in/out the layer's widths.
"""
from __future__ import annotations

import hashlib
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
from checks import check_int, check_number, check_probability, check_rank
from fast_paths.low_rank import add_vera_

# lambda_d's starting value. The paper leaves it a hyperparameter (section 3, "Initialization
# strategies"); 0.1 is PEFT's VeraConfig.d_initial default.
DEFAULT_D_INITIAL = 0.1
# apply_vera's defaults: train.py's VeRA rank (C/2 at the default width), PEFT's default seed
# (VeraConfig.projection_prng_key).
DEFAULT_RANK = 64
DEFAULT_SEED = 0
# Kaiming-uniform as PEFT's vera `_kaiming_init` draws it: std = gain / sqrt(fan_in) with the
# ReLU gain sqrt(2) and fan_in the matrix's second dimension, then U(-bound, bound) with
# bound = sqrt(3) * std (a uniform on [-a, a] has standard deviation a / sqrt(3)).
KAIMING_GAIN = math.sqrt(2)
UNIFORM_BOUND_PER_STD = math.sqrt(3.0)
# torch.Generator.manual_seed takes an unsigned 64-bit seed.
MAX_SEED = 2**64 - 1


# --------------------------------------------------------------------------------------------------
# The math, in the paper's order: what an oracle user calls.

def vera_projections(r: int, max_in: int, max_out: int,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared frozen pair: A (r, max_in) then B (max_out, r), float32, from one generator.

    `torch.Generator().manual_seed(seed)` draws A first, then B, each Kaiming-uniform as PEFT's
    vera `_kaiming_init` draws it (KAIMING_GAIN, fan_in the matrix's second dimension), on the
    CPU: the same seed gives PEFT's `vera_A`/`vera_B` bit for bit (`projection_prng_key`), and the
    same bits on every device. The CPU generator seeds its Mersenne Twister from the seed's low 32
    bits, so seeds that differ by a multiple of 2**32 draw the same pair (PEFT's too).
    """
    generator = torch.Generator().manual_seed(seed)
    drawn = []
    for shape in ((r, max_in), (max_out, r)):  # A first, then B
        std = KAIMING_GAIN / math.sqrt(shape[1])  # fan_in: the second dimension, as in PEFT
        bound = UNIFORM_BOUND_PER_STD * std
        drawn.append(torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound,
                                                                      generator=generator))
    A, B = drawn
    return A, B


def projection_checksum(A: torch.Tensor, B: torch.Tensor) -> str:
    """SHA-256 (hex) of the shapes and float32 bytes of A then B: names the exact matrices."""
    digest = hashlib.sha256()
    for M in (A, B):
        M = M.detach().to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(repr(tuple(M.shape)).encode())
        digest.update(M.numpy().tobytes())
    return digest.hexdigest()


def vera_delta(A: torch.Tensor, B: torch.Tensor, lambda_d: torch.Tensor,
               lambda_b: torch.Tensor) -> torch.Tensor:
    """ΔW = Λ_b B Λ_d A (out, in), for A (r, in), B (out, r), lambda_d (r,), lambda_b (out,)."""
    # Λ_b B Λ_d A = (Λ_b B)(Λ_d A): a diagonal on the left scales rows   (VeRA, eq. 2)
    return (lambda_b[:, None] * B) @ (lambda_d[:, None] * A)  # (out, r) @ (r, in) -> (out, in)


def vera_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                 B: torch.Tensor, lambda_d: torch.Tensor, lambda_b: torch.Tensor,
                 dropout: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """h = W0 x + b + Λ_b B Λ_d A d(x) (eq. 2) for x (..., in), d the dropout (None: none).

    Evaluated right to left, as the equation reads (and as PEFT does); the sum is taken in the
    adapters' dtype and returned in x's dtype, as VeRALinear does.
    """
    dropped = (x if dropout is None else dropout(x)).to(A.dtype)  # d(x), (..., in)
    frozen = F.linear(x, weight, bias).to(A.dtype)  # (..., out): W0 x + b
    scaled = (dropped @ A.t()) * lambda_d  # (..., in) @ (in, r) -> (..., r): Λ_d A d(x)
    return (frozen + (scaled @ B.t()) * lambda_b).to(x.dtype)  # (..., out): + Λ_b B Λ_d A d(x)


def vera_grads(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
               lambda_d: torch.Tensor, lambda_b: torch.Tensor, grad_out: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dλ_d, dL/dλ_b, dL/dx) of eq. 2 without dropout by the chain rule, grad_out = dL/dh.

    x (..., in), weight W0 (out, in), A (r, in), B (out, r), lambda_d (r,), lambda_b (out,),
    grad_out (..., out), all in one floating dtype. Returns dL/dλ_d (r,), dL/dλ_b (out,) and dL/dx
    of x's shape. A, B, W0 and b are frozen (section 3): they get none.
    """
    # With G = dL/dh (N, out), X (N, in) and P = X A^T (N, r), each token's A x, summed over tokens:
    #     dL/dλ_b = Σ_N G ⊙ ((P ⊙ λ_d) B^T)              (out,): G against B Λ_d A x
    #     dL/dλ_d = Σ_N P ⊙ ((G ⊙ λ_b) B)                (r,):   B^T Λ_b G against A x
    #     dL/dx   = G W0 + (((G ⊙ λ_b) B) ⊙ λ_d) A       (..., in): (Λ_b B Λ_d A)^T G, and W0's
    X = x.reshape(-1, x.shape[-1])  # (N, in)
    G = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
    P = X @ A.t()  # (N, in) @ (in, r) -> (N, r): A x
    back = (G * lambda_b) @ B  # (N, out) @ (out, r) -> (N, r): B^T Λ_b G
    grad_b = (G * ((P * lambda_d) @ B.t())).sum(dim=0)  # (N, r) @ (r, out) -> (N, out) -> (out,)
    grad_d = (P * back).sum(dim=0)  # (N, r) -> (r,)
    grad_x = G @ weight + (back * lambda_d) @ A  # (N, out) @ (out, in) + (N, r) @ (r, in)
    return grad_d, grad_b, grad_x.view(x.shape)


# --------------------------------------------------------------------------------------------------
# Checks at the doors (VeRAProjection, VeRALinear, apply_vera).

def check_seed(seed) -> int:
    return check_int(seed, "seed", 0, MAX_SEED)


def check_d_initial(d_initial) -> float:
    """lambda_b starts at 0, so lambda_d = 0 would zero both vectors' gradients for good."""
    if check_number(d_initial, "d_initial (non-zero)") == 0:
        raise ValueError(f"d_initial must be a finite non-zero number, got {d_initial!r}")
    return d_initial


# --------------------------------------------------------------------------------------------------
# The shared matrices and the adapter layer.

class VeRAProjection(nn.Module):
    """The frozen `vera_A` (r, max_in) and `vera_B` (max_out, r) that a model's VeRA layers share.

    Buffers (never trained) and non-persistent (never in a state dict: the seed regenerates them).
    Every VeRALinear registers this one module as its `vera_projection` child and slices it when it
    needs A or B, so `model.to(dtype or device)` converts the pair once (the later visits find it
    converted already) and every layer still reads views of the same two tensors afterwards.
    """

    def __init__(self, r: int, max_in: int, max_out: int, seed: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        check_int(r, "r (the rank)", low=1)
        check_int(max_in, "max_in", low=1)
        check_int(max_out, "max_out", low=1)
        check_seed(seed)
        A, B = vera_projections(r, max_in, max_out, seed)
        self.r = r
        self.max_in = max_in
        self.max_out = max_out
        self.seed = seed
        self.checksum = projection_checksum(A, B)  # of the float32 draw, before any cast or move
        self.register_buffer("vera_A", A.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("vera_B", B.to(device=device, dtype=dtype), persistent=False)

    def extra_repr(self) -> str:
        return f"r={self.r}, max_in={self.max_in}, max_out={self.max_out}, seed={self.seed}"


class VeRALinear(AdapterLinear):
    """`base(x) + Λ_b B Λ_d A dropout(x)`: trains `lambda_d` (r,) and `lambda_b` (out,) only.

    `vera_A` (r, in) and `vera_B` (out, r) are views of the shared `projection`'s matrices.
    """
    adapter_parameter_names = ("lambda_d", "lambda_b")

    def __init__(self, base: nn.Module, projection: VeRAProjection,
                 d_initial: float = DEFAULT_D_INITIAL, dropout: float = 0.0):
        super().__init__(base)
        if not isinstance(projection, VeRAProjection):
            raise TypeError(f"projection must be a VeRAProjection, got {type(projection).__name__}")
        if self.in_features > projection.max_in or self.out_features > projection.max_out:
            raise ValueError(
                f"base layer ({self.in_features} in, {self.out_features} out) is larger than the "
                f"shared matrices (vera_A has {projection.max_in} columns, vera_B "
                f"{projection.max_out} rows); draw them for the largest target, as apply_vera does")
        check_d_initial(d_initial)
        check_probability(dropout, "dropout")
        self.r = projection.r
        self.d_initial = d_initial
        self.vera_projection = projection  # a child shared: the same module in every VeRA layer
        W = dense_weight(base)
        dtype = adapter_dtype(W.dtype)
        # lambda_d = d_initial, lambda_b = 0: ΔW = Λ_b B Λ_d A = 0 at start   (section 3, init)
        self.lambda_d = nn.Parameter(torch.full((self.r,), float(d_initial), device=W.device,
                                                dtype=dtype))
        self.lambda_b = nn.Parameter(torch.zeros(self.out_features, device=W.device, dtype=dtype))
        self.vera_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def vera_A(self) -> torch.Tensor:
        return self.vera_projection.vera_A[:, : self.in_features]  # (r, in), view of the shared A

    @property
    def vera_B(self) -> torch.Tensor:
        return self.vera_projection.vera_B[: self.out_features, :]  # (out, r), view of the shared B

    def delta_weight(self) -> torch.Tensor:
        return vera_delta(self.vera_A, self.vera_B, self.lambda_d, self.lambda_b)  # (out, in)

    def delta_inputs(self) -> dict[str, torch.Tensor]:
        return {**super().delta_inputs(), "vera_A": self.vera_A, "vera_B": self.vera_B}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        tokens = x.reshape(-1, x.shape[-1])  # (N, in): check_input checked its width
        y = self.base(tokens)  # (N, out): W0 x + b (+ ΔW x when merged), a fresh tensor
        if not self.merged:
            dropped = self.vera_dropout(x).reshape(tokens.shape)  # (N, in): d(x), on x's shape
            # vera_forward's eq. 2, added in place into the fresh y (fast_paths/low_rank.py; equal
            # within TOL: tests/test_vera.py::test_forward_equals_the_equation)
            y = add_vera_(y, dropped, self.vera_A, self.vera_B, self.lambda_d, self.lambda_b)
        return y.view(*x.shape[:-1], self.out_features)  # (..., out)

    def adapter_config(self) -> dict:
        dropout = self.vera_dropout.p if isinstance(self.vera_dropout, nn.Dropout) else 0.0
        return {"peft_type": "VERA", "r": self.r, "projection_prng_key": self.vera_projection.seed,
                "save_projection": False, "d_initial": self.d_initial, "vera_dropout": dropout}

    def adapter_metadata(self) -> dict[str, str]:
        return {"vera_projection_sha256": self.vera_projection.checksum}

    def extra_repr(self) -> str:
        return f"r={self.r}, d_initial={self.d_initial}"


def apply_vera(model: nn.Module, targets=ALL_LINEAR, r: int = DEFAULT_RANK,
               seed: int = DEFAULT_SEED, d_initial: float = DEFAULT_D_INITIAL,
               dropout: float = 0.0) -> nn.Module:
    """Wrap the target linears in VeRALinear around one shared pair, freeze the rest; returns model.

    `targets` as in adapters.find_targets ("all-linear" or name suffixes). The pair is drawn from
    `seed` for the largest in/out widths among the targets, in float32 (float64 for a float64
    base); r may not exceed the larger of those widths (checks.check_rank). `dropout` acts on
    the update's input only, as in LoRA.
    """
    check_int(r, "r (the rank)", low=1)
    check_seed(seed)
    check_d_initial(d_initial)
    check_probability(dropout, "dropout")
    names = find_targets(model, targets)
    bases = [model.get_submodule(name) for name in names]
    W = dense_weight(bases[0])
    max_in = max(b.in_features for b in bases)
    max_out = max(b.out_features for b in bases)
    check_rank(r, max_in, max_out, "the widest target (the shared matrices)")
    projection = VeRAProjection(r, max_in, max_out, seed, dtype=adapter_dtype(W.dtype),
                                device=W.device)
    replace_targets(model, names, lambda base: VeRALinear(base, projection, d_initial, dropout))
    mark_only_adapters_trainable(model)
    return model


def vera_layers(model: nn.Module) -> dict[str, VeRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, VeRALinear)}


def vera_projection_of(model: nn.Module) -> VeRAProjection:
    """The one VeRAProjection the model's VeRA layers share."""
    projections = {id(m.vera_projection): m.vera_projection for m in vera_layers(model).values()}
    if len(projections) != 1:
        raise ValueError(f"the model's VeRA layers share {len(projections)} pairs of matrices, "
                         "not one (apply VeRA once over all its targets)")
    return next(iter(projections.values()))
