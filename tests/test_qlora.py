"""Tests for qlora.py: NF4Linear against nn.Linear and float64, QLoRA against LoRA on the
dequantized base, the equations written out, the input gradient by hand, state dicts, dtype casts,
training with PagedAdamW, merging, storage, memory and bad inputs.

Oracles: `nn.Linear` holding the dequantized weight (bit for bit in float32 compute: the same matmul
on the same numbers), plain autograd through the dense weight (for the hand-written backward), LoRA
on an `nn.Linear` base (for QLoRA), and float64 references with stated tolerances elsewhere. The
dequantized weight in the references is `nf4.dequantize_nf4(nf4.quantize_nf4(W))`, not read from
the layer.

Tolerances against a float64 reference are absolute, TOL · scale, where `scale` is the largest sum
of absolute terms (|x| |W|^T + |b|): a sum of n products computed in floating point errs by at most
about that much times the unit roundoff (Higham, "Accuracy and Stability of Numerical Algorithms",
3.1). CUDA variants run where a GPU exists (parametrized `device`) and skip cleanly where not.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import adapters
import lora
import nf4
import qlora
from assertions import assert_gradcheck, assert_same
from paged_optim import PagedAdamW
from tiny_gpt import GPT, GPTConfig

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")

# Unit roundoff u = 2^-p of each dtype (p: bits of significand precision).
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24,
                 torch.float64: 2.0 ** -53}
# Products are accumulated in float32 for every compute dtype but float64. With at most 150 terms
# the worst case is 150u = 9e-6, the usual random-walk growth sqrt(150)u = 7e-7; 2e-6 covers what
# occurs.
ACCUMULATION_TOL = {torch.float64: 1e-13, torch.float32: 2e-6, torch.float16: 2e-6,
                    torch.bfloat16: 2e-6}


@pytest.fixture(scope="module", autouse=True)
def float32_accumulation_on_cuda():
    """The tolerances assume 16-bit products are summed in float32; cuBLAS may otherwise reduce
    split sums in 16 bits (torch's default allows it). No effect on the CPU."""
    matmul = torch.backends.cuda.matmul
    flags = ("allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction")
    saved = [getattr(matmul, flag) for flag in flags]
    for flag in flags:
        setattr(matmul, flag, False)
    yield
    for flag, value in zip(flags, saved):
        setattr(matmul, flag, value)


def deterministic_attention(device):
    """On CUDA the math attention kernel: the fused kernels' backward may accumulate with atomics,
    which is not bit-reproducible, and the model-level tests compare two runs bit for bit."""
    if device != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.MATH)


def tol(compute_dtype, x_dtype) -> float:
    """x and W rounded to the compute dtype (2u), the result rounded to it (u) and to x's dtype."""
    u = UNIT_ROUNDOFF[compute_dtype]
    return 3 * u + UNIT_ROUNDOFF[x_dtype] + ACCUMULATION_TOL[compute_dtype]


def make_linear(in_features, out_features, bias, seed, device="cpu") -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=g))
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=g))
    return linear.to(device)


def dequantized_reference(linear, blocksize, double_quant) -> torch.Tensor:
    """The float32 weight the layer should compute with, straight from nf4."""
    q = nf4.quantize_nf4(linear.weight.detach(), blocksize, double_quant)
    return nf4.dequantize_nf4(q, torch.float32)


def storage(layer: qlora.NF4Linear) -> dict:
    names = ("packed", "absmax", "nested_absmax", "offset", "nf4_format")
    return {name: getattr(layer, name).clone() for name in names if hasattr(layer, name)}


def assert_same_tensors(actual: dict, expected: dict, what: str, nf4_blocksize=None) -> None:
    """Tensor dicts compared name by name. With `nf4_blocksize`, a differing packed byte (two 4-bit
    codes) or 8-bit absmax code also names its block: NF4 blocks of nf4_blocksize / 2 bytes,
    nested blocks of NESTED_BLOCKSIZE codes."""
    assert actual.keys() == expected.keys(), what
    bytes_per_block = {} if nf4_blocksize is None else \
        {"packed": nf4_blocksize // 2, "absmax": nf4.NESTED_BLOCKSIZE}
    for name, tensor in expected.items():
        assert_same(actual[name], tensor, f"{what}: {name}",
                    blocksize=bytes_per_block.get(name.rsplit(".", 1)[-1]))


def reference(f, *tensors):
    exact = f(*(t.detach().double() for t in tensors))
    scale = f(*(t.detach().double().abs() for t in tensors)).abs().max().item()
    return exact, scale


layer_shapes = dict(
    in_features=st.integers(1, 150),  # multiples and non-multiples of every blocksize below
    out_features=st.integers(1, 24),
    blocksize=st.sampled_from([32, 64, 128]),
    double_quant=st.booleans(),
    bias=st.booleans(),
    lead=st.sampled_from([(3,), (2, 5)]),
    seed=st.integers(0, 2 ** 31 - 1),
)


# --------------------------------------------------------------------------------------------------
# NF4Linear on its own.

@pytest.mark.parametrize("device", DEVICES)
@given(**layer_shapes)
def test_nf4linear_equals_linear_with_dequantized_weight(device, in_features, out_features,
                                                         blocksize, double_quant, bias, lead, seed):
    """float32 compute: output and input gradient bit for bit those of nn.Linear(dequantized W)."""
    linear = make_linear(in_features, out_features, bias, seed, device)
    layer = qlora.NF4Linear.from_linear(linear, blocksize, double_quant, torch.float32)
    W = dequantized_reference(linear, blocksize, double_quant)
    assert_same(layer.dequantized_weight(), W, "dequantized weight")
    dense = copy.deepcopy(linear)
    with torch.no_grad():
        dense.weight.copy_(W)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*lead, in_features, generator=g).to(device)
    x_ours, x_dense = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, expected = layer(x_ours), dense(x_dense)
    assert_same(y, expected, "NF4Linear output vs nn.Linear(dequantized W)")
    grad_y = torch.randn(expected.shape, generator=g).to(device)
    y.backward(grad_y)
    expected.backward(grad_y)
    assert_same(x_ours.grad, x_dense.grad, "input gradient vs nn.Linear(dequantized W)")
    assert all(not t.requires_grad and t.grad is None for t in layer.buffers())
    assert not [n for n, p in layer.named_parameters() if p.requires_grad]  # frozen, bias included


