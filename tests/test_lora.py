"""Tests for lora.py: layer properties (Hypothesis), plumbing on the tiny GPT, PEFT as an oracle.

References are computed in float64 from the very tensors the code under test used (x, W, b, A, B), so
what is left is the rounding of the format under test. A sum of n terms computed in floating point
errs by at most about n·u·Σ|terms| (u = eps/2; Higham, "Accuracy and Stability of Numerical
Algorithms", section 3.1), whatever the cancellation in the result. So tolerances are absolute,
TOL[dtype] · scale, where `scale` is the largest Σ|terms| of the tensor: the same formula evaluated on
the absolute values of its inputs (every formula here is a sum of products with positive weights).
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, strategies as st

import adapters
import lora
from tiny_gpt import GPT, GPTConfig

# Tolerance as a multiple of `scale` (see the module docstring) for one forward or backward pass.
TOL = {
    torch.float64: 1e-12,  # other summation order than the reference: ~n·u = 1e-14 (seen: 4e-16)
    # float32: sums of at most in + r <= 100 terms. The worst case n·u = 6e-6 needs every rounding
    # to go the same way; they add like a random walk, ~sqrt(n)·u = 6e-7. Over 3000 random cases of
    # these strategies the largest error was 1.4e-7 (forward) and 1.9e-7 (gradients).
    torch.float32: 1e-6,
    # 16-bit bases: products are accumulated in float32 (negligible), then the result is rounded to
    # 16 bits once (base output), the adapter sum once more: 2u = eps (seen: 0.4 eps forward, 0.6 eps
    # for dL/dx).
    torch.bfloat16: 2 ** -7,  # bfloat16 eps
    torch.float16: 2 ** -10,  # float16 eps
}
DTYPES = (torch.float32, torch.float64, torch.bfloat16)  # the dtypes the issue names
MERGE_DTYPES = DTYPES + (torch.float16,)  # merge must work on any dtype a base weight has


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: with the 2 cores shared, OpenMP's thread hand-offs cost up to 100x the
    arithmetic (a tiny GPT forward: 180 ms on 2 threads under load, 0.5 ms on 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    """Documented in LoRALinear: adapters train in float32 beside a 16-bit base."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def reference(f, *tensors):
    """f evaluated exactly enough (float64), and its scale: max of f on the inputs' absolute values."""
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
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=torch.float64))
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
        r=draw(st.integers(1, min(in_features, out_features) + 4)),  # up to full rank and beyond
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


# ---------------------------------------------------------------------------------------------------
# Layer-level properties.

@given(cases(MERGE_DTYPES), st.sampled_from([0.0, 0.1, 0.5]))
def test_fresh_adapter_equals_base_exactly(case, p):
    """B = 0 at init: output, pure function and merged weight equal the base bit for bit (train mode
    with dropout on the adapter input included: the dropped input only meets B = 0)."""
    layer, x = case.build(trained=False, dropout=p)
    layer.train()
    W, b, A, B = case.weights(layer)
    base_out = F.linear(x, W, layer.base.bias)
    assert torch.equal(layer(x), base_out)
    assert torch.equal(lora.lora_forward(x, W, layer.base.bias, A, B, layer.scaling), base_out)
    assert torch.equal(layer.delta_weight(), torch.zeros(case.out_features, case.in_features,
                                                         dtype=adapter_dtype(case.dtype)))
    W0 = W.detach().clone()
    layer.merge()
    assert torch.equal(layer.base.weight, W0)


