"""Tests for vera.py: VeRA's equation, init, shared matrices, gradients, adapter files, PEFT's VeRA.

Tolerances (stated next to each comparison):
- exact (rtol=0, atol=0) where both sides run the same float operations: a fresh adapter adds exact
  zeros; merge adds vera_delta to the weight; a saved and reloaded adapter recomputes the same bits.
- float32 against a float64 reference of the equation: rtol 1e-5, atol 1e-6. The float32 side sums
  up to 64 products per dot product in another order; the error bound is about K * eps = 64 * 6e-8
  = 4e-6 of the sum of |terms|, which atol covers where the terms cancel.
- float64: rtol 1e-12, atol 1e-12 (the same bound with eps = 1.1e-16).
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import adapters
import lora
import vera
from assertions import assert_gradcheck, assert_same, gradients_and_term_sizes
from fast_paths import low_rank
from formats import adapter_files
from tiny_gpt import GPT, GPTConfig
from vera import VeRALinear, VeRAProjection

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}
EXACT = dict(rtol=0, atol=0)

# torch's CPU generator seeds its Mersenne Twister from the low 32 bits of the seed: seeds that
# differ by a multiple of 2**32 draw the same matrices (vera.vera_projections says so).
seeds = st.integers(0, 2**32 - 1)
dtypes = st.sampled_from([torch.float32, torch.float64])


@st.composite
def layer_shapes(draw):
    """(in, out, r, max_in, max_out): a layer and shared matrices at least as large."""
    n_in, n_out, r = draw(st.integers(1, 24)), draw(st.integers(1, 24)), draw(st.integers(1, 16))
    return n_in, n_out, r, n_in + draw(st.integers(0, 8)), n_out + draw(st.integers(0, 8))


def make_layer(shape, seed, dtype, random_vectors=True, d_initial=0.1):
    """A VeRALinear over a random nn.Linear; with `random_vectors`, lambda_d and lambda_b random."""
    n_in, n_out, r, max_in, max_out = shape
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(n_in, n_out, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(n_out, n_in, generator=gen, dtype=dtype))
        base.bias.copy_(torch.randn(n_out, generator=gen, dtype=dtype))
    projection = VeRAProjection(r, max_in, max_out, seed, dtype=vera.adapter_dtype(dtype))
    layer = VeRALinear(base, projection, d_initial=d_initial)
    if random_vectors:
        with torch.no_grad():
            layer.lambda_d.copy_(torch.randn(r, generator=gen, dtype=dtype))
            layer.lambda_b.copy_(torch.randn(n_out, generator=gen, dtype=dtype))
    x = torch.randn(3, 2, n_in, generator=gen, dtype=dtype)  # (B, T, in)
    return layer, x


def tiny_gpt(n_layer=2, n_embd=16, seed=0, dtype=torch.float32):
    config = GPTConfig(vocab_size=23, n_layer=n_layer, n_head=2, n_embd=n_embd, block_size=8)
    return GPT(config, generator=torch.Generator().manual_seed(seed)).to(dtype)


def token_batch(seed=0):
    return torch.randint(0, 23, (2, 8), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomize_vectors(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for layer in vera.vera_layers(model).values():
        for p in (layer.lambda_d, layer.lambda_b):
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


# --------------------------------------------------------------------------------------------------
# The shared matrices.

@pytest.mark.exercise("vera.vera_projections")
@pytest.mark.parametrize("r, max_in, max_out, seed", [(16, 96, 128, 0), (64, 32, 24, 1)])
def test_projections_are_kaiming_uniform_with_the_relu_gain(r, max_in, max_out, seed):
    """VeRA section 3 draws A and B Kaiming-uniform; PEFT's gain is sqrt(2) (ReLU) with fan_in the
    second dimension: U(-b, b), b = sqrt(3) · sqrt(2) / sqrt(fan_in), standard deviation
    sqrt(2 / fan_in). Checked without PEFT, from both sides, on n >= 1536 draws per matrix:
    - every |entry| <= b, and the largest >= 0.99 b (n uniform draws all stay under 0.99 b with
      probability 0.99^n < 1e-6): another gain moves b, and one of the two bounds fails;
    - the sample standard deviation within 5 % of sqrt(2 / fan_in) (its relative standard error
      is sqrt(0.2 / n) < 1.2 % here, so 5 % is over 4 standard errors)."""
    A, B = vera.vera_projections(r, max_in, max_out, seed)
    for name, M, fan_in in (("A", A, max_in), ("B", B, r)):
        bound, std = math.sqrt(6 / fan_in), math.sqrt(2 / fan_in)
        largest = float(M.abs().max())
        assert largest <= bound, (
            f"{name}: an entry of size {largest:.4g} lies outside U(-b, b), b = sqrt(6 / fan_in) "
            f"= {bound:.4g} for fan_in = {fan_in}: the gain is too large, or fan_in is wrong")
        assert largest >= 0.99 * bound, (
            f"{name}: the largest entry is {largest:.4g}, but {M.numel()} draws of U(-b, b) reach "
            f"0.99 b, b = sqrt(6 / fan_in) = {bound:.4g} for fan_in = {fan_in}: the gain is too "
            "small, or fan_in is wrong")
        assert abs(float(M.std()) / std - 1) < 0.05, (
            f"{name}: standard deviation {float(M.std()):.4g}, expected sqrt(2 / fan_in) = "
            f"{std:.4g} (the ReLU gain sqrt(2), fan_in = {fan_in})")


@pytest.mark.exercise("vera.vera_projections")
@given(r=st.integers(1, 16), max_in=st.integers(1, 40), max_out=st.integers(1, 40), seed=seeds,
       other=seeds, extra_out=st.integers(1, 8))
def test_projections_seeded_bounded_and_drawn_a_first(r, max_in, max_out, seed, other, extra_out):
    A, B = vera.vera_projections(r, max_in, max_out, seed)
    assert A.shape == (r, max_in) and B.shape == (max_out, r)
    assert A.dtype == B.dtype == torch.float32
    A2, B2 = vera.vera_projections(r, max_in, max_out, seed)
    torch.testing.assert_close(A2, A, **EXACT)  # same seed, same bits
    torch.testing.assert_close(B2, B, **EXACT)
    if other != seed:
        A3, B3 = vera.vera_projections(r, max_in, max_out, other)
        # a deliberate "differs" check (another seed, other matrices): no assert_same
        assert not torch.equal(A3, A) and not torch.equal(B3, B)
    # Kaiming-uniform: |entries| <= sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = the second dimension
    assert A.abs().max() <= math.sqrt(6 / max_in) and B.abs().max() <= math.sqrt(6 / r)
    # A is drawn first, so it does not depend on B's shape
    A4, _ = vera.vera_projections(r, max_in, max_out + extra_out, seed)
    torch.testing.assert_close(A4, A, **EXACT)


def test_all_layers_share_one_storage_also_after_to_and_deepcopy():
    model = vera.apply_vera(tiny_gpt(), "all-linear", r=4, seed=1)
    projection = vera.vera_projection_of(model)

    def check(model, projection, dtype):
        layers = vera.vera_layers(model).values()
        assert len(layers) == 12  # 2 blocks x 6 linears
        for layer in layers:
            assert layer.vera_projection is projection
            pairs = ((layer.vera_A, projection.vera_A), (layer.vera_B, projection.vera_B))
            for view, full in pairs:
                assert view.dtype == dtype
                assert view.untyped_storage().data_ptr() == full.untyped_storage().data_ptr()
                assert view.data_ptr() == full.data_ptr()  # a slice from the start, not a copy
        assert next(iter(layers)).vera_A.shape == (4, 16)  # q_proj: (r, in)

    check(model, projection, torch.float32)
    model.to(torch.float64)  # converts the shared pair once; every layer still slices it
    check(model, projection, torch.float64)
    model.to("cpu")
    check(model, projection, torch.float64)
    twin = copy.deepcopy(model)  # what adapters.merge_adapters does
    twin_projection = vera.vera_projection_of(twin)
    check(twin, twin_projection, torch.float64)
    assert twin_projection.vera_A.data_ptr() != projection.vera_A.data_ptr()
    # the matrices are in no state dict: neither the model's nor the adapter's
    assert not [k for k in model.state_dict() if "vera_A" in k or "vera_B" in k]
    assert all(k.endswith((".lambda_d", ".lambda_b")) for k in adapters.adapter_state_dict(model))


# --------------------------------------------------------------------------------------------------
# The layer: init, equation, gradients, merge.

@given(shape=layer_shapes(), seed=seeds, dtype=st.sampled_from([torch.float32, torch.float64,
                                                                 torch.bfloat16]),
       d_initial=st.floats(-2, 2).filter(lambda d: d != 0))
def test_fresh_adapter_equals_base(shape, seed, dtype, d_initial):
    layer, x = make_layer(shape, seed, dtype, random_vectors=False, d_initial=d_initial)
    assert_same(layer.lambda_b, torch.zeros(shape[1], dtype=layer.lambda_b.dtype), "λ_b at init")
    d = torch.full((shape[2],), d_initial, dtype=layer.lambda_d.dtype)
    assert_same(layer.lambda_d, d, "λ_d at init")
    y = layer(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, layer.base(x), **EXACT)  # lambda_b = 0 adds exact zeros


def test_fresh_adapter_leaves_the_gpt_unchanged():
    model, idx = tiny_gpt(), token_batch()
    expected, _ = model(idx)
    vera.apply_vera(model, "all-linear", r=8, seed=3)
    torch.testing.assert_close(model(idx)[0], expected, **EXACT)


def equation_reference(layer, x):
    """h = W0 x + b + Λ_b B Λ_d A x with explicit diagonal matrices, float64, column vectors."""
    A, B = layer.vera_A.double(), layer.vera_B.double()
    Ld, Lb = torch.diag(layer.lambda_d.double()), torch.diag(layer.lambda_b.double())
    W0, b = layer.base.weight.double(), layer.base.bias.double()
    cols = x.double().reshape(-1, x.shape[-1]).T  # (in, N): one column per token
    h = W0 @ cols + b[:, None] + Lb @ B @ Ld @ A @ cols  # (out, N)
    return h.T.reshape(*x.shape[:-1], -1)  # (..., out)


@pytest.mark.exercise("vera.vera_forward")
@given(shape=layer_shapes(), seed=seeds, dtype=dtypes)
def test_forward_equals_the_equation(shape, seed, dtype):
    layer, x = make_layer(shape, seed, dtype)
    y = layer(x)
    torch.testing.assert_close(y, equation_reference(layer, x).to(dtype), **TOL[dtype])
    # the module is the fast path, bit for bit: the base's output, then add_vera_ into it
    tokens = x.reshape(-1, shape[0])  # (N, in)
    fast = low_rank.add_vera_(layer.base(tokens), tokens, layer.vera_A, layer.vera_B,
                              layer.lambda_d, layer.lambda_b)
    torch.testing.assert_close(fast.view(y.shape), y, **EXACT)
    # the plain eq. 2 (vera_forward) associates the products otherwise (Λ_b applied to the
    # activations, not folded into B): equal within the same tolerance as the equation's
    pure = vera.vera_forward(x, layer.base.weight, layer.base.bias, layer.vera_A, layer.vera_B,
                             layer.lambda_d, layer.lambda_b)
    assert pure.dtype == y.dtype
    torch.testing.assert_close(pure, y, **TOL[dtype])
    # vera_delta is ΔW = Λ_b B Λ_d A
    delta = torch.diag(layer.lambda_b.double()) @ layer.vera_B.double() \
        @ torch.diag(layer.lambda_d.double()) @ layer.vera_A.double()
    torch.testing.assert_close(layer.delta_weight(), delta.to(dtype), **TOL[dtype])


@given(shape=layer_shapes(), seed=seeds, dtype=dtypes)
def test_only_the_vectors_get_gradients_and_they_are_eq2s(shape, seed, dtype):
    """The layer's gradients of λ_d and λ_b equal float64 autograd through eq. 2 written out
    (vera_rows), within the dtype's TOL (the float32 bound of the module docstring) plus TOL's
    rtol times the size of their terms (gradients_and_term_sizes); nothing else gets one."""
    layer, x = make_layer(shape, seed, dtype)
    adapters.mark_only_adapters_trainable(layer)
    g = torch.randn(*x.shape[:-1], shape[1], generator=torch.Generator().manual_seed(seed + 1),
                    dtype=dtype)  # dL/dh for L = sum(h * g)
    (layer(x) * g).sum().backward()
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert not layer.vera_projection.vera_A.requires_grad
    assert not layer.vera_projection.vera_B.requires_grad
    inputs = (x, layer.base.weight, layer.base.bias, layer.vera_A, layer.vera_B, layer.lambda_d,
              layer.lambda_b)
    (grad_d, grad_b), sizes = gradients_and_term_sizes(vera_rows, inputs, (5, 6), g)
    rtol, atol = TOL[dtype]["rtol"], TOL[dtype]["atol"]
    for name, got, exact, size in (("dL/dλ_d", layer.lambda_d.grad, grad_d, sizes[0]),
                                   ("dL/dλ_b", layer.lambda_b.grad, grad_b, sizes[1])):
        assert_same(got.double(), exact, name, exact=False, rtol=0, atol=atol + rtol * size)


def vera_rows(x, W, b, A, B, d, lam_b):
    """h = x W0^T + b + ((x A^T) ⊙ λ_d) B^T ⊙ λ_b: eq. 2 in row form, written here for reference."""
    return x @ W.T + b + ((x @ A.T) * d) @ B.T * lam_b


def random_vera(shape, seed, lead=(3, 2)):
    """Float64 x, W0, b, A, B, λ_d, λ_b, G (dL/dh) for a (in, out, r) layer; both vectors random."""
    n_in, n_out, r = shape[:3]
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*dims, generator=gen, dtype=torch.float64) for dims in (
        (*lead, n_in), (n_out, n_in), (n_out,), (r, n_in), (n_out, r), (r,), (n_out,),
        (*lead, n_out)))


@pytest.mark.exercise("vera.vera_grads")
@given(shape=layer_shapes(), seed=seeds, lead=st.sampled_from([(), (4,), (3, 2)]))
def test_vera_grads_by_hand_equal_autograd(shape, seed, lead):
    """vera.vera_grads' dL/dλ_d, dL/dλ_b and dL/dx against autograd through eq. 2, float64.
    Only the order of the sums differs: within 1e-12 of the size of each result's terms (the same
    gradients on absolute values, gradients_and_term_sizes), as the float64 bound in the module
    docstring."""
    x, W, b, A, B, d, lam_b, G = random_vera(shape, seed, lead)
    leaves = [t.clone().requires_grad_(True) for t in (d, lam_b, x)]
    y = vera_rows(leaves[2], W, b, A, B, leaves[0], leaves[1])
    expected = torch.autograd.grad(y, leaves, G)
    got = vera.vera_grads(x, W, A, B, d, lam_b, G)
    sizes = gradients_and_term_sizes(vera_rows, (x, W, b, A, B, d, lam_b), (5, 6, 0), G)[1]
    for name, g, e, size in zip(("dL/dλ_d", "dL/dλ_b", "dL/dx"), got, expected, sizes):
        assert_same(g, e, name, exact=False, rtol=0, atol=1e-12 * size)


class HandVeRA(torch.autograd.Function):
    """Eq. 2 with vera.vera_grads as its backward, for torch.autograd.gradcheck."""

    @staticmethod
    def forward(ctx, x, lambda_d, lambda_b, W, A, B):
        ctx.save_for_backward(x, lambda_d, lambda_b, W, A, B)
        return vera_rows(x, W, 0.0, A, B, lambda_d, lambda_b)

    @staticmethod
    def backward(ctx, grad_out):
        x, lambda_d, lambda_b, W, A, B = ctx.saved_tensors
        grad_d, grad_b, grad_x = vera.vera_grads(x, W, A, B, lambda_d, lambda_b, grad_out)
        return grad_x, grad_d, grad_b, None, None, None


@pytest.mark.exercise("vera.vera_grads")
@pytest.mark.parametrize("shape", [(5, 3, 2), (2, 6, 4), (4, 4, 1)])
def test_vera_grads_pass_gradcheck(shape):
    """torch.autograd.gradcheck: vera.vera_grads against central finite differences of eq. 2 in
    float64, at gradcheck's own tolerances."""
    x, W, _, A, B, d, lam_b, _ = random_vera(shape, sum(shape))
    inputs = tuple(t.requires_grad_(True) for t in (x, d, lam_b))
    assert_gradcheck(lambda x, d, lam_b: HandVeRA.apply(x, d, lam_b, W, A, B), inputs,
                     "vera.vera_grads")