@pytest.mark.parametrize("device", DEVICES)
@given(**layer_shapes, compute_dtype=st.sampled_from(COMPUTE_DTYPES),
       x_dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_forward_and_input_gradient_against_float64(device, in_features, out_features, blocksize,
                                                    double_quant, bias, lead, seed, compute_dtype,
                                                    x_dtype):
    """y = x W^T + b computed in the compute dtype and returned in x's dtype; dL/dx = dL/dy W."""
    linear = make_linear(in_features, out_features, bias, seed, device)
    layer = qlora.NF4Linear.from_linear(linear, blocksize, double_quant, compute_dtype)
    W = dequantized_reference(linear, blocksize, double_quant)
    b = linear.bias if bias else torch.zeros(out_features, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*lead, in_features, generator=g, dtype=torch.float64)
    x = x.to(device, x_dtype).requires_grad_()
    y = layer(x)
    assert y.dtype == x_dtype and y.shape == (*lead, out_features)
    assert layer.dequantized_weight().dtype == compute_dtype
    exact, scale = reference(lambda x, W, b: x @ W.T + b, x, W, b)
    atol = tol(compute_dtype, x_dtype)
    assert_same(y.double(), exact, "output vs float64", exact=False, rtol=0.0, atol=atol * scale)
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(device, x_dtype)
    y.backward(grad_y)
    exact, scale = reference(lambda g, W: g @ W, grad_y, W)
    assert x.grad.dtype == x_dtype
    assert_same(x.grad.double(), exact, "input gradient vs float64", exact=False, rtol=0.0,
                atol=atol * scale)


@pytest.mark.parametrize("device", DEVICES)
@given(**layer_shapes, compute_dtype=st.sampled_from(COMPUTE_DTYPES))
def test_hand_written_backward_equals_autograd_through_the_dense_weight(
        device, in_features, out_features, blocksize, double_quant, bias, lead, seed,
        compute_dtype):
    """The custom autograd Function (W dequantized again in backward) against plain autograd
    through F.linear on the dequantized weight: output and input gradient bit for bit; the bias
    gradient (only when a user unfreezes it) up to the summation order of N terms in the compute
    dtype."""
    layer = qlora.NF4Linear.from_linear(make_linear(in_features, out_features, bias, seed, device),
                                        blocksize, double_quant, compute_dtype)
    if bias:
        layer.bias.requires_grad_(True)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*lead, in_features, generator=g).to(device)
    x_ours, x_dense = x.clone().requires_grad_(), x.clone().requires_grad_()
    bias_dense = None if not bias else layer.bias.detach().clone().requires_grad_()
    y_ours = layer(x_ours)
    y_dense = F.linear(x_dense.to(compute_dtype), layer.dequantized_weight(),
                       None if bias_dense is None else bias_dense.to(compute_dtype)).to(x.dtype)
    assert_same(y_ours, y_dense, "output vs F.linear on the dequantized weight")
    grad_y = torch.randn(y_ours.shape, generator=g).to(device)
    y_ours.backward(grad_y)
    y_dense.backward(grad_y)
    assert_same(x_ours.grad, x_dense.grad, "hand-written input gradient vs autograd")
    if bias:
        n_terms = math.prod(lead)  # each bias gradient sums N values, rounded in the compute dtype
        sum_of_terms = grad_y.abs().sum(dim=tuple(range(len(lead)))).max().item()
        atol = (n_terms + 1) * UNIT_ROUNDOFF[compute_dtype] * sum_of_terms
        assert_same(layer.bias.grad, bias_dense.grad, "bias gradient", exact=False, rtol=0.0,
                    atol=atol)


def test_backward_saves_only_the_4bit_storage():
    """Nothing of the dense weight's size is kept for backward (F.linear's autograd keeps W)."""
    layer = qlora.NF4Linear.from_linear(make_linear(128, 64, True, 0), compute_dtype=torch.float32)
    x = torch.randn(4, 128, requires_grad=True)

    def saved_by(f):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            f(x).sum().backward()
        return saved

    ours = saved_by(layer)
    assert ours and all(t.numel() < 64 * 128 / 4 for t in ours if t.dtype != torch.uint8)
    assert sum(t.numel() for t in ours if t.dtype == torch.uint8) <= 64 * 128 / 2 + 64 * 128 / 64
    dense = saved_by(lambda x: F.linear(x, layer.dequantized_weight(), layer.bias))
    assert any(t.numel() == 64 * 128 and t.is_floating_point() for t in dense)  # what ours avoids


