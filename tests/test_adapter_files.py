"""Tests for formats/adapter_files.py: adapter directories in PEFT's format, saved and loaded by
us, by PEFT 0.21.2 and by the `safetensors` package (the oracles), and every refusal.

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

import adapters
import dora
import lora
import vera
from assertions import assert_same
from formats import adapter_files
from test_adapters import (
    BUILDERS,
    PEFT_TARGETS,
    assert_logits_close,
    linear_names,
    make_gpt,
    randomize_adapters,
    tokens,
    trained,
)
from test_safetensors_io import dead_pid
from tiny_gpt import GPT


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


# --------------------------------------------------------------------------------------------------
# In memory: a SavedAdapter kept to switch adapters is checked on each load.

def test_an_edited_saved_adapter_in_memory_is_checked_again_and_leaves_the_model_alone():
    """read_adapter's SavedAdapter can be kept to switch adapters without reading files again;
    if it is edited before load_adapter, the edit is checked like a file's."""
    model, source = trained("lora"), trained("lora", seed=3)
    good, before = adapter_files.saved_adapter(source), adapters.adapter_state_dict(model)
    key = "base_model.model.blocks.1.mlp.up_proj.lora_B.weight"
    for tensors, config, error, match in [
            (dict(good.tensors, **{key: torch.full((64, 4), float("nan"))}), {}, ValueError,
             f"{key}' must hold finite floats"),
            (dict(good.tensors, **{key: torch.zeros(3, 3)}), {}, ValueError, "shape"),
            (good.tensors, {"lora_alpha": 32.0}, ValueError, "lora_alpha is 32.0 in the file"),
            (good.tensors, {"use_rslora": "yes"}, TypeError, "use_rslora must be a bool")]:
        edited = dataclasses.replace(good, tensors=tensors, config={**good.config, **config})
        with pytest.raises(error, match=match):
            adapter_files.load_adapter(model, edited)
    for k, v in adapters.adapter_state_dict(model).items():
        assert_same(v, before[k], f"{k} after the refused loads")
    adapter_files.load_adapter(model, good)
    assert_same(model(tokens())[0], source(tokens())[0], "logits after loading the good one")


# --------------------------------------------------------------------------------------------------
# Directories: our files, read back by us, by PEFT and by the safetensors package.

@pytest.mark.parametrize("method", list(BUILDERS))
def test_our_directory_loads_in_peft_with_the_same_logits(peft, method, tmp_path):
    base, idx = make_gpt(), tokens()
    model = trained(method, base=base)
    adapter_files.save_adapter(model, tmp_path / method)
    assert sorted(os.listdir(tmp_path / method)) == [adapter_files.CONFIG_FILE,
                                                     adapter_files.TENSOR_FILE]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / method).eval()
    assert_logits_close(theirs(idx)[0], model(idx)[0])
    ours = adapter_files.apply_saved_adapter(copy.deepcopy(base), tmp_path / method)
    assert_same(ours(idx)[0], model(idx)[0], f"{method} logits after our own round trip")


def test_our_safetensors_file_is_read_by_the_safetensors_package(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open
    model = trained("vera")
    adapter_files.save_adapter(model, tmp_path)
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
    ours = adapter_files.apply_saved_adapter(copy.deepcopy(base), tmp_path)
    assert list(adapters.adapter_layers(ours)) == linear_names(base, PEFT_TARGETS)
    assert_logits_close(ours(idx)[0], theirs(idx)[0])


def test_peft_all_linear_regex_targets_and_saved_projections_load(peft, tmp_path):
    """PEFT writes "all-linear" out as the list of names it adapted (lm_head included on a plain
    module); a config may also say "all-linear" or give a regular expression; VeRA files may carry
    the matrices (save_projection), which must then equal the ones the seed draws here."""
    base, idx = make_gpt(), tokens()
    theirs = peft_directory(peft, "lora", base, tmp_path / "all", all_linear=True)
    ours = adapter_files.apply_saved_adapter(copy.deepcopy(base), tmp_path / "all")
    assert "lm_head" in adapters.adapter_layers(ours)
    assert_logits_close(ours(idx)[0], theirs(idx)[0])
    config_path = tmp_path / "all" / adapter_files.CONFIG_FILE
    for targets in ("all-linear", r"(blocks\.\d\.(attn|mlp)\.\w+_proj|lm_head)"):
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps(dict(config, target_modules=targets)))
        ours = adapter_files.apply_saved_adapter(copy.deepcopy(base), tmp_path / "all")
        assert_logits_close(ours(idx)[0], theirs(idx)[0])
    theirs = peft_directory(peft, "vera", base, tmp_path / "proj", save_projection=True)
    ours = adapter_files.apply_saved_adapter(copy.deepcopy(base), tmp_path / "proj")
    assert_logits_close(ours(idx)[0], theirs(idx)[0])