def test_only_the_vectors_get_gradients_in_the_gpt():
    model = vera.apply_vera(tiny_gpt(), "all-linear", r=4, seed=2)
    randomize_vectors(model, 0)  # lambda_b = 0 at init would zero lambda_d's gradient
    _, loss = model(token_batch(0), token_batch(1))
    loss.backward()
    vectors = {id(getattr(m, p)) for m in vera.vera_layers(model).values()
               for p in ("lambda_d", "lambda_b")}
    for name, p in model.named_parameters():
        if id(p) in vectors:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


@given(shape=layer_shapes(), seed=seeds)
def test_vera_delta_is_the_equations_update(shape, seed):
    """vera.vera_delta on plain tensors: ΔW = Λ_b B Λ_d A (eq. 2's update), (out, in), against the
    product with explicit diagonal matrices in float64 (the module docstring's float64 bound)."""
    _, _, _, A, B, d, lam_b, _ = random_vera(shape, seed)
    expected = torch.diag(lam_b) @ B @ torch.diag(d) @ A
    assert_same(vera.vera_delta(A, B, d, lam_b), expected, "ΔW", exact=False, **TOL[torch.float64])


@given(shape=layer_shapes(), seed=seeds, dtype=dtypes)
def test_merge_and_unmerge(shape, seed, dtype):
    layer, x = make_layer(shape, seed, dtype)
    W0 = layer.base.weight.detach().clone()
    delta = layer.delta_weight().detach()
    y = layer(x)
    layer.merge()
    layer.merge()  # idempotent
    assert layer.merged
    torch.testing.assert_close(layer.base.weight, W0 + delta, **EXACT)  # W0 + ΔW, one rounding
    torch.testing.assert_close(layer(x), y, **TOL[dtype])  # merged: base(x) alone
    torch.testing.assert_close(layer.merged_weight(), W0 + delta, **EXACT)
    layer.unmerge()
    assert not layer.merged
    # (W0 + Δ) - Δ returns W0 up to the two roundings: |err| <= eps/2 |W0 + Δ| + eps/2 |W0|
    eps = torch.finfo(dtype).eps
    assert ((layer.base.weight - W0).abs() <= eps * (W0.abs() + delta.abs())).all()