@pytest.mark.parametrize("device", DEVICES)
@given(**layer_shapes)
def test_state_dict_round_trip_restores_the_same_bytes(device, in_features, out_features,
                                                       blocksize, double_quant, bias, lead, seed):
    layer = qlora.NF4Linear.from_linear(make_linear(in_features, out_features, bias, seed, device),
                                        blocksize, double_quant, compute_dtype=torch.float32)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True, map_location=device)
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # tensor-only: safetensors
    fresh = qlora.NF4Linear(in_features, out_features, bias, blocksize=blocksize,
                            double_quant=double_quant, compute_dtype=torch.float32, device=device)
    fresh.load_state_dict(state)
    expected = storage(layer)
    assert_same_tensors({name: getattr(fresh, name) for name in expected}, expected,
                        "loaded NF4 storage", blocksize)
    if bias:
        assert_same(fresh.bias, layer.bias, "loaded bias")
    x = torch.randn(*lead, in_features, generator=torch.Generator().manual_seed(seed)).to(device)
    assert_same(fresh(x), layer(x), "output after the state dict round trip")


def test_loading_another_layout_fails_clearly():
    layer = qlora.NF4Linear.from_linear(make_linear(128, 32, False, 0), blocksize=64)
    state = layer.state_dict()
    for other in (dict(blocksize=128), dict(double_quant=False)):
        target = qlora.NF4Linear(128, 32, False, **other)
        kept = storage(target)
        with pytest.raises(ValueError, match="nf4_format"):
            target.load_state_dict(state)
        assert_same_tensors({k: getattr(target, k) for k in kept}, kept,
                            f"storage after a refused {other} load (nothing half-loaded)",
                            target.blocksize)
    with pytest.raises(ValueError, match=r"nf4_format.*\[32, 128, 64, 256\]"):
        qlora.NF4Linear(32, 128, False).load_state_dict(state)  # same byte counts, transposed shape
    # Without the format record: a float32 absmax does not slip into uint8 codes.
    plain = qlora.NF4Linear.from_linear(make_linear(128, 32, False, 0), 64, double_quant=False)
    partial = {k: v for k, v in plain.state_dict().items() if k in ("packed", "absmax")}
    with pytest.raises(ValueError, match="absmax.*torch.float32.*torch.uint8"):
        layer.load_state_dict(partial, strict=False)


@pytest.mark.parametrize("cast", ["double", "half", "bfloat16", "to_float64"])
def test_dtype_casts_move_but_never_cast_the_4bit_storage(cast):
    """Module casts leave packed codes and float32 statistics as they are (a cast would round
    them); the bias is cast like any parameter; the compute dtype stays; outputs follow the input's
    dtype."""
    for double_quant in (True, False):
        linear = make_linear(100, 12, True, 3)
        layer = qlora.NF4Linear.from_linear(linear, 32, double_quant, compute_dtype=torch.float32)
        before, W = storage(layer), layer.dequantized_weight()
        layer = layer.to(torch.float64) if cast == "to_float64" else getattr(layer, cast)()
        dtype = {"double": torch.float64, "to_float64": torch.float64, "half": torch.float16,
                 "bfloat16": torch.bfloat16}[cast]
        assert_same_tensors({name: getattr(layer, name) for name in before}, before,
                            f"storage after {cast}", 32)
        assert layer.bias.dtype == dtype and layer.compute_dtype == torch.float32
        assert_same(layer.dequantized_weight(), W, f"dequantized weight after {cast}")
        x = torch.randn(5, 100, dtype=torch.float64).to(dtype)
        expected = F.linear(x.float(), W, layer.bias.float()).to(dtype)
        assert_same(layer(x), expected, f"output after {cast}")


@pytest.mark.parametrize("device", DEVICES)
def test_to_device_moves_every_buffer(device):
    layer = qlora.NF4Linear.from_linear(make_linear(64, 8, True, 0), compute_dtype=torch.float32)
    moved = copy.deepcopy(layer).to(device)
    expected = storage(layer)
    assert all(getattr(moved, name).device.type == device for name in expected)
    assert_same_tensors({name: getattr(moved, name).cpu() for name in expected}, expected,
                        f"storage moved to {device}", layer.blocksize)
    x = torch.randn(3, 64)
    _, scale = reference(lambda x, W, b: x @ W.T + b, x, layer.dequantized_weight(), layer.bias)
    # CPU and GPU GEMMs sum 64 float32 products in other orders
    assert_same(moved(x.to(device)).cpu(), layer(x), f"output on {device}", exact=False,
                rtol=0.0, atol=ACCUMULATION_TOL[torch.float32] * scale)


def tensors_held_by(layer: nn.Module) -> list:
    """Every tensor the layer object references between calls: its attributes, parameters, buffers
    and the fields of a cached nf4.NF4Weight."""
    held = []
    for value in vars(layer).values():
        if isinstance(value, dict):
            held += [t for t in value.values() if isinstance(t, torch.Tensor)]
        elif isinstance(value, torch.Tensor):
            held.append(value)
        elif isinstance(value, nf4.NF4Weight):
            held += list(value.tensors().values())
    return held


def test_the_nf4_weight_is_built_once_and_no_dense_weight_is_kept(monkeypatch):
    """The per-call path does not rebuild (and re-check) the NF4Weight, and between steps the layer
    holds nothing of the dense weight's size: only the 4-bit storage, statistics and the bias."""
    layer = qlora.NF4Linear.from_linear(make_linear(128, 64, True, 0), compute_dtype=torch.float32)
    x = torch.randn(4, 128, requires_grad=True)
    layer(x).sum().backward()
    builds = []
    original = nf4.NF4Weight.__post_init__
    monkeypatch.setattr(nf4.NF4Weight, "__post_init__",
                        lambda self, *args: builds.append(1) or original(self, *args))
    for _ in range(3):
        layer(x).sum().backward()
    assert builds == []
    held = tensors_held_by(layer)
    assert {id(t) for t in held} >= {id(getattr(layer, n)) for n in ("packed", "absmax")}
    assert all(t.numel() <= 64 * 128 / 2 for t in held), [tuple(t.shape) for t in held]
    assert all(t.numel() <= 64 for t in held if t.is_floating_point())  # bias and statistics


