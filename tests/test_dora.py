"""Tests for dora.py: DoRA's properties, autograd references for the gradients, PEFT as oracle.

References are written here from the definition (arXiv 2402.09353, eq. 5), not taken from dora.py:
W' = m ⊙ V / ||V|| with V = W0 + s B A and the norm per output row, y = x W'^T + b, computed in
float64 from the same tensors.

Tolerances. The sums DoRA computes can cancel: V = W0 + s B A, V x, and with dropout
W0 x + b − W0 d(x). A float result then carries the rounding of terms far larger than itself, so
errors are measured against the size of those terms: `error_bounds` evaluates every sum on absolute
values (|W0|, |A|, |B|, |m|, |b|, |x|, |G|; m/||V|| widened by the relative error that ||V|| takes
from a cancelling row of V), and a comparison passes when
|actual - expected| <= tol * (|expected| + the largest such bound), elementwise. Per dtype:
  float64  1e-12  (only the order of the additions differs from the reference)
  float32  2e-6   (16 float32 ulps of 2^-24 = 6e-8: sums of at most 12 + 6 terms, the norm, the
                   division, and the reference's own rounding where it starts from float32 tensors)
  bfloat16 1.6e-2 (the base GEMM and the output are rounded to bfloat16's 8 significant bits: two
                   roundings of 2^-8 = 3.9e-3 relative, and their effect on the next sum)
"""
import copy
import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import adapters
import dora
import lora
from assertions import assert_gradcheck, assert_same
from formats import adapter_files
from tiny_gpt import GPT, GPTConfig

TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1.6e-2}


def assert_close_normwise(actual, expected, tol, scale=None):
    """|actual - expected| <= tol * (|expected| + scale) elementwise (scale None: max|expected|)."""
    expected = expected.to(actual.dtype) if actual.dtype == torch.float64 else expected
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=tol,
                               atol=tol * max(scale, 1e-30))


def error_bounds(layer, x, G=None, mask=None):
    """The size each result's rounding error is relative to (see the module docstring).

    Keys: "weight" (W'), "y", and with an upstream gradient G also "magnitude", "lora_A", "lora_B",
    "x" for the gradients of sum(G ⊙ y). `mask`: the dropout's scaled mask D, d(x) = D ⊙ x.
    Two first-order sources, added: (1) every sum evaluated on the absolute values of its terms,
    with aW = |W0| + s|B||A| for the terms of V; (2) ||V|| inherits V's rounding, a relative error
    κ ε with κ = ||aW|| / ||V|| per row, which m / ||V|| carries into everything it multiplies: the
    same expressions with g κ for g and |V| for aW (3 g κ in the norm's own gradient, g / n^2).
    """
    s = layer.scaling
    W0, A, B, m = (t.detach().double() for t in (adapters.dense_weight(layer.base), layer.lora_A,
                                                 layer.lora_B, layer.magnitude))
    b = layer.base.bias.detach().double().abs() if layer.base.bias is not None else 0.0
    V = W0 + s * B @ A  # (out, in)
    n = V.norm(dim=1)  # (out,)
    aW = W0.abs() + s * B.abs() @ A.abs()  # (out, in): the terms of V
    g = (m / n).abs()  # (out,)
    kappa = aW.norm(dim=1) / n  # (out,)
    ax = x.detach().double().abs().reshape(-1, x.shape[-1])  # (N, in)
    D = torch.ones_like(ax) if mask is None else mask.double().abs().reshape(ax.shape)
    adx = ax * D  # |d(x)|
    aG = None if G is None else G.detach().double().abs().reshape(-1, W0.shape[0])  # (N, out)

    def sizes(g, W, norm_term_factor, frozen_path):
        out = {"weight": g[:, None] * W}
        out["y"] = adx @ (g[:, None] * W).T  # g ⊙ V d(x)
        if frozen_path:
            out["y"] = out["y"] + b + (0 if mask is None else ax @ W0.abs().T + adx @ W0.abs().T)
        if aG is not None:
            c = (aG * (adx @ W.T)).sum(0)  # (out,): Σ_N G ⊙ V d(x)
            out["magnitude"] = c / n
            dV = g[:, None] * (aG.T @ adx)  # (out, in): ∂L/∂V with the norm detached
            if not layer.detach_norm:  # plus the norm's own term (g c / n^2) ⊙ V
                dV = dV + norm_term_factor * (g * c / n**2)[:, None] * V.abs()
            out["lora_B"] = s * dV @ A.abs().T
            out["lora_A"] = s * B.abs().T @ dV
            out["x"] = D * (aG @ (g[:, None] * W))  # (N, in)
            if frozen_path and mask is not None:
                out["x"] = out["x"] + (1 + D) * (aG @ W0.abs())
        return out

    terms = sizes(g, aW, 1.0, frozen_path=True)
    norm_error = sizes(g * kappa, V.abs(), 3.0, frozen_path=False)
    return {k: float((terms[k] + norm_error[k]).max()) for k in terms}


def reference_weight(W0, A, B, m, scaling, detach_norm):
    """W' = m ⊙ V / ||V||, V = W0 + s B A, norm over each output row of the (out, in) matrix."""
    V = W0 + scaling * (B @ A)  # (out, in)
    norm = V.norm(dim=1, keepdim=True)  # (out, 1)
    if detach_norm:
        norm = norm.detach()
    return m.unsqueeze(1) * V / norm  # (out, in)


def f64(t):
    """A float64 leaf copy of t that collects its own gradient."""
    return t.detach().to(torch.float64).requires_grad_(True)


