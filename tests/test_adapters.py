"""Tests for adapters.py: targets, freezing, merging, adapter state; its helpers serve
test_adapter_files.py (adapter directories in PEFT's format) too.

Tolerances: logits of two implementations of the same adapter (ours, PEFT's) in float32 agree to
1e-5 of the largest logit (the issue's figure; they sum in other orders: seen 6e-8 absolute on
logits of size ~1). Loading a file into our own model is exact (the same tensors, the same code).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import adapters
import dora
import lora
import vera
from assertions import assert_same
from formats import adapter_files
from tiny_gpt import GPT, GPTConfig

LOGIT_RTOL = 1e-5
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
PEFT_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]  # explicit: PEFT's all-linear differs


def make_gpt(seed: int = 0, n_layer: int = 2, n_embd: int = 16) -> GPT:
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=n_layer, n_head=2, n_embd=n_embd)
    return GPT(config, generator=torch.Generator().manual_seed(seed))


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomize_adapters(model: nn.Module, seed: int) -> None:
    """Stand-in for training: every trainable tensor moved, so the outputs differ from the base."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def linear_names(model: nn.Module, suffixes=BLOCK_LINEARS) -> list[str]:
    """Independent of adapters.find_targets: named nn.Linear modules whose last name is a suffix."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in suffixes]


def assert_logits_close(actual, expected, name="logits"):
    assert_same(actual, expected, name, exact=False, rtol=0,
                atol=LOGIT_RTOL * expected.abs().max().item())


BUILDERS = {  # method -> our model on `base`, adapted on PEFT_TARGETS
    "lora": lambda base: lora.apply_lora(base, PEFT_TARGETS, r=4, alpha=8.0, seed=0),
    "rslora": lambda base: lora.apply_lora(base, PEFT_TARGETS, r=4, alpha=8.0, rslora=True, seed=0),
    "dora": lambda base: dora.apply_dora(base, PEFT_TARGETS, r=4, alpha=8.0, seed=0),
    "vera": lambda base: vera.apply_vera(base, PEFT_TARGETS, r=8, seed=3),
}


def trained(method: str, seed: int = 1, base: GPT | None = None) -> nn.Module:
    model = BUILDERS[method](copy.deepcopy(base if base is not None else make_gpt()))
    randomize_adapters(model, seed)
    return model


# --------------------------------------------------------------------------------------------------
# Targets.

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
                              ((), ValueError, "targets"), ("ln_1", TypeError, "ln_1"),
                              (None, ValueError, "targets must be 'all-linear'.*got None"),
                              (7, ValueError, "targets must be"), ([""], ValueError, "targets")]:
        with pytest.raises(error, match=match):
            lora.apply_lora(fresh, bad, r=2, alpha=4.0)
    with pytest.raises(ValueError, match="rank"):
        lora.apply_lora(fresh, "all-linear", r=0, alpha=4.0)
    assert not adapters.adapter_layers(fresh)  # a failed apply_lora leaves the model as it was
    with pytest.raises(ValueError, match="all-linear"):
        lora.apply_lora(nn.Sequential(nn.ReLU()), "all-linear")


@pytest.mark.parametrize("apply", [
    lambda model, targets: lora.apply_lora(model, targets, r=2),
    lambda model, targets: dora.apply_dora(model, targets, r=2),
    lambda model, targets: vera.apply_vera(model, targets, r=2),
])
@pytest.mark.parametrize("adapted_with", ["lora", "vera"])
def test_target_finding_never_descends_into_an_adapter(apply, adapted_with):
    """Naming an adapter's own submodule (its `base`, its dropout, VeRA's shared pair) is an error;
    "all-linear" on a fully adapted model finds nothing rather than wrapping the bases."""
    model = trained(adapted_with)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for inside in ("base", "q_proj.base", "lora_dropout" if adapted_with == "lora" else
                   "vera_projection"):
        with pytest.raises(ValueError, match="part of an adapter; adapters do not nest"):
            apply(model, inside)
    with pytest.raises(ValueError, match="matches no module"):
        apply(model, "lora_A")  # a parameter, not a module
    model = BUILDERS[adapted_with](make_gpt()) if adapted_with == "lora" else model
    lora.apply_lora(model, ["k_proj", "o_proj"], r=2)  # the other block linears are still free
    with pytest.raises(ValueError, match="found no linear layer to adapt"):
        apply(model, "all-linear")
    for k, v in trained(adapted_with).state_dict().items():
        assert_same(v, before[k], f"{k} after the refused applies")


def test_a_model_that_is_itself_a_linear_is_refused_clearly():
    with pytest.raises(ValueError, match="itself a linear"):
        lora.apply_lora(nn.Linear(4, 4), r=2, alpha=4.0)


# --------------------------------------------------------------------------------------------------
# Merging: the flag is module state; adapters are frozen while merged; merge_adapters' dtype.

def test_a_merged_state_dict_loads_into_a_fresh_model_as_merged():
    model, idx = trained("lora"), tokens()
    adapted = model(idx)[0]
    for layer in adapters.adapter_layers(model).values():
        layer.merge()
    state = model.state_dict()
    fresh = BUILDERS["lora"](make_gpt())
    fresh.load_state_dict(state)  # strict
    assert all(layer.merged for layer in adapters.adapter_layers(fresh).values())
    assert_logits_close(fresh(idx)[0], adapted)  # applied once, not twice
    for layer in adapters.adapter_layers(fresh).values():
        layer.unmerge()
    assert_logits_close(fresh(idx)[0], adapted)
    # A state dict from before the flag existed (no adapter_merged keys) loads strictly, unmerged.
    unmerged = trained("lora")
    old = {k: v for k, v in unmerged.state_dict().items() if not k.endswith("adapter_merged")}
    fresh.load_state_dict(old)
    assert not any(layer.merged for layer in adapters.adapter_layers(fresh).values())
    assert_same(fresh(idx)[0], unmerged(idx)[0], "logits loaded without merged flags")


@pytest.mark.parametrize("method, name", [("lora", "lora_B"), ("dora", "magnitude"),
                                          ("vera", "lambda_b")])
def test_a_state_dict_saved_merged_after_an_edit_is_refused(method, name):
    """Edited while merged, then saved: W holds W0 + ΔW(old) beside the new tensors. The digest of
    what was merged travels in the state dict, and loading it compares: refused, not W0 wrong."""
    model = trained(method)
    layer = model.blocks[1].mlp.up_proj
    layer.merge()
    fine = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        getattr(layer, name).add_(1.0)
    edited = model.state_dict()
    for target in (BUILDERS[method](make_gpt()), model):
        with pytest.raises(RuntimeError, match=r"blocks.1.mlp.up_proj: its adapter tensors are "
                                               r"not those merged into its weight"):
            target.load_state_dict(edited)
    fresh = BUILDERS[method](make_gpt())
    fresh.load_state_dict(fine)  # saved right after the merge: loads, merged, and unmerges
    fresh.blocks[1].mlp.up_proj.unmerge()


def test_editing_veras_shared_pair_while_merged_makes_unmerge_refuse():
    model = trained("vera")
    layer = model.blocks[0].attn.q_proj
    layer.merge()
    with torch.no_grad():
        layer.vera_projection.vera_A.mul_(2.0)  # shared by every layer: ΔW is not what was added
    with pytest.raises(ValueError, match="vera_A changed while the adapter was merged"):
        layer.unmerge()
    assert layer.merged


@pytest.mark.parametrize("method, name", [("lora", "lora_B"), ("vera", "lambda_b")])
def test_editing_an_adapter_while_merged_makes_unmerge_refuse(method, name):
    model = trained(method)
    layer = model.blocks[0].attn.q_proj
    layer.merge()
    merged, value = layer.base.weight.detach().clone(), getattr(layer, name).detach().clone()
    with torch.no_grad():
        getattr(layer, name).add_(1.0)
    with pytest.raises(ValueError, match=f"{name} changed while the adapter was merged"):
        layer.unmerge()
    assert layer.merged
    assert_same(layer.base.weight, merged, "merged W0 + ΔW after the refused unmerge")  # kept
    with torch.no_grad():
        getattr(layer, name).copy_(value)  # the merged values back: unmerge works again
    layer.unmerge()
    assert not layer.merged


# Merged vs adapted logits, relative to the largest logit. Merging rounds each W0 + ΔW once, and two
# blocks amplify that: the randomized adapters are large beside the base's 0.02-std weights, so the
# attention scores are large and the softmax passes their absolute errors on. Over 900 random models
# the largest difference was 1.8e-5 (float32, ~300u) and 3.2e-14 (float64).
MODEL_MERGE_TOL = {torch.float32: 1e-4, torch.float64: 1e-12}


@given(n_layer=st.integers(1, 2), n_embd=st.sampled_from([16, 24, 32]), r=st.integers(1, 16),
       seed=st.integers(0, 2 ** 32 - 1), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_merge_adapters_gives_the_base_architecture_and_the_adapted_outputs(n_layer, n_embd, r,
                                                                            seed, dtype):
    model = lora.apply_lora(make_gpt(seed, n_layer, n_embd).to(dtype), r=r, alpha=2.0, seed=seed)
    with torch.no_grad():
        for layer in adapters.adapter_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, dtype=dtype,
                                           generator=torch.Generator().manual_seed(seed)))
    idx = tokens(seed)
    adapted, _ = model(idx)
    merged = adapters.merge_adapters(model)
    fresh = make_gpt(seed, n_layer, n_embd).to(dtype)
    assert [(n, type(m)) for n, m in merged.named_modules()] == \
        [(n, type(m)) for n, m in fresh.named_modules()]
    assert [(k, v.shape, v.dtype) for k, v in merged.state_dict().items()] == \
        [(k, v.shape, v.dtype) for k, v in fresh.state_dict().items()]
    assert_same(merged(idx)[0], adapted, "merged vs adapted logits", exact=False, rtol=0.0,
                atol=MODEL_MERGE_TOL[dtype] * adapted.abs().max().item())
    assert_same(model(idx)[0], adapted, "adapted logits after merge_adapters")  # left as it was
    # merging some layers in place first changes nothing: the same W0 + ΔW, rounded the same way
    model.blocks[0].attn.q_proj.merge()
    again = adapters.merge_adapters(model, inplace=True)
    assert again is model and not adapters.adapter_layers(model)
    for k, v in model.state_dict().items():  # the same W0 + ΔW, rounded the same way
        assert_same(v, merged.state_dict()[k], f"{k} merged in place vs merged into a copy")


def test_merging_a_quantized_model_takes_the_same_inputs_in_a_chosen_dtype():
    """An NF4 base computes in bfloat16 but returns its input's dtype (float32 here): the merged
    linears are float32 by default, so the merged model runs on the same inputs. Both compute
    W = dequantize(NF4) + ΔW; the adapted model rounds x and W0 x to bfloat16 where the merged one
    does not: a bfloat16 rounding (2^-8) per layer, 2e-2 of the largest logit through two blocks."""
    qlora = pytest.importorskip("qlora")
    model = qlora.quantize_model(make_gpt(), compute_dtype=torch.bfloat16)
    lora.apply_lora(model, r=4, alpha=8.0, seed=0)
    randomize_adapters(model, 2)
    idx = tokens()
    adapted = model(idx)[0]
    merged = adapters.merge_adapters(model)
    assert merged.blocks[0].attn.q_proj.weight.dtype == torch.float32
    assert_same(merged(idx)[0], adapted, "merged vs NF4-adapted logits", exact=False, rtol=0,
                atol=2e-2 * adapted.abs().max().item())
    layer = model.blocks[0].attn.q_proj
    W = layer.base.dequantized_weight().float() + layer.delta_weight()
    assert_same(merged.blocks[0].attn.q_proj.weight, W,
                "merged q_proj weight, summed in float32 (no rounding)")
    in_bf16 = adapters.merge_adapters(model, dtype=torch.bfloat16).blocks[0].attn.q_proj
    assert in_bf16.weight.dtype == in_bf16.bias.dtype == torch.bfloat16
    assert_same(in_bf16.weight,
                layer.base.dequantized_weight() + layer.delta_weight().to(torch.bfloat16),
                "bfloat16 merged weight (merge()'s rounding)")


# --------------------------------------------------------------------------------------------------
# In memory: adapter_state_dict reads the tensors; a SavedAdapter loads, a bare dict does not.

def test_adapter_state_dict_is_a_detached_copy_and_a_bare_dict_does_not_load():
    model = trained("lora")
    state = adapters.adapter_state_dict(model)
    assert set(state) == {f"{t}.lora_{m}" for t in linear_names(make_gpt(), PEFT_TARGETS)
                          for m in "AB"}
    state["blocks.0.attn.q_proj.lora_A"].add_(1.0)  # detached copies: the model is not affected
    # must differ: the copy was edited, the model's lora_A was not
    assert not torch.equal(state["blocks.0.attn.q_proj.lora_A"], model.blocks[0].attn.q_proj.lora_A)
    other = BUILDERS["lora"](make_gpt())
    for source in (state, adapters.adapter_state_dict(model), None, 3):  # no r, alpha or seed
        with pytest.raises(TypeError, match="adapter directory or a SavedAdapter, got .* no r, "):
            adapter_files.load_adapter(other, source)
        with pytest.raises(TypeError, match="adapter directory or a SavedAdapter"):
            adapter_files.apply_saved_adapter(make_gpt(), source)
    with pytest.raises(ValueError, match="no adapter"):
        adapters.adapter_state_dict(make_gpt())
