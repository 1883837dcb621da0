"""Tests for adapters.py and adapter_files.py: targets, freezing, merging, adapter state, and
adapter directories in PEFT's format, with PEFT 0.21.2 and the `safetensors` package as oracles.

Tolerances: logits of two implementations of the same adapter (ours, PEFT's) in float32 agree to
1e-5 of the largest logit (the issue's figure; they sum in other orders: seen 6e-8 absolute on
logits of size ~1). Loading a file into our own model is exact (the same tensors, the same code).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os

import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st

import adapter_files
import adapters
import dora
import lora
import vera
from assertions import assert_same
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


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


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
            adapters.load_adapter(other, source)
        with pytest.raises(TypeError, match="adapter directory or a SavedAdapter"):
            adapters.apply_saved_adapter(make_gpt(), source)
    with pytest.raises(ValueError, match="no adapter"):
        adapters.adapter_state_dict(make_gpt())


def test_an_edited_saved_adapter_in_memory_is_checked_again_and_leaves_the_model_alone():
    """read_adapter's SavedAdapter can be kept to switch adapters without reading files again;
    if it is edited before load_adapter, the edit is checked like a file's."""
    model, source = trained("lora"), trained("lora", seed=3)
    good, before = adapters.saved_adapter(source), adapters.adapter_state_dict(model)
    key = "base_model.model.blocks.1.mlp.up_proj.lora_B.weight"
    for tensors, config, error, match in [
            (dict(good.tensors, **{key: torch.full((64, 4), float("nan"))}), {}, ValueError,
             f"{key}' must hold finite floats"),
            (dict(good.tensors, **{key: torch.zeros(3, 3)}), {}, ValueError, "shape"),
            (good.tensors, {"lora_alpha": 32.0}, ValueError, "lora_alpha is 32.0 in the file"),
            (good.tensors, {"use_rslora": "yes"}, TypeError, "use_rslora must be a bool")]:
        edited = dataclasses.replace(good, tensors=tensors, config={**good.config, **config})
        with pytest.raises(error, match=match):
            adapters.load_adapter(model, edited)
    for k, v in adapters.adapter_state_dict(model).items():
        assert_same(v, before[k], f"{k} after the refused loads")
    adapters.load_adapter(model, good)
    assert_same(model(tokens())[0], source(tokens())[0], "logits after loading the good one")


def test_atomic_save_leaves_no_partial_file_and_gives_the_usual_mode(tmp_path):
    path = tmp_path / "sub" / "adapter.pt"  # the directory is created
    umask = os.umask(0o022)
    try:
        adapters.atomic_save({"w": torch.arange(3.0)}, str(path))
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600
    old_bytes = path.read_bytes()
    with pytest.raises(Exception, match="pickle"):  # a lambda cannot be pickled
        adapters.atomic_save({"w": torch.arange(5.0), "f": lambda: 0}, str(path))
    assert path.read_bytes() == old_bytes
    assert os.listdir(path.parent) == ["adapter.pt"]  # the temporary file is gone


# --------------------------------------------------------------------------------------------------
# Directories: our files, read back by us, by PEFT and by the safetensors package.

@pytest.mark.parametrize("method", list(BUILDERS))
def test_our_directory_loads_in_peft_with_the_same_logits(peft, method, tmp_path):
    base, idx = make_gpt(), tokens()
    model = trained(method, base=base)
    adapters.save_adapter(model, tmp_path / method)
    assert sorted(os.listdir(tmp_path / method)) == [adapter_files.CONFIG_FILE,
                                                     adapter_files.TENSOR_FILE]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / method).eval()
    assert_logits_close(theirs(idx)[0], model(idx)[0])
    ours = adapters.apply_saved_adapter(copy.deepcopy(base), tmp_path / method)
    assert_same(ours(idx)[0], model(idx)[0], f"{method} logits after our own round trip")