@st.composite
def cases(draw, dtypes=(torch.float32, torch.float64)):
    out_features, in_features = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    return dict(out_features=out_features, in_features=in_features,
                # r <= max(in, out): checks.check_rank refuses larger ranks
                r=draw(st.integers(1, min(6, max(in_features, out_features)))),
                alpha=draw(st.floats(0.25, 32.0)),
                rslora=draw(st.booleans()), bias=draw(st.booleans()),
                dtype=draw(st.sampled_from(dtypes)), seed=draw(st.integers(0, 2**31 - 1)),
                lead=draw(st.sampled_from([(1,), (5,), (2, 3)])))


def make_layer(case, dropout=0.0, trained=True, **kwargs):
    """A DoRALinear on a random base; `trained`: B and m moved away from their initial values."""
    gen = torch.Generator().manual_seed(case["seed"])
    base = nn.Linear(case["in_features"], case["out_features"], bias=case["bias"],
                     dtype=case["dtype"])
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=gen, dtype=torch.float64))
        if case["bias"]:
            base.bias.copy_(torch.randn(base.bias.shape, generator=gen, dtype=torch.float64))
    layer = dora.DoRALinear(base, case["r"], case["alpha"], dropout, case["rslora"], gen, **kwargs)
    if trained:
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen, dtype=torch.float64))
            layer.magnitude.mul_(torch.rand(layer.magnitude.shape, generator=gen,
                                            dtype=torch.float64) + 0.5)
    x = torch.randn(*case["lead"], case["in_features"], generator=gen, dtype=torch.float64)
    return layer, x.to(case["dtype"]), gen


class FixedMaskDropout(nn.Module):
    """Dropout with a mask drawn once: x ⊙ mask / (1 - p), the same on every call."""

    def __init__(self, shape, p, generator):
        super().__init__()
        keep = torch.rand(shape, generator=generator) >= p
        keep.view(-1)[0] = True  # keep one entry, so that the dropped-out input is never all zero
        self.scale_mask = keep.to(torch.float64) / (1 - p)

    def forward(self, x):
        return x * self.scale_mask.to(x.dtype)