@given(cases())
def test_init_matches_nn_linear_and_formula(case):
    """A: Kaiming-uniform (a = sqrt 5), bit for bit what nn.Linear(in, r) draws from the same seed,
    whether seeded through the global RNG or a generator; B = 0; scaling; trainable count r·(in+out)."""
    base = nn.Linear(case.in_features, case.out_features, dtype=case.dtype)
    dt = adapter_dtype(case.dtype)
    torch.manual_seed(case.seed)
    expected_A = nn.Linear(case.in_features, case.r, bias=False, dtype=dt).weight.detach()
    torch.manual_seed(case.seed)
    layer = lora.LoRALinear(base, case.r, case.alpha, rslora=case.rslora)
    assert torch.equal(layer.lora_A, expected_A)
    seeded = lora.LoRALinear(copy.deepcopy(base), case.r, case.alpha,
                             generator=torch.Generator().manual_seed(case.seed))
    assert torch.equal(seeded.lora_A, expected_A)
    # gain sqrt(2 / (1 + a^2)) = sqrt(1/3), bound = gain · sqrt(3 / fan_in) = 1 / sqrt(in)
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(case.in_features)
    assert torch.equal(layer.lora_B, torch.zeros(case.out_features, case.r, dtype=dt))
    assert layer.scaling == case.scaling()
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    assert adapters.count_trainable(layer) == case.r * (case.in_features + case.out_features)


@given(cases())
def test_forward_equals_formula(case):
    """h = x W^T + b + s·x A^T B^T, for the module and the pure function `lora_forward`."""
    layer, x = case.build()
    W, b, A, B = case.weights(layer)
    exact, scale = reference(forward_formula(case.scaling()), x, W, b, A, B)
    out = layer(x)
    assert out.dtype == case.dtype and out.shape == (*case.lead, case.out_features)
    assert_near(out, exact, scale, TOL[case.dtype])
    assert torch.equal(lora.lora_forward(x, W, layer.base.bias, A, B, layer.scaling), out)


@given(cases(MERGE_DTYPES))
def test_delta_weight_and_merged_output(case):
    """ΔW = s·B A (`lora_delta`, `delta_weight`); merged output equals unmerged."""
    layer, x = case.build()
    s = case.scaling()
    exact, scale = reference(lambda A, B: s * torch.einsum("or,ri->oi", B, A),
                             layer.lora_A, layer.lora_B)
    tol_adapter = TOL[adapter_dtype(case.dtype)]
    assert_near(layer.delta_weight(), exact, scale, tol_adapter)
    assert torch.equal(lora.lora_delta(layer.lora_A, layer.lora_B, layer.scaling),
                       layer.delta_weight())
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
    subnormal_step = finfo.smallest_normal * finfo.eps  # rounding near zero is absolute, not relative
    layer.merge()
    W1 = layer.base.weight.detach().clone()
    assert layer.merged and W1.dtype == case.dtype
    layer.merge()
    assert torch.equal(layer.base.weight, W1)
    # W1 = fl(W0 + fl(ΔW)): |W1 - (W0 + ΔW)| <= u|W1| + u|ΔW| + (error of ΔW computed in the
    # adapter's dtype, within its TOL · scale as in test_delta_weight_and_merged_output).
    torch.testing.assert_close(W1.double(), W0.double() + delta, rtol=finfo.eps,
                               atol=finfo.eps * delta.abs().max().item() + subnormal_step
                               + TOL[adapter_dtype(case.dtype)] * delta_scale)
    layer.unmerge()
    W2 = layer.base.weight.detach().clone()
    assert not layer.merged
    layer.unmerge()
    assert torch.equal(layer.base.weight, W2)
    # W2 = fl(W1 - fl(ΔW)) = fl(W0 + e) with e the merge's rounding: |W2 - W0| <= u|W1| + u|W2|
    # <= eps·|W0| + u·|ΔW| (+ one subnormal step): W0 comes back up to one rounding. (The atol below
    # allows 2u·|ΔW| for bfloat16's double rounding: the sum is rounded to float32, then to 16 bits.)
    torch.testing.assert_close(W2, W0, rtol=finfo.eps,
                               atol=finfo.eps * delta.abs().max().item() + subnormal_step)


