"""Tests for lora.py: layer properties (Hypothesis), plumbing on the tiny GPT, PEFT as an oracle.

References are computed in float64 from the very tensors the code under test used (x, W, b, A,
B), so what is left is the rounding of the format under test. A sum of n terms computed in
floating point errs by at most about n·u·Σ|terms| (u = eps/2; Higham, "Accuracy and Stability of
Numerical Algorithms", section 3.1), whatever the cancellation in the result. So tolerances are
absolute, TOL[dtype] · scale, where `scale` is the largest Σ|terms| of the tensor: the same formula
evaluated on the absolute values of its inputs (every formula here is a sum of products with
positive weights).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import adapters
import lora
from assertions import assert_gradcheck, assert_same, gradients_and_term_sizes
from fast_paths import low_rank
from tiny_gpt import GPT, GPTConfig

# Tolerance as a multiple of `scale` (see the module docstring) for one forward or backward pass.
TOL = {
    torch.float64: 1e-12,  # other summation order than the reference: ~n·u = 1e-14 (seen: 4e-16)
    # float32: sums of at most in + r <= 100 terms. The worst case n·u = 6e-6 needs every rounding
    # to go the same way; they add like a random walk, ~sqrt(n)·u = 6e-7. Over 3000 random cases of
    # these strategies the largest error was 1.4e-7 (forward) and 1.9e-7 (gradients).
    torch.float32: 1e-6,
    # 16-bit bases: products are accumulated in float32 (negligible), then the result is rounded
    # to 16 bits once (base output), the adapter sum once more: 2u = eps (seen: 0.4 eps forward,
    # 0.6 eps for dL/dx).
    torch.bfloat16: 2 ** -7,  # bfloat16 eps
    torch.float16: 2 ** -10,  # float16 eps
}
DTYPES = (torch.float32, torch.float64, torch.bfloat16)  # the dtypes the issue names
MERGE_DTYPES = DTYPES + (torch.float16,)  # merge must work on any dtype a base weight has
# The fast path (add_low_rank_: y.addmm_(A x, B^T, alpha=s)) against the plain eq. 3 (lora_forward:
# y + s * ((x A^T) B^T)). Not bit-equal: the BLAS kernel behind addmm_ may sum the rank-r dot
# products in another order, fuse the scaling and the add, or round s·(B A x) first. Both sum the
# same terms, each within TOL · scale of the exact value (test_forward_equals_formula), so they
# agree within 2 TOL · scale; a 16-bit base rounds each float32 result once more: one eps more.
FAST_PATH_TOL = {torch.float64: 2 * TOL[torch.float64], torch.float32: 2 * TOL[torch.float32],
                 torch.bfloat16: 2 * TOL[torch.float32] + torch.finfo(torch.bfloat16).eps,
                 torch.float16: 2 * TOL[torch.float32] + torch.finfo(torch.float16).eps}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: with the 2 cores shared, OpenMP's thread hand-offs cost up to 100x
    the arithmetic (a tiny GPT forward: 180 ms on 2 threads under load, 0.5 ms on 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    """Documented in LoRALinear: adapters train in float32 beside a 16-bit base."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def reference(f, *tensors):
    """f evaluated exactly enough (float64), and its scale: max of f on the inputs' absolute
    values."""
    exact = f(*(t.detach().double() for t in tensors))
    scale = f(*(t.detach().double().abs() for t in tensors)).abs().max().item()
    return exact, scale


def assert_near(actual: torch.Tensor, exact: torch.Tensor, scale: float, tol: float) -> None:
    torch.testing.assert_close(actual.detach().double(), exact, rtol=0.0, atol=tol * scale)


@dataclass(frozen=True)
class Case:
    """One layer-level example: shapes, rank, alpha, dtype, seed."""
    in_features: int
    out_features: int
    r: int
    alpha: float
    dtype: torch.dtype
    bias: bool
    rslora: bool
    lead: tuple  # leading dims of x: (), (N,) or (batch, T)
    seed: int

    def scaling(self) -> float:  # computed here from the papers, not read from the layer under test
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    def build(self, trained: bool = True, dropout: float = 0.0):
        """(layer, x). `trained`: B drawn at random, so the adapter branch is not zero."""
        g = torch.Generator().manual_seed(self.seed)
        base = nn.Linear(self.in_features, self.out_features, bias=self.bias, dtype=self.dtype)
        with torch.no_grad():
            base.weight.copy_(torch.randn(base.weight.shape, generator=g, dtype=torch.float64))
            if self.bias:
                base.bias.copy_(torch.randn(base.bias.shape, generator=g, dtype=torch.float64))
        layer = lora.LoRALinear(base, self.r, self.alpha, dropout=dropout, rslora=self.rslora,
                                generator=g)
        if trained:
            with torch.no_grad():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g,
                                               dtype=torch.float64))
        x = torch.randn(*self.lead, self.in_features, generator=g, dtype=torch.float64)
        return layer, x.to(self.dtype)

    def weights(self, layer):
        """W, b (zeros when the base has none), A, B: the tensors the layer computes with."""
        b = layer.base.bias if self.bias else torch.zeros(self.out_features, dtype=self.dtype)
        return layer.base.weight, b, layer.lora_A, layer.lora_B