def test_the_cached_nf4_weight_follows_loads_and_replaced_buffers():
    """A load copies into the buffers the cached NF4Weight views; a buffer replaced by assignment
    (or by .to(device)) is picked up on the next call."""
    source = qlora.NF4Linear.from_linear(make_linear(100, 12, True, 0), 32,
                                         compute_dtype=torch.float32)
    target = qlora.NF4Linear.from_linear(make_linear(100, 12, True, 1), 32,
                                         compute_dtype=torch.float32)
    x = torch.randn(5, 100)
    before = target(x)
    target.load_state_dict(source.state_dict())
    assert not torch.equal(target(x), before)  # must differ: the load reached the cached weight
    assert_same(target(x), source(x), "output after loading the source's state dict")
    other = qlora.NF4Linear.from_linear(make_linear(100, 12, True, 2), 32,
                                        compute_dtype=torch.float32)
    for name in ("packed", "absmax", "nested_absmax", "offset"):
        setattr(target, name, getattr(other, name).clone())
    with torch.no_grad():
        target.bias.copy_(other.bias)
    assert_same(target(x), other(x), "output after replacing the buffers")
    assert_same(target.dequantized_weight(), other.dequantized_weight(),
                "dequantized weight after replacing the buffers")


# --------------------------------------------------------------------------------------------------
# The equations written out: eq. 6, eq. 5, and the input gradient by hand.

@pytest.mark.parametrize("double_quant", [True, False])
def test_double_dequant_rounds_the_float32_weight_once_into_each_compute_dtype(double_quant):
    """eq. 6 in a compute dtype is the float32 value code[k] * scale rounded once: the same bits as
    rounding the float32 weight (float64 holds it exactly)."""
    q = nf4.quantize_nf4(torch.randn(24, 100, generator=torch.Generator().manual_seed(0)), 32,
                         double_quant)
    W32 = qlora.double_dequant(q, torch.float32)
    assert_same(W32, nf4.dequantize_nf4(q, torch.float32), "double_dequant in float32")
    for compute_dtype in COMPUTE_DTYPES:
        W = qlora.double_dequant(q, compute_dtype)
        assert W.dtype == compute_dtype and W.shape == (24, 100)
        assert_same(W, W32.to(compute_dtype), f"double_dequant in {compute_dtype}")


@given(**layer_shapes, r=st.integers(1, 6), compute_dtype=st.sampled_from(COMPUTE_DTYPES))
def test_qlora_linear_is_eq5_as_the_adapted_layer_computes_it(in_features, out_features, blocksize,
                                                              double_quant, bias, lead, seed, r,
                                                              compute_dtype):
    """qlora.qlora_linear (eq. 5 written out) and LoRALinear(NF4Linear) (the adapter term added in
    place by one BLAS call: another rounding) are each within the compute dtype's rounding of the
    float64 value of X W^T + b + s (X A^T) B^T."""
    r = min(r, max(in_features, out_features))
    linear = make_linear(in_features, out_features, bias, seed)
    layer = lora.LoRALinear(qlora.NF4Linear.from_linear(linear, blocksize, double_quant,
                                                        compute_dtype),
                            r, 2.0 * r, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(out_features, r, generator=g))
    x = torch.randn(*lead, in_features, generator=g)
    q = layer.base.quantized_weight
    ours = qlora.qlora_linear(x, q, layer.base.bias, layer.lora_A, layer.lora_B, layer.scaling,
                              compute_dtype)
    assert ours.dtype == x.dtype and ours.shape == (*lead, out_features)
    W = dequantized_reference(linear, blocksize, double_quant)
    b = linear.bias if bias else torch.zeros(out_features)
    exact, scale = reference(lambda x, W, b, A, B: x @ W.T + b + 2.0 * (x @ A.T) @ B.T, x, W, b,
                             layer.lora_A, layer.lora_B)
    atol = tol(compute_dtype, torch.float32) * scale
    assert_same(ours.double(), exact, "qlora_linear vs float64", exact=False, rtol=0.0, atol=atol)
    assert_same(layer(x).detach().double(), exact, "adapted layer vs float64", exact=False,
                rtol=0.0, atol=atol)


# Gradients in float64: a sum of at most 24 products (out_features) rounded in float64 errs by at
# most 24 u = 2.7e-15 of the sum of absolute terms; 1e-13 of it leaves room.
FLOAT64_GRAD_TOL = 1e-13


@pytest.mark.exercise("qlora.nf4_linear_input_grad")
@given(**layer_shapes)
def test_input_grad_by_hand_equals_autograd_through_the_dense_weight(
        in_features, out_features, blocksize, double_quant, bias, lead, seed):
    """dL/dX = dL/dY W (QLoRA sec. 3: the frozen base passes on the input gradient only) against
    autograd through Y = X W^T + b with W dense, all in float64."""
    linear = make_linear(in_features, out_features, bias, seed)
    q = nf4.quantize_nf4(linear.weight.detach(), blocksize, double_quant)
    W = nf4.dequantize_nf4(q, torch.float32).double()  # (out, in), exact in float64
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*lead, in_features, generator=g, dtype=torch.float64, requires_grad=True)
    y = x @ W.T + (linear.bias.detach().double() if bias else 0.0)
    grad_out = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (expected,) = torch.autograd.grad(y, x, grad_out)
    ours = qlora.nf4_linear_input_grad(grad_out, q, torch.float64)
    assert ours.dtype == torch.float64 and ours.shape == x.shape
    _, scale = reference(lambda g, W: g @ W, grad_out, W)
    assert_same(ours, expected, "nf4_linear_input_grad vs autograd", exact=False, rtol=0.0,
                atol=FLOAT64_GRAD_TOL * scale)


