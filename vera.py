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
The pair is never saved: an adapter file holds the vectors, the seed, the shapes and a SHA-256 of
the drawn matrices, so a load regenerates them and refuses to go on if they came out different.

Shapes follow torch.nn.Linear: weight (out, in), y = x W^T + b; the paper's W0 x has the same (out,
in) layout. Letters: N tokens (leading dims flattened), r rank, in/out the layer's widths.
"""
from __future__ import annotations

import hashlib
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapters import (AdapterLinear, adapter_dtype, atomic_save, dense_weight, find_targets,
                      mark_only_adapters_trainable, replace_targets)
from checks import check_int, check_probability

# lambda_d's starting value. The paper leaves it a hyperparameter (section 3, "Initialization
# strategies"); 0.1 is PEFT's VeraConfig.d_initial default.
DEFAULT_D_INITIAL = 0.1
# Kaiming-uniform as PEFT's vera `_kaiming_init` draws it: std = gain / sqrt(fan_in) with the
# ReLU gain sqrt(2) and fan_in the matrix's second dimension, then U(-bound, bound) with
# bound = sqrt(3) * std (a uniform on [-a, a] has standard deviation a / sqrt(3)).
KAIMING_GAIN = math.sqrt(2)
UNIFORM_BOUND_PER_STD = math.sqrt(3.0)
# VeRA has no alpha / r factor: the trained vectors carry the scale (PEFT has none either).
VERA_SCALING = 1.0
# torch.Generator.manual_seed takes an unsigned 64-bit seed.
MAX_SEED = 2**64 - 1
ADAPTER_FORMAT = "vera-adapter"
ADAPTER_FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Pure functions: what an oracle user calls.

def check_seed(seed) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an int in [0, 2**64 - 1], got {seed!r}")


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    std = KAIMING_GAIN / math.sqrt(shape[1])  # fan_in: the second dimension, as in PEFT
    bound = UNIFORM_BOUND_PER_STD * std
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def vera_projections(r: int, max_in: int, max_out: int,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared frozen pair: A (r, max_in) then B (max_out, r), float32, from one generator.

    Drawn on the CPU in PEFT's order, so the same seed gives PEFT's `vera_A`/`vera_B` bit for bit
    (`projection_prng_key`), and the same bits on every device.
    """
    check_int(r, "r (the rank)", low=1)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in (max_in, max_out)):
        raise ValueError(f"max_in and max_out must be ints >= 1, got {max_in!r} and {max_out!r}")
    check_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    A = _kaiming_uniform((r, max_in), generator)  # (r, max_in), drawn first
    B = _kaiming_uniform((max_out, r), generator)  # (max_out, r)
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


def add_vera(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             lambda_d: torch.Tensor, lambda_b: torch.Tensor) -> torch.Tensor:
    """y + Λ_b B Λ_d A x for every row x of x (..., in); y (..., out) holds W0 x + b already.

    `add_vera_` on a copy of y: y itself is left unchanged.
    """
    out = y.reshape(-1, y.shape[-1]).to(A.dtype, copy=True)  # (N, out)
    add_vera_(out, x.reshape(-1, x.shape[-1]), A, B, lambda_d, lambda_b)
    return out.view(y.shape).to(y.dtype)