@st.composite
def cases(draw, dtypes=DTYPES):
    in_features = draw(st.integers(1, 48))
    out_features = draw(st.integers(1, 48))
    return Case(
        in_features, out_features,
        # up to full rank min(in, out) and beyond it, to max(in, out) (checks.check_rank)
        r=draw(st.integers(1, max(in_features, out_features))),
        alpha=draw(st.floats(0.125, 64.0)),
        dtype=draw(st.sampled_from(dtypes)),
        bias=draw(st.booleans()),
        rslora=draw(st.booleans()),
        lead=draw(st.sampled_from([(), (5,), (2, 3)])),
        seed=draw(st.integers(0, 2 ** 32 - 1)),
    )


def forward_formula(s: float):
    def f(x, W, b, A, B):
        return x @ W.T + b + s * (x @ A.T) @ B.T  # x W^T + b + s·x A^T B^T
    return f


# --------------------------------------------------------------------------------------------------
# Layer-level properties.

@given(cases(MERGE_DTYPES), st.sampled_from([0.0, 0.1, 0.5]))
def test_fresh_adapter_equals_base_exactly(case, p):
    """B = 0 at init: output, pure function and merged weight equal the base bit for bit (train mode
    with dropout on the adapter input included: the dropped input only meets B = 0)."""
    layer, x = case.build(trained=False, dropout=p)
    layer.train()
    W, b, A, B = case.weights(layer)
    base_out = F.linear(x, W, layer.base.bias)
    assert_same(layer(x), base_out, "fresh layer's output")
    assert_same(lora.lora_forward(x, W, layer.base.bias, A, B, layer.scaling), base_out,
                "lora_forward with B = 0")
    # B A with B = 0 holds -0.0 where A < 0: 0 as a number (torch.equal's sense), not in its bits
    assert_same(layer.delta_weight(), torch.zeros(case.out_features, case.in_features,
                                                  dtype=adapter_dtype(case.dtype)), "fresh ΔW",
                exact=False, rtol=0, atol=0)
    W0 = W.detach().clone()
    layer.merge()
    assert_same(layer.base.weight, W0, "W0 + fresh ΔW")


@given(cases())
def test_init_matches_nn_linear_and_formula(case):
    """A: Kaiming-uniform (a = sqrt 5), bit for bit what nn.Linear(in, r) draws from the same
    seed, whether seeded through the global RNG or a generator; B = 0; scaling; trainable count
    r·(in+out)."""
    base = nn.Linear(case.in_features, case.out_features, dtype=case.dtype)
    dt = adapter_dtype(case.dtype)
    torch.manual_seed(case.seed)
    expected_A = nn.Linear(case.in_features, case.r, bias=False, dtype=dt).weight.detach()
    torch.manual_seed(case.seed)
    layer = lora.LoRALinear(base, case.r, case.alpha, rslora=case.rslora)
    assert_same(layer.lora_A, expected_A, "lora_A (global RNG)")
    seeded = lora.LoRALinear(copy.deepcopy(base), case.r, case.alpha,
                             generator=torch.Generator().manual_seed(case.seed))
    assert_same(seeded.lora_A, expected_A, "lora_A (generator)")
    # gain sqrt(2 / (1 + a^2)) = sqrt(1/3), bound = gain · sqrt(3 / fan_in) = 1 / sqrt(in)
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(case.in_features)
    assert_same(layer.lora_B, torch.zeros(case.out_features, case.r, dtype=dt), "lora_B at init")
    assert layer.scaling == case.scaling()
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    assert adapters.count_trainable(layer) == case.r * (case.in_features + case.out_features)


@pytest.mark.exercise("lora.lora_scaling")
@given(r=st.integers(1, 64), alpha=st.floats(0.125, 64.0), rslora=st.booleans())
def test_scaling_is_alpha_over_r_or_alpha_over_sqrt_r_with_rslora(r, alpha, rslora):
    """s = α/r (LoRA, section 4.1); rsLoRA (arXiv 2312.03732) s = α/√r, so that s·√r, not s·r,
    stays α whatever the rank. The layer (its public caller) uses it, rslora off by default."""
    assert lora.lora_scaling(4, 8.0) == 2.0 and lora.lora_scaling(4, 8.0, rslora=True) == 4.0
    s = lora.lora_scaling(r, alpha, rslora)
    invariant = s * math.sqrt(r) if rslora else s * r  # what each paper keeps fixed as r grows
    # at most four roundings (sqrt, divide; sqrt, multiply here) of u = 2^-53 = 1.1e-16 each
    assert math.isclose(invariant, alpha, rel_tol=1e-15), (r, alpha, rslora, s)
    assert lora.LoRALinear(nn.Linear(r, 2), r, alpha, rslora=rslora).scaling == s
    assert lora.LoRALinear(nn.Linear(r, 2), r, alpha).scaling == lora.lora_scaling(r, alpha)