@given(cases())
def test_gradients_are_analytic_and_only_adapters_get_them(case):
    """dL/dB = s·g (A x)^T, dL/dA = s·B^T g x^T (summed over tokens), dL/dx = g W + s·g B A; the
    base layer's weight and bias receive no gradient."""
    layer, x = case.build()
    x.requires_grad_(True)
    out = layer(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(case.seed + 1),
                    dtype=torch.float64).to(out.dtype)
    out.backward(g)  # dL/dout = g
    s = case.scaling()
    W, _, A, B = case.weights(layer)
    X, G = x.reshape(-1, case.in_features), g.reshape(-1, case.out_features)  # (N, in), (N, out)
    tol_adapter = TOL[adapter_dtype(case.dtype)]  # g and x reach the adapter exactly (casts up)
    exact, scale = reference(lambda G, X, A: s * G.T @ (X @ A.T), G, X, A)  # (out, r)
    assert_near(layer.lora_B.grad, exact, scale, tol_adapter)
    exact, scale = reference(lambda G, X, B: s * B.T @ G.T @ X, G, X, B)  # (r, in)
    assert_near(layer.lora_A.grad, exact, scale, tol_adapter)
    # dx: base part rounded, adapter part rounded, their sum rounded: 3u·scale <= TOL for 16 bits
    exact, scale = reference(lambda g, W, A, B: g @ W + s * g @ B @ A, g, W, A, B)
    assert_near(x.grad, exact, scale, TOL[case.dtype])
    assert layer.base.weight.grad is None and (layer.base.bias is None or layer.base.bias.grad is None)
    assert not layer.base.weight.requires_grad


@given(cases(dtypes=(torch.float32, torch.float64)), st.sampled_from([0.1, 0.5, 0.9]),
       st.integers(0, 2 ** 32 - 1))
def test_dropout_on_adapter_input_only(case, p, dropout_seed):
    """Train mode: h = x W^T + b + s·(m ⊙ x / (1-p)) A^T B^T, m ~ Bernoulli(1-p) drawn from the global
    RNG as nn.Dropout does; the base part sees the undropped x. Eval mode: no dropout."""
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
    assert torch.equal(lora.lora_forward(x, W, layer.base.bias, A, B, layer.scaling,
                                         dropout=nn.Dropout(p)), out)
    layer.eval()
    exact, scale = reference(forward_formula(s), x, W, b, A, B)
    assert_near(layer(x), exact, scale, TOL[case.dtype])


@given(cases())
def test_add_low_rank_keeps_y_and_add_low_rank__adds_into_it(case):
    """The layer adds the low-rank term into the base's fresh output (`add_low_rank_`, no copy of the
    activations); the pure `add_low_rank` returns a new tensor with the same bits and leaves y alone,
    and so does `add_low_rank_` when y's dtype is not the adapter's (it sums in a copy)."""
    layer, x = case.build()
    W, b, A, B = (t.detach() for t in case.weights(layer))
    x2 = x.reshape(-1, case.in_features)  # (N, in)
    y = F.linear(x2, W, b)  # (N, out)
    y0 = y.clone()
    pure = lora.add_low_rank(y, x2, A, B, case.scaling())
    assert torch.equal(y, y0) and pure is not y
    in_place = lora.add_low_rank_(y, x2, A, B, case.scaling())
    assert torch.equal(in_place, pure)
    assert (in_place is y) == (y.dtype == A.dtype)
    assert torch.equal(y, in_place if y.dtype == A.dtype else y0)


def test_train_and_eval_never_merge():
    """loralib merges inside eval(); here only an explicit merge() touches the base weight."""
    layer, x = Case(8, 6, 2, 4.0, torch.float32, True, False, (3,), 0).build()
    W0, out0 = layer.base.weight.detach().clone(), layer(x)
    for mode in (layer.eval, layer.train, layer.eval):
        mode()
        assert not layer.merged and torch.equal(layer.base.weight, W0)
        assert torch.equal(layer(x), out0)
    layer.merge()
    W1 = layer.base.weight.detach().clone()
    for mode in (layer.train, layer.eval):
        mode()
        assert layer.merged and torch.equal(layer.base.weight, W1)


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