class FakeQuantLinear(nn.Module):
    """A base that stores int8 codes and exposes only `dequantized_weight()`, in a compute dtype
    other than its inputs' (as qlora.NF4Linear: x and b are cast to it, y comes back in x's)."""
    linear_like = True

    def __init__(self, weight, bias, compute_dtype=torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self.step = weight.abs().max() / 127
        self.register_buffer("codes", torch.round(weight / self.step).to(torch.int8))
        self.bias = nn.Parameter(bias.clone(), requires_grad=False)

    def dequantized_weight(self):
        return (self.codes.to(torch.float32) * self.step).to(self.compute_dtype)

    def forward(self, x):
        y = F.linear(x.to(self.compute_dtype), self.dequantized_weight(),
                     self.bias.to(self.compute_dtype))
        return y.to(x.dtype)


# --------------------------------------------------------------------------------- properties

@given(cases(dtypes=(torch.float32, torch.float64, torch.bfloat16)))
def test_fresh_adapter_equals_base(case):
    layer, x, _ = make_layer(case, trained=False)
    W0 = layer.base.weight.detach().to(torch.float64)
    # magnitude = the norm of each output row of W0 (PEFT's reading of the paper's column norm)
    assert_close_normwise(layer.magnitude.detach(), W0.norm(dim=1), TOL[layer.magnitude.dtype])
    x.requires_grad_(True)
    y = layer(x)
    assert y.dtype == case["dtype"]
    expected = layer.base(x)
    assert_close_normwise(y, expected, TOL[case["dtype"]])
    if case["dtype"] != torch.bfloat16:  # gradients of bfloat16 inputs: not meaningful at 8 bits
        (gx,) = torch.autograd.grad(y.sum(), x)
        (gx_base,) = torch.autograd.grad(expected.sum(), x)
        assert_close_normwise(gx, gx_base, TOL[case["dtype"]])


@given(cases(dtypes=(torch.float32, torch.float64, torch.bfloat16)), st.booleans())
def test_forward_equals_merged_weight_formula(case, eval_mode):
    # Dropout p = 0.3, but in eval mode it is the identity; with p = 0 the mode does not matter.
    layer, x, _ = make_layer(case, dropout=0.3 if eval_mode else 0.0)
    layer.train(not eval_mode)
    W = reference_weight(f64(layer.base.weight), f64(layer.lora_A), f64(layer.lora_B),
                         f64(layer.magnitude), layer.scaling, detach_norm=True)
    bias = layer.base.bias.detach().to(torch.float64) if case["bias"] else None
    expected = F.linear(x.to(torch.float64), W, bias)  # x W'^T + b
    bounds = error_bounds(layer, x)
    assert_close_normwise(layer(x), expected, TOL[case["dtype"]], bounds["y"])
    # The pure function computes the same weight.
    W_pure = dora.dora_weight(layer.base.weight, layer.lora_A, layer.lora_B, layer.magnitude,
                              layer.scaling)
    assert_close_normwise(W_pure, W, TOL[layer.lora_A.dtype], bounds["weight"])


@given(cases(), st.booleans())
def test_gradients_equal_autograd_through_the_weight_formula(case, detach_norm):
    layer, x, gen = make_layer(case, detach_norm=detach_norm)
    x.requires_grad_(True)
    y = layer(x)
    G = torch.randn(y.shape, generator=gen, dtype=torch.float64)  # upstream gradient dL/dy
    got = torch.autograd.grad(y, [layer.magnitude, layer.lora_A, layer.lora_B, x], G.to(y.dtype))

    def reference_grads(detach):
        leaves = [f64(layer.magnitude), f64(layer.lora_A), f64(layer.lora_B), f64(x)]
        m, A, B, x64 = leaves
        W = reference_weight(layer.base.weight.detach().double(), A, B, m, layer.scaling, detach)
        bias = layer.base.bias.detach().double() if case["bias"] else None
        return torch.autograd.grad(F.linear(x64, W, bias), leaves, G)

    expected = reference_grads(detach_norm)
    bounds = error_bounds(layer, x, G)
    for name, g, e in zip(("magnitude", "lora_A", "lora_B", "x"), got, expected):
        assert_close_normwise(g, e, TOL[case["dtype"]], bounds[name])
    # The gradient of m does not depend on detaching (m is not in the norm; section 4.3).
    assert_close_normwise(got[0], reference_grads(not detach_norm)[0], TOL[case["dtype"]],
                          bounds["magnitude"])


# ------------------------------------------------------------------- the weight and its gradients

def random_direction(out_features, in_features, seed, zero_first_row=False):
    """Float64 V (out, in) from a normal, m (out,) in [0.5, 1.5), G = ∇_W' L (out, in)."""
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(out_features, in_features, generator=gen, dtype=torch.float64)
    if zero_first_row:
        V[0] = 0
    m = torch.rand(out_features, generator=gen, dtype=torch.float64) + 0.5
    return V, m, torch.randn(out_features, in_features, generator=gen, dtype=torch.float64)


def weight_from_direction(V, m, detach_norm):
    """W' = m ⊙ V / max(||V||, eps), norm per output row: the reference for dora_grads."""
    norm = torch.linalg.vector_norm(V, dim=1).clamp_min(dora.DORA_NORM_EPS)  # (out,)
    return m.unsqueeze(1) * V / (norm.detach() if detach_norm else norm).unsqueeze(1)


@pytest.mark.exercise("dora.dora_weight")
@given(cases(dtypes=(torch.float64,)), st.booleans())
def test_dora_weight_is_magnitude_times_the_unit_rows_of_V(case, detach_norm):
    """W' = m ⊙ V / ||V||, V = W0 + s B A (eq. 5): row i of W' has norm m_i and V_i's direction; the
    norm is a constant for autograd only with `detach_norm` (section 4.3). Float64 on plain
    tensors, against the reference written here: tolerance 1e-12 of the terms' size (docstring)."""
    gen = torch.Generator().manual_seed(case["seed"])
    out_f, in_f, r, s = case["out_features"], case["in_features"], case["r"], case["alpha"] / 4
    W0, A, B = (torch.randn(*shape, generator=gen, dtype=torch.float64)
                for shape in ((out_f, in_f), (r, in_f), (out_f, r)))
    m0 = torch.rand(out_f, generator=gen, dtype=torch.float64) + 0.5
    V, n = W0 + s * B @ A, (W0 + s * B @ A).norm(dim=1)  # (out, in), (out,)
    kappa = (W0.abs() + s * B.abs() @ A.abs()).norm(dim=1) / n  # (out,): V's cancellation
    A, B, m = (t.clone().requires_grad_(True) for t in (A, B, m0))
    W = dora.dora_weight(W0, A, B, m, s, detach_norm)
    assert_same(W.norm(dim=1), m0, "the norms of the rows of W'", exact=False,
                rtol=0, atol=TOL[torch.float64] * float((kappa * m0).max()))
    expected = reference_weight(W0, A, B, m, s, detach_norm)
    scale = float((m0 / n * kappa).max() * V.abs().max())
    assert_same(W, expected, "W'", exact=False, rtol=0, atol=TOL[torch.float64] * scale)
    R = torch.randn(W.shape, generator=gen, dtype=torch.float64)  # a loss sum(R ⊙ W')
    got = torch.autograd.grad(W, [A, B, m], R)
    wanted = torch.autograd.grad(expected, [A, B, m], R)
    # the size of each gradient's terms (as error_bounds does), widened by κ for V's rounding
    aR, aV, k = R.abs(), V.abs(), float(kappa.max())
    c_size = (aR * aV).sum(dim=1)  # (out,)
    size_V = (m0 / n)[:, None] * (aR + (c_size / n**2)[:, None] * aV)  # (out, in)
    sizes = (s * B.detach().abs().T @ size_V, s * size_V @ A.detach().abs().T, c_size / n)
    for name, g, e, size in zip(("∇A", "∇B", "∇m"), got, wanted, sizes):
        assert_same(g, e, f"{name} with detach_norm={detach_norm}", exact=False, rtol=0,
                    atol=TOL[torch.float64] * k * float(size.max()))


@pytest.mark.exercise("dora.dora_weight")
@pytest.mark.parametrize("detach_norm", [True, False])
def test_dora_weight_of_a_zero_row_of_V_is_zero_not_nan(detach_norm):
    """A row of V = W0 + s B A that is all zeros has no direction: ||V|| = 0 and m / ||V|| would be
    0 / 0. The norm is floored at DORA_NORM_EPS (module docstring, "Zero rows"), so that row of W'
    is m · 0 / eps = 0, the other rows are untouched, and every gradient is finite."""
    gen = torch.Generator().manual_seed(3)
    W0 = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    W0[1] = 0  # with B = 0, row 1 of V is zero
    A = torch.randn(2, 5, generator=gen, dtype=torch.float64).requires_grad_(True)
    B = torch.zeros(4, 2, dtype=torch.float64, requires_grad=True)
    m = (torch.linalg.vector_norm(W0, dim=1) + 0.5).requires_grad_(True)  # m_1 = 0.5, not 0
    W = dora.dora_weight(W0, A, B, m, 2.0, detach_norm)
    assert not W.isnan().any(), (
        f"W' has NaN in rows {sorted(set(W.isnan().nonzero()[:, 0].tolist()))}: a zero row of V "
        "gives m / ||V|| = 0 / 0 unless the norm is floored at DORA_NORM_EPS")
    assert_same(W[1], torch.zeros(5, dtype=torch.float64), "the zero row of W'")
    expected = (m / torch.linalg.vector_norm(W0, dim=1)).unsqueeze(1) * W0  # the other rows
    assert_same(W[[0, 2, 3]], expected[[0, 2, 3]], "the other rows of W'", exact=False)
    grads = torch.autograd.grad(W.sum(), [A, B, m])
    for name, grad in zip(("∇A", "∇B", "∇m"), grads):
        assert grad.isfinite().all(), f"{name} is not finite: {grad}"


@pytest.mark.exercise("dora.dora_grads")
@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**31 - 1), st.booleans(),
       st.booleans())