def test_merge_adapters_gives_a_plain_gpt_with_the_same_outputs():
    model = vera.apply_vera(tiny_gpt(), ("q_proj", "up_proj", "down_proj"), r=6, seed=4)
    randomize_vectors(model, 1)
    idx = token_batch()
    merged = adapters.merge_adapters(model)
    assert not vera.vera_layers(merged) and vera.vera_layers(model)
    torch.testing.assert_close(merged(idx)[0], model(idx)[0], **TOL[torch.float32])


def add_vera_on_a_copy(layer, x, dropped):
    """The base's output for x plus Λ_b B Λ_d A d(x), by the in-place kernel on fresh tensors."""
    tokens = dropped.reshape(-1, dropped.shape[-1])  # (N, in)
    y = layer.base(x.reshape(tokens.shape))  # (N, out), fresh
    out = low_rank.add_vera_(y, tokens, layer.vera_A, layer.vera_B, layer.lambda_d,
                             layer.lambda_b)
    return out.view(*x.shape[:-1], -1)


@pytest.mark.exercise("vera.vera_forward")
def test_dropout_is_on_the_adapter_input_only():
    layer, x = make_layer((8, 6, 4, 8, 6), 0, torch.float32)
    layer.vera_dropout = nn.Dropout(0.5)
    layer.eval()
    without = add_vera_on_a_copy(layer, x, x)
    torch.testing.assert_close(layer(x), without, **EXACT)
    layer.train()
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    dropped = F.dropout(x, 0.5, training=True)
    expected = add_vera_on_a_copy(layer, x, dropped)
    torch.testing.assert_close(y, expected, **EXACT)
    torch.manual_seed(5)
    plain = vera.vera_forward(x, layer.base.weight, layer.base.bias, layer.vera_A, layer.vera_B,
                              layer.lambda_d, layer.lambda_b, dropout=nn.Dropout(0.5))
    torch.testing.assert_close(plain, y, **TOL[torch.float32])  # the same mask, plain eq. 2