# ---------------------------------------------------------------------------------------------------
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
    assert torch.equal(merged[0].weight, W + layer.delta_weight()) and torch.equal(merged[0].bias, b)


# ---------------------------------------------------------------------------------------------------
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
                  r=st.integers(1, 40), seed=st.integers(0, 2 ** 32 - 1))


@given(**gpt_shapes)
def test_all_linear_adapts_block_linears_freezes_the_rest_and_starts_at_base(n_layer, n_embd, r, seed):
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
    # r·(in + out) per layer: q, k, v, o are C -> C; up is C -> 4C and down 4C -> C: 18·r·C per block
    assert adapters.count_trainable(model) == n_layer * 18 * r * n_embd
    assert model.num_parameters() == make_gpt(seed, n_layer, n_embd).num_parameters() + \
        n_layer * 18 * r * n_embd
    logits, _ = model(tokens(seed))
    assert torch.equal(logits, base_logits)


def test_suffix_targets_and_target_errors():
    model = make_gpt()
    lora.apply_lora(model, ("q_proj", "attn.v_proj"), r=2, alpha=4.0, seed=0)
    expected = linear_names(make_gpt(), ("q_proj", "v_proj"))
    assert len(expected) == 4 and sorted(adapters.adapter_layers(model)) == sorted(expected)
    assert adapters.count_trainable(model) == 2 * 2 * (2 * 2 * 16)  # 2 blocks, q and v, r·(C + C)
    with pytest.raises(ValueError, match="already carries an adapter"):
        lora.apply_lora(model, ("q_proj",), r=2, alpha=4.0)
    fresh = make_gpt()
    for bad, error, match in [("proj", ValueError, "'proj' matches no module"),
                              (("q_proj", "nope"), ValueError, "'nope' matches no module"),
                              ((), ValueError, "targets"), ("ln_1", TypeError, "ln_1")]:
        with pytest.raises(error, match=match):
            lora.apply_lora(fresh, bad, r=2, alpha=4.0)
    with pytest.raises(ValueError, match="rank"):
        lora.apply_lora(fresh, "all-linear", r=0, alpha=4.0)
    assert not adapters.adapter_layers(fresh)  # a failed apply_lora leaves the model as it was
    with pytest.raises(ValueError, match="all-linear"):
        lora.apply_lora(nn.Sequential(nn.ReLU()), "all-linear")


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
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not any(torch.equal(states[0][k], states[2][k]) for k in states[0] if k.endswith("A"))


def test_adapter_save_load_round_trip(tmp_path):
    model = lora.apply_lora(make_gpt(), r=4, alpha=8.0, seed=1)
    randomize_adapters(model, 2)
    state = adapters.adapter_state_dict(model)
    assert set(state) == {f"{t}.lora_{m}" for t in linear_names(make_gpt()) for m in "AB"}
    state["blocks.0.attn.q_proj.lora_A"].add_(1.0)  # detached copies: the model is not affected
    assert not torch.equal(state["blocks.0.attn.q_proj.lora_A"], model.blocks[0].attn.q_proj.lora_A)
    path = tmp_path / "adapter.pt"
    adapters.atomic_save(adapters.adapter_state_dict(model), str(path))
    loaded = torch.load(path, weights_only=True)
    other = lora.apply_lora(make_gpt(), r=4, alpha=8.0, seed=3)  # same base, other adapters
    adapters.load_adapter(other, loaded)
    assert all(torch.equal(v, adapters.adapter_state_dict(model)[k])
               for k, v in adapters.adapter_state_dict(other).items())
    assert torch.equal(other(tokens(0))[0], model(tokens(0))[0])