def test_dora_grads_by_hand_equal_autograd(out_features, in_features, seed, detach_norm,
                                           zero_row):
    """dora.dora_grads' ∇_m L (eq. 7) and ∇_V L (eq. 6; with `detach_norm`, section 4.3's form),
    per output row, a zero row of V included, against autograd through W' = m ⊙ V / ||V|| in
    float64: only the order of the sums differs, so within 1e-12 of each result's terms' size."""
    V, m, G = random_direction(out_features, in_features, seed, zero_row)
    leaves = [V.clone().requires_grad_(True), m.clone().requires_grad_(True)]
    expected_V, expected_m = torch.autograd.grad(weight_from_direction(*leaves, detach_norm),
                                                 leaves, G)
    grad_m, grad_V = dora.dora_grads(V, m, G, detach_norm)
    n = torch.linalg.vector_norm(V, dim=1).clamp_min(dora.DORA_NORM_EPS)
    c_size = (G.abs() * V.abs()).sum(dim=1)  # (out,): the size of the terms of c
    size_m = float((c_size / n).max())
    size_V = float(((m / n)[:, None] * (G.abs() + (c_size / n**2)[:, None] * V.abs())).max())
    assert_same(grad_m, expected_m, "∇m", exact=False, rtol=0, atol=TOL[torch.float64] * size_m)
    assert_same(grad_V, expected_V, f"∇V with detach_norm={detach_norm}", exact=False, rtol=0,
                atol=TOL[torch.float64] * size_V)


class HandDoRAWeight(torch.autograd.Function):
    """W' = m ⊙ V / ||V|| with dora.dora_grads (the exact form, eq. 6) as its backward."""

    @staticmethod
    def forward(ctx, V, m):
        ctx.save_for_backward(V, m)
        return weight_from_direction(V, m, detach_norm=False)

    @staticmethod
    def backward(ctx, grad_weight):
        V, m = ctx.saved_tensors
        grad_m, grad_V = dora.dora_grads(V, m, grad_weight, detach_norm=False)
        return grad_V, grad_m


@pytest.mark.exercise("dora.dora_grads")
@pytest.mark.parametrize("shape", [(3, 4), (1, 5), (4, 1)])
def test_dora_grads_pass_gradcheck(shape):
    """torch.autograd.gradcheck: eq. 6 and 7 (dora_grads, norm in the graph) against central
    finite differences of W' = m ⊙ V / ||V|| in float64, at gradcheck's own tolerances."""
    V, m, _ = random_direction(*shape, seed=sum(shape))
    assert_gradcheck(HandDoRAWeight.apply, (V.requires_grad_(True), m.requires_grad_(True)),
                     "dora.dora_grads")


@given(cases(dtypes=(torch.float64,)), st.booleans())
def test_the_layers_gradients_are_the_papers_chained_into_A_and_B(case, detach_norm):
    """DoRALinear's autograd gradients (no dropout) are dora_grads' with ∇_W' L = G^T X, then the
    chain rule through V = W0 + s B A: ∇_B = s ∇_V A^T, ∇_A = s B^T ∇_V. Float64; tolerances from
    error_bounds (module docstring)."""
    layer, x, gen = make_layer(case, detach_norm=detach_norm)
    y = layer(x)
    G = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(y, [layer.magnitude, layer.lora_A, layer.lora_B], G)
    A, B, m = (t.detach() for t in (layer.lora_A, layer.lora_B, layer.magnitude))
    s = layer.scaling
    V = layer.base.weight.detach() + s * B @ A  # (out, in)
    grad_weight = G.reshape(-1, case["out_features"]).T @ x.reshape(-1, case["in_features"])
    grad_m, grad_V = dora.dora_grads(V, m, grad_weight, detach_norm)  # (out,), (out, in)
    bounds = error_bounds(layer, x, G)
    for name, g, e in zip(("magnitude", "lora_A", "lora_B"), got,
                          (grad_m, s * B.T @ grad_V, s * grad_V @ A.T)):
        assert_close_normwise(g, e, TOL[torch.float64], bounds[name])


def autograd_ops(t):
    """Names of the backward nodes in t's graph."""
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


def test_detaching_the_norm_keeps_it_out_of_the_graph_and_changes_the_gradients_of_A_and_B():
    # The option must be more than a label: detached, the graph holds no norm (nothing of V is
    # saved for the backward, section 4.3), and the two settings give different gradients.
    case = dict(out_features=6, in_features=5, r=3, alpha=8.0, rslora=False, bias=True,
                dtype=torch.float64, seed=0, lead=(4,))
    grads = {}
    for detach in (True, False):
        layer, x, gen = make_layer(case, detach_norm=detach)
        y = layer(x)
        assert ("LinalgVectorNormBackward0" in autograd_ops(y)) is not detach
        G = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        grads[detach] = torch.autograd.grad(y, [layer.lora_A, layer.lora_B], G)
    for g_detached, g_attached in zip(grads[True], grads[False]):
        assert (g_detached - g_attached).abs().max() > 1e-3 * g_detached.abs().max()