def test_our_safetensors_file_is_read_by_the_safetensors_package(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open
    model = trained("vera")
    adapters.save_adapter(model, tmp_path)
    path = str(tmp_path / adapter_files.TENSOR_FILE)
    tensors = safetensors_torch.load_file(path)
    layer = model.blocks[1].mlp.up_proj
    assert_same(tensors["base_model.model.blocks.1.mlp.up_proj.vera_lambda_b"], layer.lambda_b,
                "vera_lambda_b as read by the safetensors package")
    assert all(k.startswith("base_model.model.") and k.endswith(("vera_lambda_d", "vera_lambda_b"))
               for k in tensors)  # no merged flag, no matrices: what PEFT expects
    with safe_open(path, "pt") as file:
        metadata = file.metadata()
    assert metadata["format"] == "pt" and metadata["base_layer_type"] == "Linear"
    assert metadata["vera_projection_sha256"] == vera.vera_projection_of(model).checksum
    assert metadata["base_fingerprint"] == adapter_files.base_fingerprint(make_gpt())
    config = json.loads((tmp_path / adapter_files.CONFIG_FILE).read_text())
    assert config["peft_type"] == "VERA" and config["r"] == 8 and not config["save_projection"]
    assert config["target_modules"] == linear_names(make_gpt(), PEFT_TARGETS)


def peft_directory(peft, method: str, base: GPT, directory, all_linear: bool = False,
                   save_projection: bool = False):
    """PEFT's own adapter on `base`, its tensors moved away from their init, saved by PEFT."""
    targets = "all-linear" if all_linear else PEFT_TARGETS
    if method == "vera":
        config = peft.VeraConfig(r=8, target_modules=targets, projection_prng_key=5,
                                 save_projection=save_projection)
    else:
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                 use_rslora=method == "rslora", use_dora=method == "dora")
    model = peft.get_peft_model(copy.deepcopy(base), config)
    randomize_adapters(model, 7)
    model.save_pretrained(str(directory))
    return model.eval()


@pytest.mark.parametrize("method", list(BUILDERS))
def test_a_directory_peft_saves_loads_with_apply_saved_adapter(peft, method, tmp_path):
    base, idx = make_gpt(), tokens()
    theirs = peft_directory(peft, method, base, tmp_path)
    ours = adapters.apply_saved_adapter(copy.deepcopy(base), tmp_path)
    assert list(adapters.adapter_layers(ours)) == linear_names(base, PEFT_TARGETS)
    assert_logits_close(ours(idx)[0], theirs(idx)[0])


def test_peft_all_linear_regex_targets_and_saved_projections_load(peft, tmp_path):
    """PEFT writes "all-linear" out as the list of names it adapted (lm_head included on a plain
    module); a config may also say "all-linear" or give a regular expression; VeRA files may carry
    the matrices (save_projection), which must then equal the ones the seed draws here."""
    base, idx = make_gpt(), tokens()
    theirs = peft_directory(peft, "lora", base, tmp_path / "all", all_linear=True)
    ours = adapters.apply_saved_adapter(copy.deepcopy(base), tmp_path / "all")
    assert "lm_head" in adapters.adapter_layers(ours)
    assert_logits_close(ours(idx)[0], theirs(idx)[0])
    config_path = tmp_path / "all" / adapter_files.CONFIG_FILE
    for targets in ("all-linear", r"(blocks\.\d\.(attn|mlp)\.\w+_proj|lm_head)"):
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps(dict(config, target_modules=targets)))
        ours = adapters.apply_saved_adapter(copy.deepcopy(base), tmp_path / "all")
        assert_logits_close(ours(idx)[0], theirs(idx)[0])
    theirs = peft_directory(peft, "vera", base, tmp_path / "proj", save_projection=True)
    ours = adapters.apply_saved_adapter(copy.deepcopy(base), tmp_path / "proj")
    assert_logits_close(ours(idx)[0], theirs(idx)[0])


def test_qlora_adapters_save_and_load_over_the_same_nf4_base_only(tmp_path):
    qlora = pytest.importorskip("qlora")
    model = lora.apply_lora(qlora.quantize_model(make_gpt(), compute_dtype=torch.float32), r=4)
    randomize_adapters(model, 3)
    adapters.save_adapter(model, tmp_path)
    assert adapters.read_adapter(tmp_path).metadata["base_layer_type"] == "NF4Linear"
    again = adapters.apply_saved_adapter(
        qlora.quantize_model(make_gpt(), compute_dtype=torch.float32), tmp_path)
    assert_same(again(tokens())[0], model(tokens())[0], "QLoRA logits after save and load")
    plain = make_gpt()
    with pytest.raises(ValueError, match="base_layer_type is 'NF4Linear' in the file but "
                                         "'Linear' in the model"):
        adapters.apply_saved_adapter(plain, tmp_path)
    assert not adapters.adapter_layers(plain)


# --------------------------------------------------------------------------------------------------
# Refusals: each names the field and both values, one line, before anything is copied.