def test_qlora_adapters_save_and_load_over_the_same_nf4_base_only(tmp_path):
    qlora = pytest.importorskip("qlora")
    model = lora.apply_lora(qlora.quantize_model(make_gpt(), compute_dtype=torch.float32), r=4)
    randomize_adapters(model, 3)
    adapter_files.save_adapter(model, tmp_path)
    assert adapter_files.read_adapter(tmp_path).metadata["base_layer_type"] == "NF4Linear"
    again = adapter_files.apply_saved_adapter(
        qlora.quantize_model(make_gpt(), compute_dtype=torch.float32), tmp_path)
    assert_same(again(tokens())[0], model(tokens())[0], "QLoRA logits after save and load")
    plain = make_gpt()
    with pytest.raises(ValueError, match="base_layer_type is 'NF4Linear' in the file but "
                                         "'Linear' in the model"):
        adapter_files.apply_saved_adapter(plain, tmp_path)
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
    adapter_files.save_adapter(trained("lora"), tmp_path)
    model = other()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match) as error:
        adapter_files.load_adapter(model, tmp_path)
    assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)
    for k, v in model.state_dict().items():
        assert_same(v, before[k], f"{k} after the refused load")


def test_shapes_and_the_base_are_checked_and_check_base_can_be_waived(tmp_path):
    adapter_files.save_adapter(trained("lora"), tmp_path)
    wide = lora.apply_lora(make_gpt(n_embd=32), PEFT_TARGETS, r=4, alpha=8.0)
    with pytest.raises(ValueError, match=r"the shape of base_model.model.blocks.0.attn.q_proj."
                                         r"lora_A.weight is \(4, 16\) in the file but \(4, 32\)"):
        adapter_files.load_adapter(wide, tmp_path, check_base=False)
    other_base = lora.apply_lora(make_gpt(seed=9), PEFT_TARGETS, r=4, alpha=8.0)
    adapter_files.load_adapter(other_base, tmp_path, check_base=False)  # the caller vouches for it
    assert adapter_files.base_fingerprint(make_gpt()) == \
        adapter_files.base_fingerprint(trained("lora"))  # adapters are not part of the base


def test_merged_plain_and_adapted_models_are_refused_where_they_do_not_fit(tmp_path):
    model = trained("lora")
    adapter_files.save_adapter(model, tmp_path)
    model.blocks[0].attn.q_proj.merge()
    for call in (adapter_files.save_adapter, adapter_files.load_adapter):
        with pytest.raises(ValueError, match="unmerge"):
            call(model, tmp_path)
    with pytest.raises(ValueError, match="no adapter layers to load into"):
        adapter_files.load_adapter(make_gpt(), tmp_path)
    with pytest.raises(ValueError, match="already carries adapters"):
        adapter_files.apply_saved_adapter(model, tmp_path)


def test_bad_files_are_one_line_errors_naming_the_file(tmp_path):
    good = tmp_path / "good"
    adapter_files.save_adapter(trained("dora"), good)
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
            adapter_files.read_adapter(directory)
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
            adapter_files.read_adapter(directory)


def test_saves_are_atomic_per_file_and_an_interrupted_save_is_detected(tmp_path):
    """A save writes the tensors, then the config, each by rename. Killed between the two, the
    directory holds new tensors beside the old config: config_sha256 refuses that pairing. An
    interrupted save's temporary files are removed by the next save there."""
    first, second = tmp_path / "first", tmp_path / "second"
    adapter_files.save_adapter(trained("lora", seed=1), first)
    adapter_files.save_adapter(lora.apply_lora(make_gpt(), PEFT_TARGETS, r=2, seed=0), second)
    new_tensors = (second / adapter_files.TENSOR_FILE).read_bytes()
    (first / adapter_files.TENSOR_FILE).write_bytes(new_tensors)  # killed before the config
    with pytest.raises(ValueError, match="config_sha256 differs.*interrupted"):
        adapter_files.read_adapter(first)
    (first / f".tmp-{dead_pid()}-abc12345").write_bytes(b"half a file")
    model = trained("lora", seed=2)
    adapter_files.save_adapter(model, first)
    assert sorted(os.listdir(first)) == [adapter_files.CONFIG_FILE, adapter_files.TENSOR_FILE]
    again = adapter_files.apply_saved_adapter(make_gpt(), first)
    assert_same(again(tokens())[0], model(tokens())[0], "logits loaded after the recovered save")


def test_apply_saved_adapter_refuses_targets_without_tensors_and_leaves_the_model(tmp_path):
    adapter_files.save_adapter(trained("lora"), tmp_path)
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
        adapter_files.apply_saved_adapter(model, tmp_path)
    assert not adapters.adapter_layers(model)
    assert [p.requires_grad for p in model.parameters()] == flags