def add_vera_(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
              lambda_d: torch.Tensor, lambda_b: torch.Tensor) -> torch.Tensor:
    """y += Λ_b B Λ_d A x in y's memory, for y (N, out), x (N, in); returns y. As for
    lora.add_low_rank_, y must be a tensor nothing else holds, such as a base layer's fresh output.

    Λ_d scales the r columns of A x (N, r), a pass over few numbers; Λ_b is folded into the
    frozen B as Λ_b B (out, r), so the sum is LoRA's in-place `addmm_` and makes no pass over the
    (N, out) activations. PEFT scales both activations instead, λ_b ⊙ (B (λ_d ⊙ A x)): the same
    value up to rounding. Per token this costs 4r in + 6r out FLOPs (the gradient of Λ_b B is one
    more matmul over the tokens) against PEFT's 4r (in + out) plus elementwise passes over (N, out).
    One training step (bench.py, r = 64, CPU): 3-10% faster than PEFT's.
    """
    if y.dtype != A.dtype:  # a low-precision base: sum in the adapter's dtype, round back once
        return add_vera_(y.to(A.dtype), x, A, B, lambda_d, lambda_b).to(y.dtype)
    xa = x.to(A.dtype) @ A.t()  # (N, in) @ (in, r) -> (N, r): A x
    B_b = lambda_b[:, None] * B  # (out, 1) * (out, r) -> (out, r): Λ_b B
    # h = W0 x + b + Λ_b B Λ_d A x   (VeRA, eq. 2), with W0 x + b in y
    return y.addmm_(xa * lambda_d, B_b.t(), alpha=VERA_SCALING)  # (N, out) += (N, r) @ (r, out)


def vera_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                 B: torch.Tensor, lambda_d: torch.Tensor, lambda_b: torch.Tensor) -> torch.Tensor:
    """h = x W0^T + b + Λ_b B Λ_d A x for x (..., in), W0 (out, in): one VeRA layer, no module."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    y = add_vera_(F.linear(x2, weight, bias), x2, A, B, lambda_d, lambda_b)  # (N, out)
    return y.view(*x.shape[:-1], y.shape[-1])  # (..., out)


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
        A, B = vera_projections(r, max_in, max_out, seed)
        self.r, self.max_in, self.max_out, self.seed = r, max_in, max_out, seed
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
        if not isinstance(d_initial, (int, float)) or isinstance(d_initial, bool) \
                or not math.isfinite(d_initial) or d_initial == 0:
            raise ValueError("d_initial must be a finite non-zero number (lambda_b starts at 0, so "
                             f"lambda_d = 0 would zero both gradients for good), got {d_initial!r}")
        check_probability(dropout, "dropout")
        self.r, self.d_initial = projection.r, d_initial
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in); a wrong width is the base's error to raise
        y = self.base(x2)  # (N, out): W0 x + b (+ ΔW x when merged), a fresh tensor
        if not self.merged:
            dx2 = self.vera_dropout(x).reshape(x2.shape)  # (N, in): dropout sees x's own shape
            y = add_vera_(y, dx2, self.vera_A, self.vera_B, self.lambda_d, self.lambda_b)
        return y.view(*x.shape[:-1], self.out_features)  # (..., out)

    def extra_repr(self) -> str:
        return f"r={self.r}, d_initial={self.d_initial}"


def apply_vera(model: nn.Module, targets, r: int, seed: int, d_initial: float = DEFAULT_D_INITIAL,
               dropout: float = 0.0) -> nn.Module:
    """Wrap the target linears in VeRALinear around one shared pair, freeze the rest; returns model.

    `targets` as in adapters.find_targets ("all-linear" or name suffixes). The pair is drawn from `seed`
    for the largest in/out widths among the targets, in float32 (float64 for a float64 base).
    """
    check_int(r, "r (the rank)", low=1)
    check_seed(seed)
    names = find_targets(model, targets)
    bases = [model.get_submodule(name) for name in names]
    W = dense_weight(bases[0])
    max_in, max_out = max(b.in_features for b in bases), max(b.out_features for b in bases)
    projection = VeRAProjection(r, max_in, max_out, seed, dtype=adapter_dtype(W.dtype),
                                device=W.device)
    replace_targets(model, names, lambda base: VeRALinear(base, projection, d_initial, dropout))
    mark_only_adapters_trainable(model)
    return model


# --------------------------------------------------------------------------------------------------
# Adapter files and switching: the vectors, the seed and the shapes; never the matrices.

def vera_layers(model: nn.Module) -> dict[str, VeRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, VeRALinear)}


def vera_projection_of(model: nn.Module, layers: dict | None = None) -> VeRAProjection:
    """The one VeRAProjection the model's VeRA layers (`vera_layers(model)`) share."""
    layers = vera_layers(model) if layers is None else layers
    projections = {id(m.vera_projection): m.vera_projection for m in layers.values()}
    if not projections:
        raise ValueError("model has no VeRA layers (call apply_vera first)")
    if len(projections) > 1:
        raise ValueError(f"the model's VeRA layers use {len(projections)} different shared pairs; "
                         "an adapter file holds one seed, so apply VeRA once over all targets")
    return next(iter(projections.values()))