@pytest.mark.parametrize("other, match", [
    (lambda: lora.apply_lora(make_gpt(), PEFT_TARGETS, r=2, alpha=8.0), "r is 4 in the file but 2"),
    (lambda: lora.apply_lora(make_gpt(), PEFT_TARGETS, r=4, alpha=32.0),
     "lora_alpha is 8.0 in the file but 32.0 in the model"),
    (lambda: lora.apply_lora(make_gpt(), PEFT_TARGETS, r=4, alpha=8.0, rslora=True),
     "use_rslora is False in the file but True in the model"),
    (lambda: dora.apply_dora(make_gpt(), PEFT_TARGETS, r=4, alpha=8.0),
     "method is 'lora' in the file but 'dora' in the model"),
    (lambda: vera.apply_vera(make_gpt(), PEFT_TARGETS, r=4),
     "method is 'lora' in the file but 'vera' in the model"),
    (lambda: lora.apply_lora(make_gpt(), ["q_proj", "v_proj"], r=4, alpha=8.0),
     r"targets is .8 layers, \['blocks.0.mlp.down_proj', .* not in the model. in the file but "
     r".4 layers, \[\] not in the file. in the model"),
    (lambda: lora.apply_lora(make_gpt(seed=9), PEFT_TARGETS, r=4, alpha=8.0),
     "base_fingerprint is '[0-9a-f]{64}' in the file but '[0-9a-f]{64}' in the model"),
])
def test_load_adapter_refuses_a_file_of_other_settings(other, match, tmp_path):
    adapters.save_adapter(trained("lora"), tmp_path)
    model = other()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match) as error:
        adapters.load_adapter(model, tmp_path)
    assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)
    for k, v in model.state_dict().items():
        assert_same(v, before[k], f"{k} after the refused load")


def test_shapes_and_the_base_are_checked_and_check_base_can_be_waived(tmp_path):
    adapters.save_adapter(trained("lora"), tmp_path)
    wide = lora.apply_lora(make_gpt(n_embd=32), PEFT_TARGETS, r=4, alpha=8.0)
    with pytest.raises(ValueError, match=r"the shape of base_model.model.blocks.0.attn.q_proj."
                                         r"lora_A.weight is \(4, 16\) in the file but \(4, 32\)"):
        adapters.load_adapter(wide, tmp_path, check_base=False)
    other_base = lora.apply_lora(make_gpt(seed=9), PEFT_TARGETS, r=4, alpha=8.0)
    adapters.load_adapter(other_base, tmp_path, check_base=False)  # the caller vouches for it
    assert adapter_files.base_fingerprint(make_gpt()) == \
        adapter_files.base_fingerprint(trained("lora"))  # adapters are not part of the base


def test_merged_plain_and_adapted_models_are_refused_where_they_do_not_fit(tmp_path):
    model = trained("lora")
    adapters.save_adapter(model, tmp_path)
    model.blocks[0].attn.q_proj.merge()
    for call in (adapters.save_adapter, adapters.load_adapter):
        with pytest.raises(ValueError, match="unmerge"):
            call(model, tmp_path)
    with pytest.raises(ValueError, match="no adapter layers to load into"):
        adapters.load_adapter(make_gpt(), tmp_path)
    with pytest.raises(ValueError, match="already carries adapters"):
        adapters.apply_saved_adapter(model, tmp_path)