@given(cases())
def test_forward_equals_formula(case):
    """h = x W^T + b + s·x A^T B^T, for the module and the pure function `lora_forward`."""
    layer, x = case.build()
    W, b, A, B = case.weights(layer)
    exact, scale = reference(forward_formula(case.scaling()), x, W, b, A, B)
    out = layer(x)
    assert out.dtype == case.dtype and out.shape == (*case.lead, case.out_features)
    assert_near(out, exact, scale, TOL[case.dtype])
    # The layer is the fast path: the base's output, then add_low_rank_ into it, bit for bit.
    tokens = x.reshape(-1, case.in_features)  # (N, in)
    fast = low_rank.add_low_rank_(F.linear(tokens, W, layer.base.bias), tokens, A, B,
                                  layer.scaling)
    assert_same(fast.view(out.shape), out, "add_low_rank_ against the layer")
    # ... and the plain eq. 3 (lora_forward) within FAST_PATH_TOL (see there).
    plain = lora.lora_forward(x, W, layer.base.bias, A, B, layer.scaling)
    assert plain.dtype == out.dtype
    assert_near(out, plain.double(), scale, FAST_PATH_TOL[case.dtype])


@pytest.mark.exercise("lora.lora_forward")
@given(cases(dtypes=(torch.float32, torch.float64)), st.sampled_from([None, 0.5]))
def test_lora_forward_is_eq3_with_dropout_on_the_update_only(case, p):
    """lora.lora_forward on plain tensors: h = x W0^T + b + s d(x) A^T B^T, the dropout d (a fixed
    mask here, scaled by 1/(1-p)) on the update's input only, against float64 within TOL · scale."""
    x, W, b, A, B, _ = (t.to(case.dtype) for t in random_lora(case))
    s = case.scaling()
    mask = None
    if p is not None:
        keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(case.seed)) >= p
        mask = (keep / (1 - p)).to(case.dtype)  # 0 or 2 exactly
    dropout = None if mask is None else (lambda t: t * mask)
    dropped = x if mask is None else x * mask  # exact: times 0 or 2
    exact, scale = reference(lambda x, xd, W, b, A, B: x @ W.T + b + s * (xd @ A.T) @ B.T,
                             x, dropped, W, b, A, B)
    out = lora.lora_forward(x, W, b, A, B, s, dropout=dropout)
    assert out.dtype == case.dtype and out.shape == (*case.lead, case.out_features)
    assert_same(out.double(), exact, "lora_forward", exact=False, rtol=0.0,
                atol=TOL[case.dtype] * scale)


@pytest.mark.exercise("lora.lora_delta")
@given(cases(MERGE_DTYPES))
def test_delta_weight_and_merged_output(case):
    """ΔW = s·B A (`lora_delta`, `delta_weight`); merged output equals unmerged."""
    layer, x = case.build()
    s = case.scaling()
    exact, scale = reference(lambda A, B: s * torch.einsum("or,ri->oi", B, A),
                             layer.lora_A, layer.lora_B)
    tol_adapter = TOL[adapter_dtype(case.dtype)]
    assert_near(layer.delta_weight(), exact, scale, tol_adapter)
    assert_same(lora.lora_delta(layer.lora_A, layer.lora_B, layer.scaling),
                layer.delta_weight(), "lora_delta against delta_weight")
    unmerged = layer(x)
    layer.merge()
    merged = layer(x)
    _, scale = reference(forward_formula(s), x, *case.weights(layer))
    # Unmerged is within TOL of the exact output. Merged rounds ΔW to W's dtype, then W + ΔW, then
    # the output: up to 3u = 1.5 TOL for 16-bit bases. So the two differ by at most 2.5 TOL; use 3.
    assert_near(merged, unmerged.double(), scale, 3 * TOL[case.dtype])