def test_load_adapter_mismatch_names_what_does_not_fit():
    model = lora.apply_lora(make_gpt(), r=4, alpha=8.0, seed=1)
    good = adapters.adapter_state_dict(model)
    before = adapters.adapter_state_dict(model)

    def variant(drop=(), add=None, reshape=None):
        state = {k: v for k, v in good.items() if k not in drop}
        state.update(add or {})
        if reshape:
            state[reshape] = torch.zeros(3, 3)
        return state

    key = "blocks.1.mlp.up_proj.lora_B"
    for state, match in [(variant(drop=[key]), f"missing.*{key}"),
                         (variant(add={"blocks.0.attn.nope.lora_A": torch.zeros(4, 16)}),
                          "unexpected.*blocks.0.attn.nope.lora_A"),
                         (variant(reshape=key), rf"{key}.*\(3, 3\).*\(64, 4\)")]:
        with pytest.raises(ValueError, match=match):
            adapters.load_adapter(model, state)
    # an adapter of another rank, or of other targets
    with pytest.raises(ValueError, match="shape"):
        adapters.load_adapter(model, adapters.adapter_state_dict(lora.apply_lora(make_gpt(), r=2, seed=0)))
    with pytest.raises(ValueError, match="missing.*k_proj"):
        adapters.load_adapter(model, adapters.adapter_state_dict(
            lora.apply_lora(make_gpt(), ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"),
                            r=4, seed=0)))
    assert all(torch.equal(v, before[k]) for k, v in adapters.adapter_state_dict(model).items())
    model.blocks[0].attn.q_proj.merge()
    with pytest.raises(ValueError, match="unmerge"):
        adapters.load_adapter(model, good)
    with pytest.raises(ValueError, match="no adapter"):
        adapters.load_adapter(make_gpt(), good)
    with pytest.raises(ValueError, match="no adapter"):
        adapters.adapter_state_dict(make_gpt())


# Merged vs adapted logits, relative to the largest logit. Merging rounds each W0 + ΔW once, and two
# blocks amplify that: the randomized adapters are large beside the base's 0.02-std weights, so the
# attention scores are large and the softmax passes their absolute errors on. Over 900 random models
# the largest difference was 1.8e-5 (float32, ~300u) and 3.2e-14 (float64).
MODEL_MERGE_TOL = {torch.float32: 1e-4, torch.float64: 1e-12}


@given(**gpt_shapes, dtype=st.sampled_from([torch.float32, torch.float64]))
def test_merge_adapters_gives_the_base_architecture_and_the_adapted_outputs(n_layer, n_embd, r, seed,
                                                                            dtype):
    model = lora.apply_lora(make_gpt(seed, n_layer, n_embd).to(dtype), r=r, alpha=2.0, seed=seed)
    randomize_adapters(model, seed + 1)
    idx = tokens(seed)
    adapted, _ = model(idx)
    merged = adapters.merge_adapters(model)
    fresh = make_gpt(seed, n_layer, n_embd).to(dtype)
    assert [(n, type(m)) for n, m in merged.named_modules()] == \
        [(n, type(m)) for n, m in fresh.named_modules()]
    assert [(k, v.shape, v.dtype) for k, v in merged.state_dict().items()] == \
        [(k, v.shape, v.dtype) for k, v in fresh.state_dict().items()]
    assert merged.num_parameters() == fresh.num_parameters()
    torch.testing.assert_close(merged(idx)[0], adapted, rtol=0.0,
                               atol=MODEL_MERGE_TOL[dtype] * adapted.abs().max().item())
    assert torch.equal(model(idx)[0], adapted)  # the adapted model is left as it was
    assert adapters.adapter_layers(model)
    # merging some layers in place first changes nothing: the same W0 + ΔW, rounded the same way
    model.blocks[0].attn.q_proj.merge()
    again = adapters.merge_adapters(model, inplace=True)
    assert again is model and not adapters.adapter_layers(model)
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in model.state_dict().items())