def vera_adapter(model: nn.Module) -> dict:
    """The model's adapter as it is saved: a header, and all vectors packed into one 1-D tensor.

    One tensor, not one per vector: each tensor in a torch.save file costs about 250 bytes of zip
    headers, name and 64-byte alignment, as much as a 64-float vector itself (measured; README).
    """
    layers = vera_layers(model)
    projection = vera_projection_of(model, layers)
    vectors = [t.detach().reshape(-1) for m in layers.values() for t in (m.lambda_d, m.lambda_b)]
    return {"format": ADAPTER_FORMAT, "version": ADAPTER_FORMAT_VERSION, "seed": projection.seed,
            "r": projection.r, "max_in": projection.max_in, "max_out": projection.max_out,
            "checksum": projection.checksum,  # SHA-256 of the float32 matrices the seed gave here
            "layers": [[name, m.in_features, m.out_features] for name, m in layers.items()],
            "vectors": torch.cat(vectors).cpu()}  # per layer: lambda_d (r,) then lambda_b (out,)


def _check_adapter(adapter, source: str) -> None:
    """Raise a ValueError naming `source` unless `adapter` is a well-formed VeRA adapter."""
    def fail(problem: str):
        raise ValueError(f"{source}: {problem}")
    if not isinstance(adapter, dict) or adapter.get("format") != ADAPTER_FORMAT:
        fail(f"not a VeRA adapter (no format {ADAPTER_FORMAT!r})")
    if adapter.get("version") != ADAPTER_FORMAT_VERSION:
        fail(f"format version {adapter.get('version')!r}, this code reads {ADAPTER_FORMAT_VERSION}")
    if not all(isinstance(adapter.get(k), int) for k in ("seed", "r", "max_in", "max_out")):
        fail("'seed', 'r', 'max_in' and 'max_out' must be ints")
    if not isinstance(adapter.get("checksum"), str) or len(adapter["checksum"]) != 64:
        fail("'checksum' must be a SHA-256 hex string")
    layers = adapter.get("layers")
    if not isinstance(layers, list) or not layers or not all(
            isinstance(e, (list, tuple)) and len(e) == 3 and isinstance(e[0], str)
            and isinstance(e[1], int) and isinstance(e[2], int) for e in layers):
        fail("'layers' must be a non-empty list of [name, in, out]")
    for name, n_in, n_out in layers:
        if not (1 <= n_in <= adapter["max_in"] and 1 <= n_out <= adapter["max_out"]):
            fail(f"layer {name!r} ({n_in} in, {n_out} out) does not fit the shared matrices "
                 f"({adapter['max_in']} in, {adapter['max_out']} out)")
    vectors, size = adapter.get("vectors"), sum(adapter["r"] + n_out for _, _, n_out in layers)
    if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point() \
            or tuple(vectors.shape) != (size,):
        fail(f"'vectors' must be a float tensor of shape ({size},), the sum of r + out per layer")
    if not torch.isfinite(vectors).all():
        fail("'vectors' holds NaN or Inf")


def save_vera_adapter(model: nn.Module, path: str) -> None:
    """Write the model's VeRA adapter to `path` atomically (temporary file, then os.replace)."""
    atomic_save(vera_adapter(model), path)