@given(cases(MERGE_DTYPES))
def test_merge_unmerge_restores_weight_and_both_are_idempotent(case):
    """merge: W1 = W0 + ΔW in W0's dtype; merge again: no-op; unmerge: W0 up to one rounding."""
    layer, _ = case.build()
    W0 = layer.base.weight.detach().clone()
    s = case.scaling()
    delta, delta_scale = reference(lambda A, B: s * B @ A, layer.lora_A, layer.lora_B)
    finfo = torch.finfo(case.dtype)
    subnormal_step = finfo.smallest_normal * finfo.eps  # near zero rounding is absolute
    layer.merge()
    W1 = layer.base.weight.detach().clone()
    assert layer.merged and W1.dtype == case.dtype
    layer.merge()
    assert_same(layer.base.weight, W1, "W after a second merge")
    # W1 = fl(W0 + fl(ΔW)): |W1 - (W0 + ΔW)| <= u|W1| + u|ΔW| + (error of ΔW computed in the
    # adapter's dtype, within its TOL · scale as in test_delta_weight_and_merged_output).
    torch.testing.assert_close(W1.double(), W0.double() + delta, rtol=finfo.eps,
                               atol=finfo.eps * delta.abs().max().item() + subnormal_step
                               + TOL[adapter_dtype(case.dtype)] * delta_scale)
    layer.unmerge()
    W2 = layer.base.weight.detach().clone()
    assert not layer.merged
    layer.unmerge()
    assert_same(layer.base.weight, W2, "W after a second unmerge")
    # W2 = fl(W1 - fl(ΔW)) = fl(W0 + e) with e the merge's rounding: |W2 - W0| <= u|W1| + u|W2|
    # <= eps·|W0| + u·|ΔW| (+ one subnormal step): W0 comes back up to one rounding. (The atol
    # below allows 2u·|ΔW| for bfloat16's double rounding: the sum is rounded to float32, then to
    # 16 bits.)
    torch.testing.assert_close(W2, W0, rtol=finfo.eps,
                               atol=finfo.eps * delta.abs().max().item() + subnormal_step)


@given(cases())
def test_gradients_are_eq3s_and_only_adapters_get_them(case):
    """The layer's gradients of B, A and x equal float64 autograd through eq. 3 written out
    (forward_formula), each within its dtype's TOL times the size of its terms
    (gradients_and_term_sizes); the base layer's weight and bias receive no gradient."""
    layer, x = case.build()
    x.requires_grad_(True)
    out = layer(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(case.seed + 1),
                    dtype=torch.float64).to(out.dtype)
    out.backward(g)  # dL/dout = g
    s = case.scaling()
    W, b, A, B = case.weights(layer)
    assert s > 0  # alpha > 0 in cases(): the formula has nonnegative coefficients
    (dx, dA, dB), (size_x, size_A, size_B) = gradients_and_term_sizes(
        forward_formula(s), (x, W, b, A, B), (0, 3, 4), g)
    tol_adapter = TOL[adapter_dtype(case.dtype)]  # g and x reach the adapter exactly (casts up)
    assert_near(layer.lora_B.grad, dB, size_B, tol_adapter)
    assert_near(layer.lora_A.grad, dA, size_A, tol_adapter)
    # dx: base part rounded, adapter part rounded, their sum rounded: 3u·size <= TOL for 16 bits
    assert_near(x.grad, dx, size_x, TOL[case.dtype])
    assert layer.base.weight.grad is None
    assert layer.base.bias is None or layer.base.bias.grad is None
    assert not layer.base.weight.requires_grad


# --------------------------------------------------------------------------------------------------
# LoRA's gradients by hand (lora.lora_grads), against autograd and against finite differences.