@given(cases(), st.booleans())
def test_dora_with_frozen_initial_magnitude_equals_lora_at_init(case, with_dropout):
    # Same A; B = 0 and m = ||W0||: the output and the gradients of A, B and x are LoRA's.
    # With dropout (train mode, one fixed mask for both) the update term is still LoRA's at init.
    layer, x, gen = make_layer(case, dropout=0.5 if with_dropout else 0.0, trained=False)
    reference = lora.LoRALinear(copy.deepcopy(layer.base), case["r"], case["alpha"],
                                0.5 if with_dropout else 0.0, case["rslora"])
    with torch.no_grad():
        reference.lora_A.copy_(layer.lora_A)  # same seed, same A: see test_apply_dora_...
    mask = None
    if with_dropout:
        reference.lora_dropout = layer.lora_dropout = FixedMaskDropout(x.shape, 0.5, gen)
        mask = layer.lora_dropout.scale_mask
    layer.magnitude.requires_grad_(False)
    G = torch.randn(*case["lead"], case["out_features"], generator=gen, dtype=case["dtype"])
    outs, grads = [], []
    for module in (layer, reference):
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        outs.append(y.detach())
        grads.append(torch.autograd.grad(y, [module.lora_A, module.lora_B, xi], G))
    bounds = error_bounds(layer, x, G, mask)
    assert_close_normwise(outs[0], outs[1], TOL[case["dtype"]], bounds["y"])
    for name, g, e in zip(("lora_A", "lora_B", "x"), grads[0], grads[1]):
        assert_close_normwise(g, e, TOL[case["dtype"]], bounds[name])
    assert grads[0][1].abs().max() > 0  # B does get a gradient: the comparison is not 0 == 0


@given(cases(), st.integers(0, 2**31 - 1))
def test_dropout_enters_only_the_update(case, mask_seed):
    # y = W0 x + b + (g - 1) ⊙ W0 d(x) + g ⊙ s B A d(x) with g = m / ||V|| (module docstring, (F)).
    layer, x, _ = make_layer(case, dropout=0.4)
    layer.train()
    torch.manual_seed(mask_seed)
    y = layer(x)
    torch.manual_seed(mask_seed)  # the layer draws one mask with nn.Dropout: draw the same one
    dx = F.dropout(x, 0.4, training=True).double()
    mask = dx / x.double()  # d(x) = D ⊙ x (x has no zero entries: it is drawn from a normal)
    W0 = layer.base.weight.detach().double()
    A, B, m = (t.detach().double() for t in (layer.lora_A, layer.lora_B, layer.magnitude))
    g = m / (W0 + layer.scaling * B @ A).norm(dim=1)
    bias = layer.base.bias.detach().double() if case["bias"] else None
    expected = (F.linear(x.double(), W0, bias) + (g - 1) * F.linear(dx, W0)
                + g * layer.scaling * F.linear(F.linear(dx, A), B))
    assert_close_normwise(y, expected, TOL[case["dtype"]], error_bounds(layer, x, mask=mask)["y"])


@given(cases(dtypes=(torch.float32, torch.float64, torch.bfloat16)))
def test_merge_and_unmerge(case):
    layer, x, _ = make_layer(case)
    layer.eval()
    W0 = layer.base.weight.detach().clone()
    before = layer(x)
    expected_weight = reference_weight(*(t.detach().double() for t in (
        layer.base.weight, layer.lora_A, layer.lora_B, layer.magnitude)), layer.scaling, True)
    tol, bounds = TOL[case["dtype"]], error_bounds(layer, x)
    assert_close_normwise(layer.merged_weight(), expected_weight, tol, bounds["weight"])
    # ΔW = W' − W0 is held in the adapters' dtype (float32 for a bfloat16 base)
    assert_close_normwise(W0.double() + layer.delta_weight().double(), expected_weight,
                          TOL[layer.lora_A.dtype], bounds["weight"])
    layer.train(), layer.eval()  # switching modes never merges
    assert not layer.merged
    assert_same(layer.base.weight, W0, "W0 after train() and eval()")
    layer.merge()
    layer.merge()  # idempotent
    assert layer.merged
    assert_close_normwise(layer.base.weight.detach(), expected_weight, tol, bounds["weight"])
    assert_close_normwise(layer.merged_weight(), expected_weight, tol, bounds["weight"])
    assert_close_normwise(W0.double() + layer.delta_weight().double(), expected_weight,
                          TOL[layer.lora_A.dtype], bounds["weight"])
    assert_close_normwise(layer(x), before.double(), tol, bounds["y"])
    layer.unmerge()
    layer.unmerge()  # idempotent
    assert not layer.merged
    assert_same(layer.base.weight, W0, "W0 after unmerge")  # restored bit for bit
    assert "_unmerged_weight" not in layer.state_dict()
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
    linear = layer.to_linear()
    assert type(linear) is nn.Linear and linear.weight.dtype == case["dtype"]
    assert_close_normwise(linear(x), before.double(), tol, bounds["y"])