class FakeQuantizedLinear(nn.Module):
    """A base with no dense `weight`, only `dequantized_weight()`, like qlora.NF4Linear."""
    linear_like = True

    def __init__(self, weight):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("stored", weight.to(torch.bfloat16))

    def dequantized_weight(self):
        return self.stored.float()

    def forward(self, x):
        return x @ self.dequantized_weight().T


def test_works_on_a_quantized_base_through_dense_weight():
    gen = torch.Generator().manual_seed(0)
    base = FakeQuantizedLinear(torch.randn(5, 7, generator=gen))
    layer = VeRALinear(base, VeRAProjection(3, 7, 5, seed=9))
    with torch.no_grad():
        layer.lambda_b.copy_(torch.randn(5, generator=gen))
    x = torch.randn(4, 7, generator=gen)
    expected = x @ (base.dequantized_weight() + layer.delta_weight()).T
    torch.testing.assert_close(layer(x), expected, **TOL[torch.float32])
    with pytest.raises(TypeError, match="merge_adapters"):
        layer.merge()


# --------------------------------------------------------------------------------------------------
# Parameter count and bad input.

@given(n_layer=st.integers(1, 2), n_embd=st.sampled_from([8, 16, 32]), r=st.integers(1, 32))
@settings(max_examples=10)
def test_trainable_parameters_equal_the_formula(n_layer, n_embd, r):
    C = n_embd
    model = vera.apply_vera(tiny_gpt(n_layer, C), "all-linear", r=r, seed=0)
    # Σ over the targets of (r + out): q, k, v, o, down have out = C, up has out = 4C
    assert adapters.count_trainable(model) == n_layer * (6 * r + 9 * C)
    r_qv = min(r, C)  # q and v are C -> C: ranks beyond C are refused (checks.check_rank)
    qv = vera.apply_vera(tiny_gpt(n_layer, C), ("q_proj", "v_proj"), r=r_qv, seed=0)
    assert adapters.count_trainable(qv) == n_layer * 2 * (r_qv + C)
    lora_model = lora.apply_lora(tiny_gpt(n_layer, C), "all-linear", r=8, seed=0)
    assert adapters.count_trainable(lora_model) == n_layer * 144 * C  # Σ 8 (in + out)
    # the proposed default rank r = C / 2: exactly 12x fewer than LoRA at rank 8, at every width
    half = vera.apply_vera(tiny_gpt(n_layer, C), "all-linear", r=C // 2, seed=0)
    assert adapters.count_trainable(lora_model) == 12 * adapters.count_trainable(half)


def test_bad_rank_seed_d_initial_and_too_large_targets_raise_clearly():
    for r in (0, -1, 1.5, True, "8"):
        model = tiny_gpt()
        with pytest.raises(ValueError, match="r \\(the rank\\)"):
            vera.apply_vera(model, "all-linear", r=r, seed=0)
        assert not vera.vera_layers(model)  # left untouched
    for seed in (-1, 2**64, 1.0, None):
        with pytest.raises(ValueError, match="seed"):
            vera.apply_vera(tiny_gpt(), "all-linear", r=4, seed=seed)
    for d_initial in (0, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="d_initial"):
            vera.apply_vera(tiny_gpt(), "all-linear", r=4, seed=0, d_initial=d_initial)
    projection = VeRAProjection(4, 16, 16, seed=0)
    for base in (nn.Linear(17, 16), nn.Linear(16, 17)):
        with pytest.raises(ValueError, match="larger than the shared matrices"):
            VeRALinear(base, projection)
    with pytest.raises(TypeError, match="VeRAProjection"):
        VeRALinear(nn.Linear(4, 4), projection=torch.zeros(4, 4))
    # r up to the widest target (4C = 64 here) is fine; beyond, refused before drawing the pair
    assert vera.apply_vera(tiny_gpt(), r=64).blocks[0].mlp.up_proj.r == 64
    model = tiny_gpt()
    with pytest.raises(ValueError, match=r"r \(the rank\) = 1000000000 .*widest target"):
        vera.apply_vera(model, r=10**9)
    assert not vera.vera_layers(model)
    for targets in (None, 3, [None]):
        with pytest.raises(ValueError, match="targets must be"):
            vera.apply_vera(tiny_gpt(), targets)
    with pytest.raises(ValueError, match="x must be a tensor of shape"):
        vera.apply_vera(tiny_gpt()).blocks[0].attn.q_proj(torch.tensor(1.0))


def test_apply_vera_has_defaults_like_the_other_methods():
    """model first, targets="all-linear", r (train.py's VeRA rank), then its own options."""
    model = vera.apply_vera(tiny_gpt())
    layers = vera.vera_layers(model)
    assert len(layers) == 12 and all(m.r == vera.DEFAULT_RANK == 64 for m in layers.values())
    assert vera.vera_projection_of(model).seed == vera.DEFAULT_SEED == 0  # PEFT's default key


# --------------------------------------------------------------------------------------------------
# Adapter directories (adapter_files.save_adapter / load_adapter): what is VeRA's own. The format
# and every refusal in general are tested in tests/test_adapter_files.py.

def trained_vera_gpt(vector_seed, seed=3, n_embd=16):
    model = vera.apply_vera(tiny_gpt(n_embd=n_embd), "all-linear", r=8, seed=seed)
    randomize_vectors(model, vector_seed)
    return model


def test_a_directory_holds_the_vectors_seed_and_checksum_never_the_matrices(tmp_path):
    model, idx = trained_vera_gpt(0), token_batch()
    adapter_files.save_adapter(model, tmp_path / "a")
    saved = adapter_files.read_adapter(tmp_path / "a")
    assert saved.config["projection_prng_key"] == 3 and saved.config["save_projection"] is False
    assert saved.metadata["vera_projection_sha256"] == vera.projection_checksum(
        *vera.vera_projections(8, 64, 64, 3))
    assert sum(t.numel() for t in saved.tensors.values()) == adapters.count_trainable(model)
    fresh = adapter_files.apply_saved_adapter(tiny_gpt(), tmp_path / "a")  # regenerates the pair
    torch.testing.assert_close(fresh(idx)[0], model(idx)[0], **EXACT)


def test_switching_among_adapters_copies_vectors_only(tmp_path):
    idx = token_batch()
    saved, expected = [], []
    for i in range(3):
        model = trained_vera_gpt(10 + i)
        adapter_files.save_adapter(model, tmp_path / f"adapter{i}")
        # read once, switch often
        saved.append(adapter_files.read_adapter(tmp_path / f"adapter{i}"))
        expected.append(model(idx)[0])
    live = vera.apply_vera(tiny_gpt(), "all-linear", r=8, seed=3)
    layers = list(vera.vera_layers(live).values())
    weights = [p.detach().clone() for p in live.parameters() if not p.requires_grad]
    projection = vera.vera_projection_of(live)
    A = projection.vera_A.clone()
    for order in (0, 2, 1, 0):
        adapter_files.load_adapter(live, saved[order], check_base=False)
        torch.testing.assert_close(live(idx)[0], expected[order], **EXACT)
    assert list(vera.vera_layers(live).values()) == layers  # the same layer objects: no rebuild
    assert vera.vera_projection_of(live) is projection
    assert_same(projection.vera_A, A, "the shared A after switching")
    frozen = [p for p in live.parameters() if not p.requires_grad]
    assert len(frozen) == len(weights)
    for i, (a, b) in enumerate(zip(frozen, weights)):
        assert_same(a, b, f"frozen parameter {i} after switching")


def test_checksum_or_seed_mismatch_fails_clearly(tmp_path, monkeypatch):
    directory = tmp_path / "a"
    adapter_files.save_adapter(trained_vera_gpt(0), directory)
    # this machine's generator draws other matrices from the same seed than the training one did
    draw = vera.vera_projections
    monkeypatch.setattr(vera, "vera_projections",
                        lambda *args: (draw(*args)[0], draw(*args)[1].flip(0)))
    bare = tiny_gpt()
    with pytest.raises(ValueError, match="vera_projection_sha256 is '[0-9a-f]{64}' in the file "
                                         "but '[0-9a-f]{64}' in the model"):
        adapter_files.apply_saved_adapter(bare, directory)
    assert not vera.vera_layers(bare)  # refused, and the model left as it was
    monkeypatch.undo()
    with pytest.raises(ValueError, match="projection_prng_key is 3 in the file but 4 in the model"):
        adapter_files.load_adapter(trained_vera_gpt(0, seed=4), directory)
    with pytest.raises(TypeError, match="a tensor dict has no r, alpha, seed to check"):
        adapter_files.load_adapter(trained_vera_gpt(1), adapters.adapter_state_dict(bare_vera()))


def bare_vera():
    return trained_vera_gpt(0)


def test_apply_vera_honours_dropout():
    """apply_vera(dropout=p): every layer drops its update's input in training (train.py passes
    --dropout; it was silently ignored before), and the file records it as vera_dropout."""
    model = vera.apply_vera(tiny_gpt(), "all-linear", r=8, seed=3, dropout=0.25)
    for layer in vera.vera_layers(model).values():
        assert isinstance(layer.vera_dropout, nn.Dropout) and layer.vera_dropout.p == 0.25
        assert layer.adapter_config()["vera_dropout"] == 0.25
    randomize_vectors(model, 0)
    idx = token_batch()
    model.train()
    torch.manual_seed(0)
    first = model(idx)[0]
    torch.manual_seed(1)
    assert not torch.equal(model(idx)[0], first)  # deliberate "differs": other masks, outputs
    model.eval()
    assert_same(model(idx)[0], model(idx)[0], "logits of two eval-mode calls")


# --------------------------------------------------------------------------------------------------
# PEFT's VeRA as the reference.

class ThreeLinears(nn.Module):
    """Three linears of different shapes, so each slices the shared matrices differently."""

    def __init__(self, width, hidden, narrow):
        super().__init__()
        self.lin1 = nn.Linear(width, hidden)
        self.lin2 = nn.Linear(hidden, narrow)
        self.lin3 = nn.Linear(narrow, width)

    def forward(self, x):
        return self.lin3(F.gelu(self.lin2(F.gelu(self.lin1(x)))))


@given(seed=seeds, r=st.integers(1, 12), widths=st.tuples(*[st.integers(1, 20)] * 3),
       d_initial=st.sampled_from([0.1, 1.0, -0.5]))
@settings(max_examples=15)
def test_matches_peft_vera(seed, r, widths, d_initial):
    r = min(r, max(widths))  # ranks beyond the widest target are refused (checks.check_rank)
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)  # for nn.Linear's own init and PEFT's placeholder vectors
    model = ThreeLinears(*widths)
    targets = ["lin1", "lin2", "lin3"]
    ours = vera.apply_vera(copy.deepcopy(model), targets, r=r, seed=seed, d_initial=d_initial)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(
        r=r, target_modules=targets, projection_prng_key=seed, d_initial=d_initial))
    projection = vera.vera_projection_of(ours)
    torch.testing.assert_close(projection.vera_A, theirs.base_model.vera_A["default"], **EXACT)
    torch.testing.assert_close(projection.vera_B, theirs.base_model.vera_B["default"], **EXACT)
    peft_layers = {name: getattr(theirs.base_model.model, name) for name in targets}
    for name in targets:  # both start at lambda_d = d_initial, lambda_b = 0
        torch.testing.assert_close(getattr(ours, name).lambda_d,
                                   peft_layers[name].vera_lambda_d["default"], **EXACT)
        torch.testing.assert_close(getattr(ours, name).lambda_b,
                                   peft_layers[name].vera_lambda_b["default"], **EXACT)
    randomize_vectors(ours, seed + 1)
    with torch.no_grad():
        for name in targets:
            peft_layers[name].vera_lambda_d["default"].copy_(getattr(ours, name).lambda_d)
            peft_layers[name].vera_lambda_b["default"].copy_(getattr(ours, name).lambda_b)
    x = torch.randn(5, widths[0], generator=torch.Generator().manual_seed(seed))
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, **TOL[torch.float32])  # other association order
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    for name in targets:
        for ours_p, theirs_p in ((getattr(ours, name).lambda_d, peft_layers[name].vera_lambda_d),
                                 (getattr(ours, name).lambda_b, peft_layers[name].vera_lambda_b)):
            torch.testing.assert_close(ours_p.grad, theirs_p["default"].grad, **TOL[torch.float32])
    with torch.no_grad():
        theirs.merge_adapter()
        for name in targets:
            getattr(ours, name).merge()
            # the same operations as PEFT's get_delta_weight, (Λ_b B)(Λ_d A), so the same bits
            torch.testing.assert_close(getattr(ours, name).base.weight,
                                       peft_layers[name].base_layer.weight, **EXACT)