def random_lora(case: Case):
    """Float64 x, W0, b, A, B and an upstream gradient G for `case`'s shapes (B nonzero)."""
    g = torch.Generator().manual_seed(case.seed)

    def draw(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    return (draw(*case.lead, case.in_features), draw(case.out_features, case.in_features),
            draw(case.out_features), draw(case.r, case.in_features),
            draw(case.out_features, case.r), draw(*case.lead, case.out_features))


@pytest.mark.exercise("lora.lora_grads")
@given(cases(dtypes=(torch.float64,)))
def test_lora_grads_by_hand_equal_autograd(case):
    """lora.lora_grads' dL/dx, dL/dA and dL/dB against autograd through eq. 3, all in float64:
    only the order of the sums differs, so each within TOL[float64] times the size of its terms
    (autograd on the absolute values, gradients_and_term_sizes; module docstring)."""
    x, W, b, A, B, G = random_lora(case)
    s = case.scaling()
    leaves = [t.clone().requires_grad_(True) for t in (x, A, B)]
    y = forward_formula(s)(leaves[0], W, b, leaves[1], leaves[2])
    expected = torch.autograd.grad(y, leaves, G)
    got = lora.lora_grads(x, W, A, B, s, G)
    # each result's terms' size: autograd on absolute values (s > 0 in cases())
    scales = gradients_and_term_sizes(forward_formula(s), (x, W, b, A, B), (0, 3, 4), G)[1]
    for name, actual, wanted, scale in zip(("dL/dx", "dL/dA", "dL/dB"), got, expected, scales):
        assert_same(actual, wanted, name, exact=False, rtol=0.0, atol=TOL[torch.float64] * scale)


class HandLoRA(torch.autograd.Function):
    """Eq. 3 with lora.lora_grads as its backward, for torch.autograd.gradcheck."""

    @staticmethod
    def forward(ctx, x, A, B, W, scaling):
        ctx.save_for_backward(x, A, B, W)
        ctx.scaling = scaling
        return forward_formula(scaling)(x, W, 0.0, A, B)

    @staticmethod
    def backward(ctx, grad_out):
        x, A, B, W = ctx.saved_tensors
        return (*lora.lora_grads(x, W, A, B, ctx.scaling, grad_out), None, None)


@pytest.mark.exercise("lora.lora_grads")
@pytest.mark.parametrize("in_features, out_features, r, lead", [(5, 3, 2, (4,)), (2, 6, 3, (2, 3)),
                                                                 (4, 4, 1, ())])
def test_lora_grads_pass_gradcheck(in_features, out_features, r, lead):
    """torch.autograd.gradcheck: lora.lora_grads against central finite differences of eq. 3 in
    float64 (gradcheck's own tolerances), a reference that shares nothing with autograd."""
    case = Case(in_features, out_features, r, 3.0, torch.float64, False, True, lead, 7)
    x, W, _, A, B, _ = random_lora(case)
    inputs = tuple(t.requires_grad_(True) for t in (x, A, B))
    assert_gradcheck(lambda x, A, B: HandLoRA.apply(x, A, B, W, case.scaling()), inputs,
                     "lora.lora_grads")


# --------------------------------------------------------------------------------------------------
# Unmerge with a 16-bit base weight: docs/lora.md, "Precision".

@given(cases(dtypes=(torch.float16, torch.bfloat16)))
def test_unmerge_of_a_16_bit_base_restores_W0_up_to_one_rounding(case):
    """docs/lora.md states: merge stores W1 = fl(W0 + ΔW), unmerge computes W0' = fl(W1 − ΔW), and
    |W0' − W0| <= u·|W1| + u·|W0'| elementwise, u half the dtype's eps (adapters.py: "exact up to
    one rounding of the sum per element"). That bound is the standard model of rounding, which holds
    for normal numbers; where float16 underflows, each of the two roundings errs by up to half a
    subnormal step instead, so one step is added (bfloat16 has float32's range: no such case)."""
    layer, _ = case.build()
    finfo = torch.finfo(case.dtype)
    u, subnormal_step = finfo.eps / 2, finfo.smallest_normal * finfo.eps
    W0 = layer.base.weight.detach().clone()
    layer.merge()
    W1 = layer.base.weight.detach().clone()
    layer.unmerge()
    W2 = layer.base.weight.detach().clone()
    error = (W2.double() - W0.double()).abs()
    bound = u * (W1.double().abs() + W2.double().abs()) + subnormal_step
    assert bool((error <= bound).all()), f"worst excess {(error - bound).max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unmerge_of_a_16_bit_base_is_not_bit_for_bit(dtype):
    """... and not bit for bit, as docs/lora.md warns: W0 = 1 + ulp, ΔW = ulp/2 (exact in every
    dtype here). W0 + ΔW is a tie that rounds to even, 1 + 2 ulp; minus ΔW is a tie again, which
    rounds to 1 + 2 ulp, not back to W0. The bound above holds with equality: u·(|W1| + |W0'|)."""
    ulp = torch.finfo(dtype).eps  # the spacing of the floats in [1, 2)
    base = nn.Linear(1, 1, bias=False, dtype=dtype)
    layer = lora.LoRALinear(base, r=1, alpha=1.0)  # s = 1
    with torch.no_grad():
        base.weight.fill_(1 + ulp)
        layer.lora_A.fill_(1.0)
        layer.lora_B.fill_(ulp / 2)  # ΔW = 1 · (ulp/2 · 1), exact
    layer.merge()
    assert_same(layer.base.weight, torch.full((1, 1), 1 + 2 * ulp, dtype=dtype), "W1")
    layer.unmerge()
    assert_same(layer.base.weight, torch.full((1, 1), 1 + 2 * ulp, dtype=dtype),
                "W0' (W0 = 1 + ulp is not restored)")


@given(cases(dtypes=(torch.float32, torch.float64)), st.sampled_from([0.1, 0.5, 0.9]),
       st.integers(0, 2 ** 32 - 1))
def test_dropout_on_adapter_input_only(case, p, dropout_seed):
    """Train mode: h = x W^T + b + s·(m ⊙ x / (1-p)) A^T B^T, m ~ Bernoulli(1-p) drawn from the
    global RNG as nn.Dropout does; the base part sees the undropped x. Eval mode: no dropout."""
    layer, x = case.build(dropout=p)
    W, b, A, B = case.weights(layer)
    s = case.scaling()
    layer.train()
    torch.manual_seed(dropout_seed)
    out = layer(x)
    torch.manual_seed(dropout_seed)
    mask = torch.empty(x.shape, dtype=x.dtype).bernoulli_(1 - p)
    exact, scale = reference(lambda x, xd, W, b, A, B: x @ W.T + b + s * (xd @ A.T) @ B.T,
                             x, x.double() * mask.double() / (1 - p), W, b, A, B)
    assert_near(out, exact, scale, TOL[case.dtype])
    torch.manual_seed(dropout_seed)
    plain = lora.lora_forward(x, W, layer.base.bias, A, B, layer.scaling, dropout=nn.Dropout(p))
    assert_near(out, plain.double(), scale, FAST_PATH_TOL[case.dtype])  # the same mask
    layer.eval()
    exact, scale = reference(forward_formula(s), x, W, b, A, B)
    assert_near(layer(x), exact, scale, TOL[case.dtype])


@given(cases())
def test_add_low_rank__adds_into_y_unless_the_dtypes_differ(case):
    """The layer adds the low-rank term into the base's fresh output (`add_low_rank_`, no copy of
    the activations): into y itself when y has the adapter's dtype, else into a copy, leaving y
    alone. Either way the bits are those of the same add into a copy of y."""
    layer, x = case.build()
    W, b, A, B = (t.detach() for t in case.weights(layer))
    x2 = x.reshape(-1, case.in_features)  # (N, in)
    y = F.linear(x2, W, b)  # (N, out)
    y0 = y.clone()
    on_a_copy = low_rank.add_low_rank_(y.to(A.dtype, copy=True), x2, A, B, case.scaling())
    assert_same(y, y0, "y after the add into a copy")
    assert on_a_copy is not y
    in_place = low_rank.add_low_rank_(y, x2, A, B, case.scaling())
    assert_same(in_place, on_a_copy.to(y.dtype), "add_low_rank_ into y against into a copy")
    assert (in_place is y) == (y.dtype == A.dtype)
    assert_same(y, in_place if y.dtype == A.dtype else y0, "y after add_low_rank_")


def test_train_and_eval_never_merge():
    """loralib merges inside eval(); here only an explicit merge() touches the base weight."""
    layer, x = Case(8, 6, 2, 4.0, torch.float32, True, False, (3,), 0).build()
    W0, out0 = layer.base.weight.detach().clone(), layer(x)
    for mode in (layer.eval, layer.train, layer.eval):
        mode()
        assert not layer.merged
        assert_same(layer.base.weight, W0, f"W after {mode.__name__}()")
        assert_same(layer(x), out0, f"output after {mode.__name__}()")
    layer.merge()
    W1 = layer.base.weight.detach().clone()
    for mode in (layer.train, layer.eval):
        mode()
        assert layer.merged
        assert_same(layer.base.weight, W1, f"merged W after {mode.__name__}()")


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "rank"), (dict(r=-2), "rank"), (dict(r=2.0), "rank"), (dict(r=True), "rank"),
    (dict(alpha=0.0), "alpha"), (dict(alpha=-1.0), "alpha"), (dict(alpha=float("nan")), "alpha"),
    (dict(alpha=float("inf")), "alpha"), (dict(alpha="16"), "alpha"),
    (dict(dropout=1.0), "dropout"), (dict(dropout=-0.1), "dropout"),
])
def test_bad_hyperparameters_raise(kwargs, match):
    args = dict(r=2, alpha=4.0, dropout=0.0) | kwargs
    with pytest.raises(ValueError, match=match):
        lora.LoRALinear(nn.Linear(4, 3), **args)