def test_atomic_save_leaves_no_partial_file(tmp_path):
    path = tmp_path / "sub" / "adapter.pt"  # the directory is created
    adapters.atomic_save({"w": torch.arange(3.0)}, str(path))
    old_bytes = path.read_bytes()
    with pytest.raises(Exception, match="pickle"):  # a lambda cannot be pickled
        adapters.atomic_save({"w": torch.arange(5.0), "f": lambda: 0}, str(path))
    assert path.read_bytes() == old_bytes
    assert os.listdir(path.parent) == ["adapter.pt"]  # the temporary file is gone
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3.0))


def test_atomic_save_gives_the_usual_file_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        adapters.atomic_save({"w": torch.zeros(1)}, str(tmp_path / "a.pt"))
    finally:
        os.umask(umask)
    assert (tmp_path / "a.pt").stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600


def test_load_adapter_refuses_nan_and_non_tensors_and_leaves_the_model_alone():
    model = lora.apply_lora(make_gpt(), r=4, alpha=8.0, seed=1)
    before = adapters.adapter_state_dict(model)
    key = next(iter(before))
    bad = dict(before, **{key: torch.full_like(before[key], float("nan"))})
    with pytest.raises(ValueError, match="NaN"):
        adapters.load_adapter(model, bad)
    with pytest.raises(TypeError, match="floating-point"):
        adapters.load_adapter(model, dict(before, **{key: [1.0]}))
    after = adapters.adapter_state_dict(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_model_that_is_itself_a_linear_is_refused_clearly():
    with pytest.raises(ValueError, match="itself a linear"):
        lora.apply_lora(nn.Linear(4, 4), r=2, alpha=4.0)


# ---------------------------------------------------------------------------------------------------
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
    """PEFT builds lora_A = nn.Linear(in, r) and lora_B = nn.Linear(r, out) (each drawing its default
    init), then re-draws lora_A Kaiming-uniform: ours equals that third draw after skipping two."""
    for in_f, out_f, r in [(7, 5, 3), (1, 1, 4), (48, 2, 9)]:
        base = nn.Linear(in_f, out_f)
        torch.manual_seed(0)
        model = peft.get_peft_model(OneLinear(copy.deepcopy(base)),
                                    peft.LoraConfig(r=r, lora_alpha=8, target_modules=["proj"]))
        torch.manual_seed(0)
        nn.Linear(in_f, r, bias=False)  # the two draws PEFT discards
        nn.Linear(r, out_f, bias=False)
        ours = lora.LoRALinear(base, r, 8.0)
        assert torch.equal(ours.lora_A, model.base_model.model.proj.lora_A["default"].weight)


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
    X, G = x.reshape(-1, case.in_features), g.reshape(-1, case.out_features)
    s = case.scaling()
    _, scale = reference(lambda G, X, A: s * G.T @ (X @ A.T), G, X / (1 - p), A)
    assert_near(layer.lora_B.grad, B_p.grad.double(), scale, 2 * TOL[torch.float32])
    _, scale = reference(lambda G, X, B: s * B.T @ G.T @ X, G, X / (1 - p), B)
    assert_near(layer.lora_A.grad, A_p.grad.double(), scale, 2 * TOL[torch.float32])
    _, scale = reference(lambda g, W, A, B: g @ W + s * g @ B @ A / (1 - p), g, W, A, B)
    assert_near(x_ours.grad, x_theirs.grad.double(), scale, 2 * TOL[torch.float32])
    # merge: the same float32 operations in the same order (B @ A, times s, added to W): bit-equal
    assert torch.equal(layer.delta_weight(), proj.get_delta_weight("default"))
    layer.merge()
    unloaded = theirs.merge_and_unload()
    assert type(unloaded.proj) is nn.Linear
    assert torch.equal(layer.base.weight, unloaded.proj.weight)