@pytest.mark.exercise("qlora.nf4_linear_input_grad")
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(6, 40), (1, 33)])
def test_gradcheck_of_the_backward_that_dequantizes_again(double_quant, shape):
    """torch.autograd.gradcheck: the autograd function's backward (nf4_linear_input_grad for x, a
    row sum for an unfrozen bias) against finite differences of its forward, in float64."""
    out_features, in_features = shape
    q = nf4.quantize_nf4(torch.randn(shape, generator=torch.Generator().manual_seed(0)), 32,
                         double_quant)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, in_features, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(out_features, generator=g, dtype=torch.float64, requires_grad=True)
    assert_gradcheck(lambda x, b: qlora.nf4_linear(x, q, b, torch.float64), (x, b),
                     "qlora.nf4_linear_input_grad")


# --------------------------------------------------------------------------------------------------
# QLoRA equals LoRA on the dequantized base.

@pytest.mark.parametrize("device", DEVICES)
@given(**layer_shapes, r=st.integers(1, 6), compute_dtype=st.sampled_from(COMPUTE_DTYPES[:3]))
def test_qlora_layer_equals_lora_on_the_dequantized_base(device, in_features, out_features,
                                                         blocksize, double_quant, bias, lead, seed,
                                                         r, compute_dtype):
    """float32 compute: outputs and gradients (x, A, B) bit for bit LoRA's on
    nn.Linear(dequantized W); other compute dtypes: within the base's rounding of the float64 value
    of the same formula."""
    r = min(r, max(in_features, out_features))  # adapters refuse a rank above both widths
    linear = make_linear(in_features, out_features, bias, seed, device)
    W = dequantized_reference(linear, blocksize, double_quant)
    base = qlora.NF4Linear.from_linear(linear, blocksize, double_quant, compute_dtype)
    qlayer = lora.LoRALinear(base, r, 4.0, generator=torch.Generator().manual_seed(seed))
    dense = copy.deepcopy(linear)
    with torch.no_grad():
        dense.weight.copy_(W)
    layer = lora.LoRALinear(dense, r, 4.0, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a trained adapter: B != 0
        B = torch.randn(out_features, r, generator=g).to(device)
        qlayer.lora_B.copy_(B)
        layer.lora_B.copy_(B)
    assert qlayer.lora_A.dtype == torch.float32
    assert_same(qlayer.lora_A, layer.lora_A, "lora_A initialised from the same seed")
    x = torch.randn(*lead, in_features, generator=g).to(device)
    x_qlora, x_lora = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_qlora, y_lora = qlayer(x_qlora), layer(x_lora)
    grad_y = torch.randn(y_qlora.shape, generator=g).to(device)
    y_qlora.backward(grad_y)
    y_lora.backward(grad_y)
    pairs = {"output": (y_qlora, y_lora), "input gradient": (x_qlora.grad, x_lora.grad),
             "lora_A gradient": (qlayer.lora_A.grad, layer.lora_A.grad),
             "lora_B gradient": (qlayer.lora_B.grad, layer.lora_B.grad)}
    if compute_dtype == torch.float32:
        for what, (ours, theirs) in pairs.items():
            assert_same(ours, theirs, f"QLoRA vs LoRA on the dequantized weight: {what}")
        return
    b = linear.bias if bias else torch.zeros(out_features, device=device)
    s = qlayer.scaling
    atol = tol(compute_dtype, torch.float32)
    exact, scale = reference(lambda x, W, b, A, B: x @ W.T + b + s * (x @ A.T) @ B.T, x, W, b,
                             layer.lora_A, B)
    assert_same(y_qlora.double(), exact, "QLoRA output vs float64", exact=False, rtol=0.0,
                atol=atol * scale)
    exact, scale = reference(lambda g, W, A, B: g @ W + s * (g @ B) @ A, grad_y, W, layer.lora_A, B)
    assert_same(x_qlora.grad.double(), exact, "QLoRA input gradient vs float64", exact=False,
                rtol=0.0, atol=atol * scale)
    # dL/dA and dL/dB depend on x and dL/dy only, not on W: they equal LoRA's bit for bit.
    for what in ("lora_A gradient", "lora_B gradient"):
        assert_same(*pairs[what], f"QLoRA vs LoRA: {what}")


def make_gpt(seed=0, n_layer=2, n_embd=32, vocab_size=13):
    config = GPTConfig(vocab_size=vocab_size, block_size=16, n_layer=n_layer, n_head=2,
                       n_embd=n_embd)
    return GPT(config, generator=torch.Generator().manual_seed(seed))


def tokens(seed, vocab_size=13, batch=3, T=16):
    return torch.randint(0, vocab_size, (batch, T), generator=torch.Generator().manual_seed(seed))


def dequantized_twin(qmodel: nn.Module, base: nn.Module) -> nn.Module:
    """`base` with every linear that is NF4 in `qmodel` holding the dequantized weight instead."""
    twin = copy.deepcopy(base)
    with torch.no_grad():
        for name, module in qmodel.named_modules():
            if isinstance(module, qlora.NF4Linear):
                twin.get_submodule(name).weight.copy_(module.dequantized_weight())
    return twin


def nf4_buffers(model):
    return {f"{n}.{b}": t.clone() for n, m in model.named_modules()
            if isinstance(m, qlora.NF4Linear) for b, t in m.named_buffers(recurse=False)}


def randomize_adapters(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapters.adapter_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1])
def test_qlora_gpt_trains_like_lora_on_the_dequantized_gpt(device, seed):
    """Tiny GPT, float32 compute: logits, loss and every adapter gradient equal LoRA's on the
    dequantized model bit for bit, and so do the adapters after PagedAdamW steps (budget 0: state
    paged out after every step). The 4-bit buffers never change and never receive a gradient."""
    base = make_gpt(seed).to(device)
    qmodel = qlora.quantize_model(copy.deepcopy(base), compute_dtype=torch.float32)
    twin = dequantized_twin(qmodel, base)
    models = [lora.apply_lora(m, r=4, alpha=8.0, seed=seed) for m in (qmodel, twin)]
    optimizers = [PagedAdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2,
                             weight_decay=0.0, device_budget_bytes=0) for m in models]
    frozen = nf4_buffers(qmodel)
    assert len(frozen) == 2 * 6 * 5  # 2 blocks, 6 linears, 4 NF4 buffers + nf4_format
    for step in range(3):
        idx = tokens(seed + step).to(device)
        outputs = []
        for model, optimizer in zip(models, optimizers):
            with deterministic_attention(device):
                logits, loss = model(idx, idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            outputs.append((logits, loss, {n: p.grad.clone() for n, p in model.named_parameters()
                                           if p.requires_grad}))
            optimizer.step()
        (logits_qlora, loss_qlora, grads_qlora), (logits_lora, loss_lora, grads_lora) = outputs
        assert_same(logits_qlora, logits_lora, f"QLoRA vs LoRA logits, step {step}")
        assert_same(loss_qlora, loss_lora, f"QLoRA vs LoRA loss, step {step}")
        assert_same_tensors(grads_qlora, grads_lora, f"QLoRA vs LoRA gradients, step {step}")
        # equal to the dense twin's, the first block's gradients passed through every later
        # 4-bit layer
        assert grads_qlora["blocks.0.attn.q_proj.lora_B"].abs().sum() > 0
    trained = [{n: p for n, p in m.named_parameters() if p.requires_grad} for m in models]
    assert_same_tensors(trained[0], trained[1], "QLoRA vs LoRA adapters after PagedAdamW")
    trained_layers = adapters.adapter_layers(qmodel).values()
    assert all(layer.lora_B.abs().sum() > 0 for layer in trained_layers)
    after = nf4_buffers(qmodel)
    assert_same_tensors(after, frozen, "NF4 buffers after training",
                        nf4.DEFAULT_BLOCKSIZE)
    for module in qmodel.modules():
        if isinstance(module, qlora.NF4Linear):
            assert all(t.grad is None and not t.requires_grad for t in module.buffers())
            assert module.bias.grad is None and not module.bias.requires_grad
    optimized = {id(p) for group in optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(t) for layer in adapters.adapter_layers(qmodel).values()
                         for t in (layer.lora_A, layer.lora_B)}


def test_prepare_qlora_is_the_recipe_and_trains():
    """NF4 base (bfloat16 compute) in every block linear, LoRA on each, lm_head/embeddings/norms as
    they were, PagedAdamW over exactly the adapters; a few steps on one batch lower its loss."""
    base = make_gpt(0)
    reference_model = copy.deepcopy(base)
    model, optimizer = qlora.prepare_qlora(base, r=4, alpha=8.0, lr=1e-2, seed=0,
                                           device_budget_bytes=4096)
    assert model is base and isinstance(optimizer, PagedAdamW)
    assert optimizer.device_budget_bytes == 4096
    for block in model.blocks:
        for name in BLOCK_LINEARS:
            layer = getattr(block.attn if name in BLOCK_LINEARS[:4] else block.mlp, name)
            assert isinstance(layer, lora.LoRALinear) and isinstance(layer.base, qlora.NF4Linear)
            assert layer.base.compute_dtype == torch.bfloat16 and layer.base.blocksize == 64
            assert layer.base.double_quant
    assert type(model.lm_head) is nn.Linear
    assert_same(model.lm_head.weight, reference_model.lm_head.weight, "lm_head weight")
    assert_same(model.tok_emb.weight, reference_model.tok_emb.weight, "token embedding")
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == \
        {id(p) for p in model.parameters() if p.requires_grad}
    assert adapters.count_trainable(model) == 2 * 4 * (4 * (32 + 32) + (32 + 128) + (128 + 32))
    frozen = nf4_buffers(model)
    idx = tokens(5)
    losses = []
    for _ in range(6):
        _, loss = model(idx, idx)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert_same_tensors(nf4_buffers(model), frozen, "NF4 buffers after training",
                        nf4.DEFAULT_BLOCKSIZE)


def test_qlora_gpt_checkpoint_round_trip():
    """What train.py's resume does: a QLoRA model's state dict, saved and loaded (weights_only) into
    a QLoRA model prepared from another base, restores every byte and the logits."""
    options = dict(r=2, alpha=4.0, compute_dtype=torch.float32)
    model, _ = qlora.prepare_qlora(make_gpt(0, n_layer=1), **options, seed=0)
    randomize_adapters(model, 0)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other, _ = qlora.prepare_qlora(make_gpt(1, n_layer=1), **options, seed=1)
    idx = tokens(3)
    assert not torch.equal(other(idx)[0], model(idx)[0])  # must differ, or the load proves nothing
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert_same_tensors(other.state_dict(), model.state_dict(), "loaded QLoRA state dict",
                        nf4.DEFAULT_BLOCKSIZE)
    assert_same(other(idx)[0], model(idx)[0], "logits after the checkpoint round trip")


# --------------------------------------------------------------------------------------------------
# Merging.

# Merged computes x (W + s B A)^T where unmerged adds s (x A^T) B^T: other roundings, propagated
# through two blocks and the head. Observed at most 3e-7 of max|logit| in float32; 1e-5 leaves room.
MODEL_MERGE_TOL = 1e-5


@pytest.mark.parametrize("seed", [0, 1])
def test_merged_equals_unmerged_and_requantizing_changes_it(seed):
    base = make_gpt(seed)
    model, _ = qlora.prepare_qlora(copy.deepcopy(base), r=4, alpha=8.0,
                                   compute_dtype=torch.float32, seed=seed)
    randomize_adapters(model, seed)
    idx = tokens(seed)
    adapted, _ = model(idx)
    merged = adapters.merge_adapters(model)
    assert [(n, type(m)) for n, m in merged.named_modules()] == \
        [(n, type(m)) for n, m in base.named_modules()]
    assert [(k, v.shape, v.dtype) for k, v in merged.state_dict().items()] == \
        [(k, v.shape, v.dtype) for k, v in base.state_dict().items()]
    out, _ = merged(idx)
    assert_same(out, adapted, "merged vs adapted logits", exact=False, rtol=0.0,
                atol=MODEL_MERGE_TOL * adapted.abs().max().item())
    assert_same(model(idx)[0], adapted, "QLoRA logits after merge_adapters")  # left as it was
    with pytest.raises(TypeError, match="merge_adapters"):
        model.blocks[0].attn.q_proj.merge()  # no in-place merge into 4-bit storage
    # W0 + s B A is off the NF4 grid: quantizing the merged model again changes every weight.
    requantized = qlora.quantize_model(copy.deepcopy(merged), compute_dtype=torch.float32)
    for name, module in requantized.named_modules():
        if isinstance(module, qlora.NF4Linear):
            merged_weight = merged.get_submodule(name).weight
            assert not torch.equal(module.dequantized_weight(), merged_weight), name
    assert not torch.equal(requantized(idx)[0], out)


@given(**layer_shapes, compute_dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_merged_layer_is_a_linear_in_the_compute_dtype(in_features, out_features, blocksize,
                                                       double_quant, bias, lead, seed,
                                                       compute_dtype):
    """16-bit compute, merged in it: the merged nn.Linear holds round(W + round(s B A)) in the
    compute dtype; its output on x in that dtype is within 16-bit rounding of the adapted
    layer's."""
    r = min(3, max(in_features, out_features))  # adapters refuse a rank above both widths
    base = qlora.NF4Linear.from_linear(make_linear(in_features, out_features, bias, seed),
                                       blocksize, double_quant, compute_dtype)
    g = torch.Generator().manual_seed(seed)
    layer = lora.LoRALinear(base, r, 2.0 * r, generator=g)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(out_features, r, generator=g))
    merged = adapters.merge_adapters(nn.Sequential(layer), dtype=compute_dtype)[0]
    W = layer.base.dequantized_weight()
    assert type(merged) is nn.Linear and merged.weight.dtype == compute_dtype
    assert_same(merged.weight, W + layer.delta_weight().to(compute_dtype),
                f"merged weight in {compute_dtype}")
    x = torch.randn(*lead, in_features, generator=torch.Generator().manual_seed(seed + 1))
    adapted = layer(x)
    b = layer.base.bias if bias else torch.zeros(out_features)
    _, scale = reference(lambda x, W, b, A, B: x @ W.T + b + 2.0 * (x @ A.T) @ B.T, x, W, b,
                         layer.lora_A, layer.lora_B)
    # adapted is within tol of exact; merged rounds x, s B A, the sum, and the output: 4u more
    atol = (tol(compute_dtype, torch.float32) + 4 * UNIT_ROUNDOFF[compute_dtype]) * scale
    assert_same(merged(x.to(compute_dtype)).double(), adapted.double(), "merged vs adapted output",
                exact=False, rtol=0.0, atol=atol)


# --------------------------------------------------------------------------------------------------
# Storage and memory.

def expected_nf4_bytes(n: int, blocksize: int, double_quant: bool) -> int:
    """Per tensor: n/2 bytes of codes; a float32 absmax per block, or with double quantization a
    uint8 code per block, a float32 nested absmax per 256 blocks and one float32 offset."""
    blocks = -(-n // blocksize)
    if not double_quant:
        return -(-n // 2) + 4 * blocks
    return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4


# --------------------------------------------------------------------------------------------------
# Bad inputs.

def test_bad_inputs_raise_clear_errors():
    model = make_gpt(0, n_layer=1)
    pristine = copy.deepcopy(model)
    with pytest.raises(TypeError, match="ln_1.*not a linear"):
        qlora.quantize_model(model, ("q_proj", "ln_1"))
    with pytest.raises(TypeError, match="tok_emb.*not a linear"):
        qlora.quantize_model(model, "tok_emb")
    with pytest.raises(ValueError, match="matches no module"):
        qlora.quantize_model(model, "nonexistent")
    for bad in (torch.int32, torch.complex64, torch.bool, "bfloat16", None):
        with pytest.raises(TypeError, match="compute_dtype"):
            qlora.quantize_model(model, compute_dtype=bad)
        with pytest.raises(TypeError, match="compute_dtype"):
            qlora.NF4Linear(8, 8, compute_dtype=bad)
    with pytest.raises(ValueError, match="blocksize"):
        qlora.quantize_model(model, blocksize=48)
    with pytest.raises(TypeError, match="double_quant"):
        qlora.quantize_model(model, double_quant="yes")
    # a failed call leaves the model untouched
    assert_same_tensors(model.state_dict(), pristine.state_dict(), "model after failed calls")
    assert not any(isinstance(m, qlora.NF4Linear) for m in model.modules())
    qlora.quantize_model(model)
    with pytest.raises(TypeError, match="already quantized"):
        qlora.quantize_model(model, "q_proj")
    lora.apply_lora(model, r=2, alpha=4.0)
    with pytest.raises(ValueError, match="adapters"):
        qlora.quantize_model(model, "lm_head")
    with pytest.raises(TypeError, match="nn.Linear"):
        qlora.NF4Linear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        qlora.NF4Linear.from_linear(nn.Linear(4, 4).double())
    with pytest.raises(ValueError, match="in_features"):
        qlora.NF4Linear(0, 4)
    layer = qlora.NF4Linear.from_linear(nn.Linear(64, 4))
    with pytest.raises(ValueError, match="in_features=64"):
        layer(torch.randn(3, 32))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(3, 64, dtype=torch.long))
    poisoned = nn.Linear(4, 4)
    with torch.no_grad():
        poisoned.weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        qlora.NF4Linear.from_linear(poisoned)


# --------------------------------------------------------------------------------------------------
# Non-finite values and bad options (issue 17): refused where they enter, naming the tensor.

NON_FINITE = (float("nan"), float("inf"), float("-inf"))


@pytest.mark.parametrize("value", NON_FINITE)
def test_from_linear_refuses_a_non_finite_bias(value):
    """A NaN weight is refused by the quantizer; a NaN bias would pass unquantized into every
    output."""
    poisoned = make_linear(64, 4, True, 0)
    with torch.no_grad():
        poisoned.bias[2] = value
    with pytest.raises(ValueError, match="bias.*NaN or Inf"):
        qlora.NF4Linear.from_linear(poisoned)


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("double_quant, name", [(True, "offset"), (True, "nested_absmax"),
                                                (False, "absmax"), (True, "bias"), (False, "bias")])
def test_loading_non_finite_scales_offset_or_bias_fails_and_loads_nothing(double_quant, name,
                                                                          value):
    """The float32 statistics (absmax without double quantization; nested_absmax and offset with it)
    and the bias scale every output: one NaN there is NaN in every output of its block or row."""
    source = qlora.NF4Linear.from_linear(make_linear(128, 8, True, 0), 64, double_quant)
    state = source.state_dict()
    state[name] = state[name].clone()
    state[name].view(-1)[0] = value
    target = qlora.NF4Linear.from_linear(make_linear(128, 8, True, 1), 64, double_quant)
    kept = dict(storage(target), bias=target.bias.detach().clone())
    with pytest.raises(ValueError, match=f"'{name}'.*NaN or Inf"):
        target.load_state_dict(state)
    assert_same_tensors({k: getattr(target, k) for k in kept}, kept,
                        "storage and bias after a refused load (nothing half-loaded)", 64)
    model = nn.Sequential(target)  # the entry is named with its prefix inside a model
    with pytest.raises(ValueError, match=f"'0.{name}'"):
        model.load_state_dict({f"0.{k}": v for k, v in state.items()})


@pytest.mark.parametrize("double_quant, name", [(False, "absmax"), (True, "nested_absmax")])
def test_loading_a_negative_scale_fails_and_loads_nothing(double_quant, name):
    """A block's absmax (or, with double quantization, a nested one) is a largest magnitude: a
    negative one would load as finite and flip the sign of every weight of its block."""
    source = qlora.NF4Linear.from_linear(make_linear(128, 8, True, 0), 64, double_quant)
    state = source.state_dict()
    state[name] = state[name].clone()
    state[name].view(-1)[0] *= -1
    target = qlora.NF4Linear.from_linear(make_linear(128, 8, True, 1), 64, double_quant)
    kept = storage(target)
    with pytest.raises(ValueError, match=f"'{name}' has negative values"):
        target.load_state_dict(state)
    assert_same_tensors(storage(target), kept, "storage after a refused load", 64)


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_double_quant_must_be_a_bool_at_every_entry(bad):
    model = make_gpt(0, n_layer=1)
    calls = [lambda: qlora.NF4Linear(8, 8, double_quant=bad),
             lambda: qlora.NF4Linear.from_linear(nn.Linear(64, 4), double_quant=bad),
             lambda: qlora.quantize_model(model, double_quant=bad),
             lambda: qlora.prepare_qlora(model, double_quant=bad)]
    for call in calls:
        with pytest.raises(TypeError, match="double_quant must be a bool"):
            call()
    assert not any(isinstance(m, (qlora.NF4Linear, lora.LoRALinear)) for m in model.modules())


@pytest.mark.parametrize("bad", [torch.int32, torch.complex64, torch.bool, "bfloat16", None])
def test_compute_dtype_is_checked_at_every_entry(bad):
    model, q = make_gpt(0, n_layer=1), nf4.quantize_nf4(torch.randn(4, 64))
    calls = [lambda: qlora.NF4Linear(8, 8, compute_dtype=bad),
             lambda: qlora.NF4Linear.from_linear(nn.Linear(64, 4), compute_dtype=bad),
             lambda: qlora.quantize_model(model, compute_dtype=bad),
             lambda: qlora.prepare_qlora(model, compute_dtype=bad),
             lambda: qlora.nf4_linear(torch.randn(2, 64), q, compute_dtype=bad)]
    # qlora.double_dequant (eq. 6) is the math alone: it takes compute_dtype from these doors
    for call in calls:
        with pytest.raises(TypeError, match="compute_dtype must be"):
            call()
    assert not any(isinstance(m, (qlora.NF4Linear, lora.LoRALinear)) for m in model.modules())


def test_a_meta_linear_is_refused_clearly():
    with pytest.raises(ValueError, match="meta"):
        qlora.NF4Linear.from_linear(nn.Linear(64, 4, device="meta"))