def test_bad_base_raises():
    with pytest.raises(TypeError, match="in_features"):
        lora.LoRALinear(nn.ReLU(), 2, 4.0)
    with pytest.raises(TypeError, match="stack"):
        lora.LoRALinear(lora.LoRALinear(nn.Linear(4, 3), 2, 4.0), 2, 4.0)
    with pytest.raises(ValueError, match="base weight is a meta tensor"):  # no data to adapt
        lora.LoRALinear(nn.Linear(4, 3, device="meta"), 2, 4.0)
    with pytest.raises(TypeError, match="rslora"):
        lora.LoRALinear(nn.Linear(4, 3), 2, 4.0, rslora="yes")


def test_rank_beyond_both_widths_is_refused_before_allocating():
    """r <= max(in, out) is allowed (PEFT allows r > min(in, out)); beyond that, a ValueError that
    names r and the layer, raised before allocating (10**12 x 16 floats would not fit)."""
    assert lora.LoRALinear(nn.Linear(3, 5), 5, 4.0).lora_A.shape == (5, 3)
    with pytest.raises(ValueError, match=r"r \(the rank\) = 6 .*\(3 in, 5 out\)"):
        lora.LoRALinear(nn.Linear(3, 5), 6, 4.0)
    model = make_gpt()
    with pytest.raises(ValueError, match=r"= 1000000000000 .*'blocks.0.attn.q_proj'"):
        lora.apply_lora(model, r=10**12)
    assert not adapters.adapter_layers(model)