def test_bad_files_are_one_line_errors_naming_the_file(tmp_path):
    good = tmp_path / "good"
    adapters.save_adapter(trained("dora"), good)
    tensor_bytes = (good / adapter_files.TENSOR_FILE).read_bytes()
    config_text = (good / adapter_files.CONFIG_FILE).read_text()

    def variant(name, tensors=tensor_bytes, config=config_text):
        directory = tmp_path / name
        directory.mkdir()
        (directory / adapter_files.TENSOR_FILE).write_bytes(tensors)
        (directory / adapter_files.CONFIG_FILE).write_text(config)
        return directory

    flipped = bytearray(tensor_bytes)
    flipped[-3] ^= 0x01
    config = json.loads(config_text)
    cases = [
        (variant("truncated", tensors=tensor_bytes[:-10]), ValueError, adapter_files.TENSOR_FILE),
        (variant("flipped", tensors=bytes(flipped)), ValueError, adapter_files.TENSOR_FILE),
        (variant("json", config="{not json"), ValueError, "not valid JSON"),
        (variant("deep", config="[" * 10**5 + "]" * 10**5), ValueError, "not valid JSON"),
        (variant("edited", config=config_text.replace('"lora_alpha": 8.0', '"lora_alpha": 16')),
         ValueError, "config_sha256 differs"),
        (variant("empty"), None, None),
    ]
    os.remove(cases[-1][0] / adapter_files.CONFIG_FILE)
    cases[-1] = (cases[-1][0], FileNotFoundError, adapter_files.CONFIG_FILE)
    for directory, error, match in cases:
        with pytest.raises(error, match=match) as caught:
            adapters.read_adapter(directory)
        assert "\n" not in str(caught.value) and str(directory) in str(caught.value)
    # PEFT-style files (no config_sha256): field checks and unsupported options
    tensors, _ = adapter_files.safetensors_io.load_file(str(good / adapter_files.TENSOR_FILE))
    nan = dict(tensors)
    key = next(iter(nan))
    nan[key] = torch.full_like(nan[key], float("nan"))
    for name, config_change, tensors_change, match in [
            ("alpha", {"lora_alpha": -1}, tensors, "lora_alpha must be a finite number"),
            ("type", {"peft_type": "IA3"}, tensors, "peft_type is 'LORA' or 'VERA'"),
            ("pattern", {"rank_pattern": {"q_proj": 2}}, tensors, "rank_pattern .* not supported"),
            ("fan", {"fan_in_fan_out": True}, tensors, "fan_in_fan_out .* not supported"),
            ("targets", {"target_modules": ["k_proj"]}, tensors, "not in target_modules"),
            ("nan", {}, nan, f"{key}' must hold finite floats"),
            ("lora", {"use_dora": False}, tensors, "lora_magnitude_vector' is not a lora key"),
            ("listed", {"peft_type": ["LORA"]}, tensors, "peft_type is 'LORA' or 'VERA'"),
            ("regex", {"target_modules": "(q_proj"}, tensors, "target_modules is no regular ex")]:
        directory = tmp_path / name
        directory.mkdir()
        adapter_files.safetensors_io.save_file(nan if tensors_change is nan else tensors,
                                               str(directory / adapter_files.TENSOR_FILE))
        (directory / adapter_files.CONFIG_FILE).write_text(json.dumps({**config, **config_change}))
        with pytest.raises(ValueError, match=match):
            adapters.read_adapter(directory)


def test_saves_are_atomic_per_file_and_an_interrupted_save_is_detected(tmp_path):
    """A save writes the tensors, then the config, each by rename. Killed between the two, the
    directory holds new tensors beside the old config: config_sha256 refuses that pairing. An
    interrupted save's temporary files are removed by the next save there."""
    first, second = tmp_path / "first", tmp_path / "second"
    adapters.save_adapter(trained("lora", seed=1), first)
    adapters.save_adapter(lora.apply_lora(make_gpt(), PEFT_TARGETS, r=2, seed=0), second)
    new_tensors = (second / adapter_files.TENSOR_FILE).read_bytes()
    (first / adapter_files.TENSOR_FILE).write_bytes(new_tensors)  # killed before the config
    with pytest.raises(ValueError, match="config_sha256 differs.*interrupted"):
        adapters.read_adapter(first)
    (first / ".tmp-abc123").write_bytes(b"half a file")
    model = trained("lora", seed=2)
    adapters.save_adapter(model, first)
    assert sorted(os.listdir(first)) == [adapter_files.CONFIG_FILE, adapter_files.TENSOR_FILE]
    again = adapters.apply_saved_adapter(make_gpt(), first)
    assert_same(again(tokens())[0], model(tokens())[0], "logits loaded after the recovered save")


def test_apply_saved_adapter_refuses_targets_without_tensors_and_leaves_the_model(tmp_path):
    adapters.save_adapter(trained("lora"), tmp_path)
    config_path = tmp_path / adapter_files.CONFIG_FILE
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, target_modules=["q_proj", "k_proj", "v_proj",
                                                                   "up_proj", "down_proj"])))
    tensors, metadata = adapter_files.safetensors_io.load_file(str(tmp_path /
                                                                   adapter_files.TENSOR_FILE))
    metadata.pop("config_sha256")  # as a PEFT file: no pairing check
    adapter_files.safetensors_io.save_file(tensors, str(tmp_path / adapter_files.TENSOR_FILE),
                                           metadata)
    model = make_gpt()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="target_modules names 'blocks.0.attn.k_proj' but the "
                                         "file holds no tensors for it"):
        adapters.apply_saved_adapter(model, tmp_path)
    assert not adapters.adapter_layers(model)
    assert [p.requires_grad for p in model.parameters()] == flags