def test_merge_adapters_gives_plain_linears_with_the_dora_outputs():
    config = GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=16)
    base = GPT(config, generator=torch.Generator().manual_seed(0))
    model = dora.apply_dora(copy.deepcopy(base), "all-linear", r=4, alpha=8.0, seed=1)
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 16, (3, 8), generator=gen)
    # Fresh = base: m / ||V|| = 1 exactly, so each layer differs from its base only in where the
    # bias is added (after the GEMM, not inside it): a float32 ulp or so, 2e-6 through the model.
    torch.testing.assert_close(model(idx)[0], base(idx)[0], rtol=2e-6, atol=2e-6)
    with torch.no_grad():
        for layer in adapters.adapter_layers(model).values():
            layer.lora_B.normal_(generator=gen)
            layer.magnitude.mul_(torch.rand(layer.magnitude.shape, generator=gen) + 0.5)
    merged = adapters.merge_adapters(model)
    assert not adapters.adapter_layers(merged)
    assert merged.num_parameters() == base.num_parameters()
    logits = model(idx)[0]
    assert (logits - base(idx)[0]).abs().max() > 1e-2  # the adapters do change the model
    # float32 through two blocks, a layer norm and the head: 1e-5 relative to the logits' scale.
    torch.testing.assert_close(merged(idx)[0], logits, rtol=1e-5,
                               atol=1e-5 * logits.abs().max().item())


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_quantized_base_uses_the_dequantized_weight_and_cannot_merge_in_place(compute_dtype):
    gen = torch.Generator().manual_seed(3)
    base = FakeQuantLinear(torch.randn(6, 5, generator=gen), torch.randn(6, generator=gen),
                           compute_dtype)
    layer = dora.DoRALinear(base, 2, 4.0, generator=gen)
    assert layer.magnitude.dtype == torch.float32  # adapters in float32 beside a 16-bit base
    W0 = base.dequantized_weight().double()
    torch.testing.assert_close(layer.magnitude.double(), W0.norm(dim=1), rtol=2e-6, atol=0)
    x = torch.randn(4, 5, generator=gen)  # float32 inputs, whatever the compute dtype
    tol = TOL[compute_dtype]
    assert layer(x).dtype == torch.float32
    assert_close_normwise(layer(x), base(x), tol)  # fresh adapter = base
    with torch.no_grad():
        layer.lora_B.normal_(generator=gen)
    A, B, m = (t.detach().double() for t in (layer.lora_A, layer.lora_B, layer.magnitude))
    W = reference_weight(W0, A, B, m, layer.scaling, True)
    expected = F.linear(x.double(), W, base.bias.double())
    bound = error_bounds(layer, x)["y"]
    assert_close_normwise(layer(x), expected, tol, bound)
    linear = layer.to_linear()
    assert linear.weight.dtype == compute_dtype
    assert_close_normwise(linear(x.to(compute_dtype)), expected, tol, bound)
    with pytest.raises(TypeError, match="merge_adapters"):
        layer.merge()


# ------------------------------------------------------------------------------------ zero rows

@given(cases(), st.data())
def test_all_zero_weight_rows_give_no_nan(case, data):
    layer, x, gen = make_layer(case, trained=False)
    zero = torch.tensor(data.draw(st.lists(st.booleans(), min_size=case["out_features"],
                                           max_size=case["out_features"])))
    zero[0] = True  # at least one zero row
    with torch.no_grad():
        layer.base.weight[zero] = 0
        layer.magnitude.copy_(torch.linalg.vector_norm(layer.base.weight, dim=1))  # re-initialise
    x.requires_grad_(True)
    y = layer(x)
    assert_close_normwise(y, layer.base(x), TOL[case["dtype"]])  # fresh = base, zero rows too
    grads = torch.autograd.grad(y.square().sum(), [layer.magnitude, layer.lora_A, layer.lora_B, x])
    assert all(torch.isfinite(g).all() for g in grads)
    # A zero row has m = 0 and V = 0: no gradient reaches m or B there, the row stays zero.
    # (compared as numbers: a zero gradient may be -0.0)
    assert_same(grads[0][zero], torch.zeros_like(grads[0][zero]), "∇m on zero rows",
                exact=False, rtol=0, atol=0)
    assert_same(grads[2][zero], torch.zeros_like(grads[2][zero]), "∇B on zero rows",
                exact=False, rtol=0, atol=0)
    merged = layer.merged_weight()
    assert torch.isfinite(merged).all()
    assert_same(merged[zero], torch.zeros_like(merged[zero]), "W' on zero rows", exact=False,
                rtol=0, atol=0)
    # A zero row of V with m != 0 (B = 0 there, m set by hand) is finite too: W' row = 0.
    with torch.no_grad():
        layer.magnitude[zero] = 1.0
    assert torch.isfinite(layer(x)).all()
    assert_same(layer.merged_weight()[zero], torch.zeros_like(merged[zero]),
                "W' on zero rows with m = 1", exact=False, rtol=0, atol=0)