def test_bad_options_are_refused_before_apply_lora_touches_the_model():
    model = make_gpt()
    flags = [p.requires_grad for p in model.parameters()]
    for kwargs, match in [(dict(alpha=-1.0), "alpha"), (dict(dropout=1.0), "dropout"),
                          (dict(rslora=1), "rslora"), (dict(r=0), "rank")]:
        with pytest.raises((ValueError, TypeError), match=match):
            lora.apply_lora(model, **kwargs)
    assert not adapters.adapter_layers(model)
    assert [p.requires_grad for p in model.parameters()] == flags  # nothing frozen either


def test_a_0d_input_is_a_clear_error():
    layer = lora.LoRALinear(nn.Linear(4, 3), 2, 4.0)
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \(\.\.\., in_features=4\)"):
        layer(torch.tensor(1.0))


# --------------------------------------------------------------------------------------------------
# A quantized-style base (what qlora.NF4Linear provides): `dequantized_weight()`, `linear_like`.

class FakeQuantizedLinear(nn.Module):
    linear_like = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("codes", weight.clone())
        self.register_buffer("bias", bias.clone())

    def dequantized_weight(self) -> torch.Tensor:
        return self.codes

    def forward(self, x):
        return F.linear(x, self.dequantized_weight(), self.bias)


def test_quantized_base_forward_and_merge():
    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(5, 7, generator=g), torch.randn(5, generator=g)
    model = nn.Sequential(FakeQuantizedLinear(W, b))
    assert adapters.find_targets(model, "all-linear") == ["0"]
    lora.apply_lora(model, r=3, alpha=6.0, seed=0)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(5, 3, generator=g))
    x = torch.randn(4, 7, generator=g)
    exact, scale = reference(forward_formula(2.0), x, W, b, layer.lora_A, layer.lora_B)
    assert_near(model(x), exact, scale, TOL[torch.float32])
    with pytest.raises(TypeError, match="merge_adapters"):
        layer.merge()
    merged = adapters.merge_adapters(model)
    assert type(merged[0]) is nn.Linear
    assert_same(merged[0].weight, W + layer.delta_weight(), "merged weight")
    assert_same(merged[0].bias, b, "merged bias")


# --------------------------------------------------------------------------------------------------
# Model-level plumbing on the tiny GPT.

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


def make_gpt(seed: int = 0, n_layer: int = 2, n_embd: int = 16) -> GPT:
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=n_layer, n_head=2, n_embd=n_embd)
    return GPT(config, generator=torch.Generator().manual_seed(seed))


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model: nn.Module, seed: int) -> None:
    """Stand-in for training: B != 0 so adapted outputs differ from the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapters.adapter_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))


def linear_names(model: nn.Module, suffixes=BLOCK_LINEARS) -> list[str]:
    """Independent of adapters.find_targets: named nn.Linear modules whose last name is a suffix."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in suffixes]


gpt_shapes = dict(n_layer=st.integers(1, 2), n_embd=st.sampled_from([16, 24, 32]),
                  r=st.integers(1, 16), seed=st.integers(0, 2 ** 32 - 1))  # r <= C: check_rank


@given(**gpt_shapes)
def test_all_linear_adapts_block_linears_freezes_the_rest_and_starts_at_base(n_layer, n_embd, r,
                                                                              seed):
    model = make_gpt(seed, n_layer, n_embd)
    base_logits, _ = model(tokens(seed))
    targets = linear_names(model)
    assert len(targets) == 6 * n_layer and "lm_head" not in targets
    assert adapters.find_targets(model, "all-linear") == targets
    assert lora.apply_lora(model, "all-linear", r=r, alpha=2.0 * r, seed=seed) is model
    assert sorted(adapters.adapter_layers(model)) == sorted(targets)
    assert type(model.lm_head) is nn.Linear
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{t}.lora_{m}" for t in targets for m in "AB"}
    # r·(in + out) per layer: q, k, v, o are C -> C; up is C -> 4C and down 4C -> C: 18·r·C a block
    assert adapters.count_trainable(model) == n_layer * 18 * r * n_embd
    assert model.num_parameters() == make_gpt(seed, n_layer, n_embd).num_parameters() + \
        n_layer * 18 * r * n_embd
    logits, _ = model(tokens(seed))
    assert_same(logits, base_logits, "logits of the fresh adapters")


