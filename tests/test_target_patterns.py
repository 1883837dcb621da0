"""formats.target_patterns.check_target_pattern: a downloaded adapter's target_modules regular
expression is matched in bounded time: the shapes that backtrack exponentially are refused in one
line, before any name is matched; ordinary PEFT patterns still select the layers they name."""
import json
import time

import pytest

import lora
from formats import adapter_files, safetensors_io, target_patterns
from test_adapters import make_gpt

NAME = "blocks.0.attn.q_projx"  # our 20-character layer names (the probe's), plus one


@pytest.mark.parametrize("pattern, shape", [
    ("(.|.|.)*x", "alternation inside a repeat"),  # ran past 60 s before
    ("(.|.)*x", "alternation inside a repeat"),  # took 1 s
    ("(a|aa)+$", "alternation inside a repeat"),
    ("(a+)+x", "repeat inside a repeat"),
    (r"(\w+\.)*q_proj", "repeat inside a repeat"),
    ("(?:(?:a*)b?)*", "repeat inside a repeat"),
    (r"(a)\1", "back-reference"),
    (".*.*.*.*x", "4 repeats"),
])
def test_catastrophic_patterns_are_refused_fast_naming_the_shape(pattern, shape):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=shape):
        target_patterns.check_target_pattern(pattern, "target_modules")
    with pytest.raises(ValueError, match=shape):
        adapter_files.matches_targets(NAME, pattern)
    assert time.perf_counter() - start < 0.5


def test_a_downloaded_config_with_such_a_pattern_is_refused_before_matching(tmp_path):
    adapter_files.save_adapter(lora.apply_lora(make_gpt(), ["q_proj"], r=2, seed=0), tmp_path)
    config_path = tmp_path / adapter_files.CONFIG_FILE
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, target_modules="(.|.|.)*x")))
    tensor_path = str(tmp_path / adapter_files.TENSOR_FILE)
    tensors, metadata = safetensors_io.load_file(tensor_path)
    metadata.pop("config_sha256")  # as a downloaded PEFT adapter: no pairing check
    safetensors_io.save_file(tensors, tensor_path, metadata)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"adapter_config.json: target_modules '\(\.\|\.\|\.\)\*x' "
                                         r"has an alternation inside a repeat"):
        adapter_files.apply_saved_adapter(make_gpt(), tmp_path)
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize("pattern, matches", [
    (r".*\.(q_proj|v_proj)", ["blocks.0.attn.q_proj", "blocks.3.attn.v_proj"]),
    (r".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$", ["decoder.1.SelfAttention.q"]),
    (r"model\.layers\.\d+\.self_attn\.(q|v)_proj", ["model.layers.12.self_attn.v_proj"]),
    (r"blocks\.[0-9]+\.attn\.q_proj", ["blocks.10.attn.q_proj"]),
    (r".*(q|k|v)_proj", ["blocks.0.attn.k_proj"]),
])
def test_ordinary_peft_patterns_still_match_what_they_name(pattern, matches):
    assert target_patterns.check_target_pattern(pattern, "target_modules") == pattern
    for name in matches:
        assert adapter_files.matches_targets(name, pattern)
    assert not adapter_files.matches_targets("blocks.0.mlp.up_proj", pattern)


def test_the_worst_allowed_pattern_stays_fast_on_long_names():
    """Three repeats over everything, the most the check allows, on a 200-character name that
    fails at the end: polynomial backtracking, ~n^4/24 steps, milliseconds."""
    pattern = ".*.*.*x"
    target_patterns.check_target_pattern(pattern, "target_modules")
    start = time.perf_counter()
    assert not adapter_files.matches_targets("a" * 200, pattern)
    assert time.perf_counter() - start < 0.5


def test_an_over_long_pattern_and_an_invalid_one_are_one_line():
    with pytest.raises(ValueError, match="of 1001 characters; at most 1000"):
        target_patterns.check_target_pattern("a" * 1001, "target_modules")
    with pytest.raises(ValueError, match="is no regular expression"):
        target_patterns.check_target_pattern("(", "target_modules")