def test_row_norm_floor_is_the_named_epsilon_and_only_touches_tiny_rows():
    V = torch.tensor([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0], [1e-14, 0.0, 0.0], [1e-12, 1e-12, 0.0]],
                     dtype=torch.float64)
    expected = torch.tensor([dora.DORA_NORM_EPS, 5.0, dora.DORA_NORM_EPS, math.sqrt(2) * 1e-12],
                            dtype=torch.float64)
    torch.testing.assert_close(dora.row_norm(V), expected, rtol=1e-15, atol=0)
    # Not detached: the gradient of the floor is zero, not NaN, on the zero row.
    A = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    B = torch.ones(4, 1, dtype=torch.float64, requires_grad=True)
    m = torch.ones(4, dtype=torch.float64, requires_grad=True)
    W = dora.dora_weight(V, A, B, m, 1.0, detach_norm=False)
    grads = torch.autograd.grad(W.sum(), [A, B, m])
    assert all(torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------------------------ apply_dora

def test_apply_dora_trains_only_the_adapters_and_round_trips_its_state():
    config = GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=16)
    base = GPT(config, generator=torch.Generator().manual_seed(0))
    r = 4
    model = dora.apply_dora(copy.deepcopy(base), "all-linear", r=r, alpha=8.0, seed=5)
    layers = adapters.adapter_layers(model)
    assert len(layers) == 6 * config.n_layer
    assert all(type(m) is dora.DoRALinear for m in layers.values())
    expected = sum(r * (m.in_features + m.out_features) + m.out_features for m in layers.values())
    assert adapters.count_trainable(model) == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n in layers for p in ("lora_A", "lora_B", "magnitude")}
    # The same seed draws the same A as apply_lora.
    twin = lora.apply_lora(copy.deepcopy(base), "all-linear", r=r, alpha=8.0, seed=5)
    for name, layer in layers.items():
        twin_A = adapters.adapter_layers(twin)[name].lora_A
        torch.testing.assert_close(layer.lora_A, twin_A, rtol=0, atol=0)
    # Adapter state (A, B and m) saves and loads into a fresh DoRA model.
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_(generator=gen)
            layer.magnitude.mul_(1.5)
    assert sum(k.endswith(".magnitude") for k in adapters.adapter_state_dict(model)) == len(layers)
    saved = adapter_files.saved_adapter(model)  # in memory, as a directory would hold it
    fresh = dora.apply_dora(copy.deepcopy(base), "all-linear", r=r, alpha=8.0, seed=6)
    adapter_files.load_adapter(fresh, saved)
    idx = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fresh(idx)[0], model(idx)[0], rtol=0, atol=0)
    key = next(k for k in saved.tensors if k.endswith(".lora_magnitude_vector"))
    bad = dict(saved.tensors, **{key: saved.tensors[key][:-1]})
    with pytest.raises(ValueError, match="shape"):
        adapter_files.load_adapter(fresh, dataclasses.replace(saved, tensors=bad))


# ------------------------------------------------------------------------------------ bad inputs

def test_bad_inputs_raise_clear_errors():
    base = nn.Linear(5, 4)
    for kwargs, error, pattern in [
        (dict(r=0, alpha=1.0), ValueError, "r \\(the rank\\)"),
        (dict(r=2.0, alpha=1.0), ValueError, "r \\(the rank\\)"),
        (dict(r=2, alpha=0.0), ValueError, "alpha"),
        (dict(r=2, alpha=float("nan")), ValueError, "alpha"),
        (dict(r=2, alpha=1.0, dropout=1.0), ValueError, "dropout"),
        (dict(r=2, alpha=1.0, detach_norm="yes"), TypeError, "detach_norm"),
    ]:
        with pytest.raises(error, match=pattern):
            dora.DoRALinear(base, **kwargs)
    with pytest.raises(TypeError, match="in_features"):
        dora.DoRALinear(nn.ReLU(), 2, 1.0)
    with pytest.raises(TypeError, match="do not stack"):
        dora.DoRALinear(dora.DoRALinear(base, 2, 1.0), 2, 1.0)
    W, A, B, m = torch.randn(4, 5), torch.randn(2, 5), torch.randn(4, 2), torch.rand(4)
    for args, error, pattern in [
        ((W[0], A, B, m), ValueError, "weight must be 2-D"),
        ((W, A[:, :4], B, m), ValueError, "A must have shape"),
        ((W, A, B[:, :1], m), ValueError, "B must have shape"),
        ((W, A, B, m[:3]), ValueError, "magnitude must have shape"),
        ((W, A, B.double(), m), TypeError, "share one floating dtype"),
        ((W, A, B, m.tolist()), TypeError, "magnitude must be a torch.Tensor"),
    ]:
        with pytest.raises(error, match=pattern):
            dora.check_dora_inputs(*args, 1.0)
    with pytest.raises(TypeError, match="scaling"):
        dora.check_dora_inputs(W, A, B, m, float("inf"))
    dora.check_dora_inputs(W, A, B, m, 1.0)  # the good inputs pass
    with pytest.raises(ValueError, match="in_features=5"):
        dora.DoRALinear(base, 2, 1.0)(torch.randn(3, 6))
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="targets"):
        dora.apply_dora(model, ("no_such_layer",))
    with pytest.raises(ValueError, match="r \\(the rank\\)"):
        dora.apply_dora(model, r=0)
    with pytest.raises(ValueError, match="r \\(the rank\\) = 65 .*'blocks.0.mlp.up_proj'"):
        dora.apply_dora(model, ("up_proj",), r=65)  # 16 in, 64 out
    layer = dora.DoRALinear(base, 2, 1.0)
    with pytest.raises(ValueError, match="x must be a tensor of shape"):
        layer(torch.tensor(2.0))


def test_inputs_are_checked_where_they_enter_not_on_every_forward(monkeypatch):
    """check_dora_inputs is the door for a caller's own tensors: neither the layer's forward
    (its tensors were made by its constructor) nor the math (dora_weight, dora_forward) runs it."""
    calls = []
    check = dora.check_dora_inputs
    monkeypatch.setattr(dora, "check_dora_inputs", lambda *args: calls.append(1) or check(*args))
    layer, x, _ = make_layer(dict(out_features=4, in_features=5, r=2, alpha=2.0, rslora=False,
                                  bias=True, dtype=torch.float32, seed=0, lead=(3,)))
    layer.train()
    layer(x)
    layer.eval()
    layer(x)
    dora.dora_forward(x, layer.base.weight, None, layer.lora_A, layer.lora_B, layer.magnitude, 1.0)
    dora.dora_weight(layer.base.weight, layer.lora_A, layer.lora_B, layer.magnitude, 1.0)
    assert calls == []
    dora.check_dora_inputs(layer.base.weight, layer.lora_A, layer.lora_B, layer.magnitude, 1.0)
    assert calls == [1]