def test_only_adapters_receive_gradients_in_the_model():
    model = lora.apply_lora(make_gpt(), r=2, alpha=4.0, seed=0)
    randomize_adapters(model, 1)
    _, loss = model(tokens(0), tokens(1))
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)


def test_apply_lora_seed_is_deterministic():
    states = [adapters.adapter_state_dict(lora.apply_lora(make_gpt(), r=4, alpha=8.0, seed=s))
              for s in (7, 7, 8)]
    assert states[0].keys() == states[2].keys()
    for k in states[0]:
        assert_same(states[0][k], states[1][k], f"{k}, seed 7 twice")
    # Another seed, other A: a deliberate "differs" check, so no assert_same.
    assert not any(torch.equal(states[0][k], states[2][k]) for k in states[0] if k.endswith("A"))


# --------------------------------------------------------------------------------------------------
# PEFT as the oracle: the same base layer and the same A, B.

@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


class OneLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def test_init_matches_peft_under_the_same_seed(peft):
    """PEFT builds lora_A = nn.Linear(in, r) and lora_B = nn.Linear(r, out) (each drawing its
    default init), then re-draws lora_A Kaiming-uniform: ours equals that third draw after skipping
    two."""
    for in_f, out_f, r in [(7, 5, 3), (1, 4, 3), (48, 2, 9)]:  # r <= max(in, out)
        base = nn.Linear(in_f, out_f)
        torch.manual_seed(0)
        model = peft.get_peft_model(OneLinear(copy.deepcopy(base)),
                                    peft.LoraConfig(r=r, lora_alpha=8, target_modules=["proj"]))
        torch.manual_seed(0)
        nn.Linear(in_f, r, bias=False)  # the two draws PEFT discards
        nn.Linear(r, out_f, bias=False)
        ours = lora.LoRALinear(base, r, 8.0)
        assert_same(ours.lora_A, model.base_model.model.proj.lora_A["default"].weight,
                    f"lora_A against PEFT's ({in_f} in, {out_f} out, r {r})")


@given(cases(dtypes=(torch.float32,)), st.sampled_from([0.0, 0.3]), st.integers(0, 2 ** 32 - 1))
def test_matches_peft_forward_gradients_and_merge(peft, case, p, dropout_seed):
    layer, x = case.build(dropout=p)
    theirs = peft.get_peft_model(
        OneLinear(copy.deepcopy(layer.base)),
        peft.LoraConfig(r=case.r, lora_alpha=case.alpha, target_modules=["proj"],
                        use_rslora=case.rslora, lora_dropout=p))
    proj = theirs.base_model.model.proj
    A_p, B_p = proj.lora_A["default"].weight, proj.lora_B["default"].weight
    with torch.no_grad():
        A_p.copy_(layer.lora_A)
        B_p.copy_(layer.lora_B)
    assert layer.scaling == proj.scaling["default"]
    layer.train()
    theirs.train()
    x_ours, x_theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    torch.manual_seed(dropout_seed)  # both draw the dropout mask first thing after the base matmul
    out = layer(x_ours)
    torch.manual_seed(dropout_seed)
    out_p = theirs(x_theirs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(case.seed + 1))
    out.backward(g)
    out_p.backward(g)
    # Both in float32 with other summation orders (addmm with alpha=s vs (B(Ax))·s added): each is
    # within TOL·scale of the exact value, so they agree within 2·TOL·scale.
    W, b, A, B = case.weights(layer)
    _, scale = reference(forward_formula(case.scaling()), x, W, b, A, B)
    assert_near(out, out_p.double(), scale, 2 * TOL[torch.float32])
    s = case.scaling()
    # the terms' sizes with every input to the update at its largest, x / (1 - p) (a kept element)
    _, (size_x, size_A, size_B) = gradients_and_term_sizes(
        lambda x, W, b, A, B: x @ W.T + b + s * (x / (1 - p) @ A.T) @ B.T, (x, W, b, A, B),
        (0, 3, 4), g)
    assert_near(layer.lora_B.grad, B_p.grad.double(), size_B, 2 * TOL[torch.float32])
    assert_near(layer.lora_A.grad, A_p.grad.double(), size_A, 2 * TOL[torch.float32])
    assert_near(x_ours.grad, x_theirs.grad.double(), size_x, 2 * TOL[torch.float32])
    # merge: the same float32 operations in the same order (B @ A, times s, added to W): bit-equal
    assert_same(layer.delta_weight(), proj.get_delta_weight("default"), "ΔW against PEFT's")
    layer.merge()
    unloaded = theirs.merge_and_unload()
    assert type(unloaded.proj) is nn.Linear
    assert_same(layer.base.weight, unloaded.proj.weight, "merged weight against PEFT's")