def read_vera_adapter(path: str, device: torch.device | str = "cpu") -> dict:
    """Read and check an adapter file (weights_only), its vectors on `device`; keep it to switch."""
    adapter = torch.load(path, map_location=device, weights_only=True)
    _check_adapter(adapter, path)
    return adapter


def _checksum_mismatch(seed: int, regenerated: str, stored: str) -> ValueError:
    return ValueError(f"checksum mismatch: the matrices regenerated from seed {seed} (sha256 "
                      f"{regenerated[:16]}...) are not the ones the adapter was trained with "
                      f"(sha256 {stored[:16]}...): this torch's random generator draws others")


@torch.no_grad()
def use_vera_adapter(model: nn.Module, adapter: dict) -> None:
    """Switch the model to `adapter` (read_vera_adapter's or vera_adapter's): copy its vectors in.

    Checks first that the adapter was trained on these very shared matrices (seed, shapes,
    checksum) and these layers. The base and the matrices stay as they are: a switch is one walk
    over the modules and one copy per vector.
    """
    layers = vera_layers(model)
    projection = vera_projection_of(model, layers)
    for key in ("seed", "r", "max_in", "max_out"):
        if adapter[key] != getattr(projection, key):
            raise ValueError(f"adapter has {key}={adapter[key]}, the model's shared VeRA matrices "
                             f"{key}={getattr(projection, key)}")
    if adapter["checksum"] != projection.checksum:
        raise _checksum_mismatch(projection.seed, projection.checksum, adapter["checksum"])
    shapes = {name: (n_in, n_out) for name, n_in, n_out in adapter["layers"]}
    ours = {name: (m.in_features, m.out_features) for name, m in layers.items()}
    if shapes != ours:
        differing = sorted(set(shapes.items()) ^ set(ours.items()))  # (name, (in, out)) pairs
        raise ValueError(f"adapter layers do not match the model's VeRA layers: {differing[:5]}")
    if any(m.merged for m in layers.values()):
        raise ValueError("unmerge the adapters before switching (a merged base keeps the update)")
    # the packing order: lambda_d (r,) then lambda_b (out,), layer after layer
    params = [p for name in shapes for p in (layers[name].lambda_d, layers[name].lambda_b)]
    sizes = [p.numel() for p in params]
    if adapter["vectors"].shape != (sum(sizes),):
        raise ValueError(f"adapter 'vectors' must have shape ({sum(sizes)},), the sum of r + out")
    for param, part in zip(params, adapter["vectors"].split(sizes)):  # views of the packed tensor
        param.copy_(part)


def load_vera_adapter(model: nn.Module, path: str) -> dict:
    """Read `path` and switch the model to it; on a model without VeRA layers, apply VeRA first
    with the file's targets, rank and seed (regenerating the shared pair). Returns the adapter."""
    adapter = read_vera_adapter(path)
    if not vera_layers(model):  # check before changing the model: a failure leaves it intact
        modules, layers = dict(model.named_modules()), adapter["layers"]
        for name, n_in, n_out in layers:
            m = modules.get(name)
            if (getattr(m, "in_features", None), getattr(m, "out_features", None)) != (n_in, n_out):
                raise ValueError(f"{path}: the model has no layer {name!r} with {n_in} in, "
                                 f"{n_out} out")
        if (max(e[1] for e in layers), max(e[2] for e in layers)) != (adapter["max_in"],
                                                                      adapter["max_out"]):
            raise ValueError(f"{path}: its shared matrices are not drawn for its widest layers")
        regenerated = projection_checksum(*vera_projections(
            adapter["r"], adapter["max_in"], adapter["max_out"], adapter["seed"]))
        if regenerated != adapter["checksum"]:
            raise _checksum_mismatch(adapter["seed"], regenerated, adapter["checksum"])
        apply_vera(model, [name for name, _, _ in layers], adapter["r"], adapter["seed"])
    use_vera_adapter(model, adapter)
    return adapter


def adapter_file_bytes(path: str) -> int:
    """Size of an adapter file on disk, in bytes."""
    return os.path.getsize(path)