@given(cases())
def test_a_merged_state_dict_loads_as_merged_and_unmerges_exactly(case):
    """The merged flag and W0 are module state: a fresh layer loading a merged layer's state dict
    is merged, computes the same, and unmerge() gives W0 back bit for bit."""
    layer, x, _ = make_layer(case)
    W0, before = layer.base.weight.detach().clone(), layer(x)
    layer.merge()
    state = layer.state_dict()
    assert bool(state["adapter_merged"])
    assert_same(state["_unmerged_weight"], W0, "W0 in the merged state dict")
    fresh, _, _ = make_layer(dict(case, seed=case["seed"] + 1))
    fresh.load_state_dict(state)
    assert fresh.merged
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    fresh.unmerge()
    assert_same(fresh.base.weight, W0, "W0 unmerged after loading")
    assert "_unmerged_weight" not in fresh.state_dict()
    torch.testing.assert_close(fresh(x), before, rtol=0, atol=0)
    del state["_unmerged_weight"]
    with pytest.raises(ValueError, match="merged but holds no"):
        make_layer(case)[0].load_state_dict(state)


def test_editing_the_magnitude_while_merged_makes_unmerge_refuse():
    layer, _, _ = make_layer(dict(out_features=4, in_features=5, r=2, alpha=2.0, rslora=False,
                                  bias=True, dtype=torch.float32, seed=0, lead=(3,)))
    layer.merge()
    merged = layer.base.weight.detach().clone()
    with torch.no_grad():
        layer.magnitude.mul_(2.0)
    with pytest.raises(ValueError, match="magnitude changed while the adapter was merged"):
        layer.unmerge()
    assert layer.merged
    assert_same(layer.base.weight, merged, "W' after the refused unmerge")  # nothing changed


# ------------------------------------------------------------------------------------ PEFT oracle

class OneLinear(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.lin = linear

    def forward(self, x):
        return self.lin(x)


def peft_twin(layer, case, dropout):
    """PEFT's DoRA (use_dora=True) on a copy of layer's base, holding layer's A, B and m."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(OneLinear(copy.deepcopy(layer.base)), peft.LoraConfig(
        r=case["r"], lora_alpha=case["alpha"], target_modules=["lin"], use_dora=True,
        lora_dropout=dropout, use_rslora=case["rslora"]))
    twin = model.base_model.model.lin
    assert twin.scaling["default"] == layer.scaling
    with torch.no_grad():
        twin.lora_A["default"].weight.copy_(layer.lora_A)
        twin.lora_B["default"].weight.copy_(layer.lora_B)
        twin.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    twin_params = [twin.lora_magnitude_vector["default"].weight, twin.lora_A["default"].weight,
                   twin.lora_B["default"].weight]
    return model.to(case["dtype"]), twin, twin_params


@given(cases(), st.booleans())
def test_matches_peft_dora_forward_gradients_and_merged_weight(case, train_with_dropout):
    # Train mode with dropout: both layers get the same fixed mask. Seeding the global RNG before
    # each forward would also work only while both libraries draw exactly the same random numbers in
    # the same order before the dropout, an implementation detail of each; a fixed mask makes the
    # comparison depend on the arithmetic alone.
    p = 0.5 if train_with_dropout else 0.0
    layer, x, gen = make_layer(case, dropout=p)
    model, twin, twin_params = peft_twin(layer, case, p)
    if train_with_dropout:
        layer.lora_dropout = FixedMaskDropout(x.shape, p, gen)
        twin.lora_dropout["default"] = layer.lora_dropout
        layer.train(), model.train()
    else:
        layer.eval(), model.eval()
    G = torch.randn(*case["lead"], case["out_features"], generator=gen, dtype=case["dtype"])
    outs, grads = [], []
    ours = [layer.magnitude, layer.lora_A, layer.lora_B]
    for module, params in ((layer, ours), (model, twin_params)):
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        outs.append(y.detach())
        grads.append(torch.autograd.grad(y, params + [xi], G))
    tol = TOL[case["dtype"]]
    mask = layer.lora_dropout.scale_mask if train_with_dropout else None
    bounds = error_bounds(layer, x, G, mask)
    assert_close_normwise(outs[0], outs[1], tol, bounds["y"])
    for name, g, e in zip(("magnitude", "lora_A", "lora_B", "x"), grads[0], grads[1]):
        assert_close_normwise(g, e, tol, bounds[name])
    if train_with_dropout:  # the dropout path was taken: the output is not the eval-mode one
        layer.eval()
        assert (layer(x) - outs[0]).abs().max() > 1e-3 * outs[0].abs().max()
    layer.merge()
    twin.merge()
    assert_close_normwise(layer.base.weight.detach(), twin.base_layer.weight.detach(), tol,
                          bounds["weight"])


def test_peft_gives_nan_on_a_zero_weight_row_where_dora_py_does_not():
    # The README states this difference (PEFT issue 2049); pinned here so the statement stays true.
    case = dict(out_features=4, in_features=3, r=2, alpha=4.0, rslora=False, bias=True,
                dtype=torch.float32, seed=7, lead=(2,))
    layer, x, _ = make_layer(case, trained=False)
    with torch.no_grad():
        layer.base.weight[1] = 0
        layer.magnitude.copy_(torch.linalg.vector_norm(layer.base.weight, dim=1))
    model, _, _ = peft_twin(layer, case, 0.0)
    assert torch.isnan(model(x)[:, 1]).all()
    torch.testing.assert_close(layer(x), layer.base(x), rtol=2e-6, atol=2e-6)
