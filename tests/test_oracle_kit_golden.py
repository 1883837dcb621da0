"""Tests for oracle_kit/golden.py: `python oracle.py golden DIR` and `verify DIR`.

The golden files must round-trip through `verify`, fail it when a byte or the manifest changes,
hold bitsandbytes' bytes for NF4, and load with the `safetensors` package.
"""
import json
import os
import runpy
import shutil
import sys

import pytest
import torch

import nf4
import oracle_kit.golden
from assertions import assert_same
from formats import safetensors_io
from test_oracle import ROOT, plain_quantize


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("golden"))
    assert oracle_kit.golden.main(["golden", directory]) == 0
    with open(os.path.join(directory, "manifest.json"), encoding="utf-8") as file:
        return directory, json.load(file)["cases"]


def test_golden_files_cover_the_contracts_and_verify(golden, capsys):
    directory, cases = golden
    nf4_cases = [c for c in cases if c["function"] == "nf4.quantize_nf4"]
    assert len(nf4_cases) >= 20
    assert {c["args"]["blocksize"] for c in nf4_cases} == set(nf4.ALLOWED_BLOCKSIZES)
    assert {c["case"]["dtype"] for c in nf4_cases} == {"float32", "float16", "bfloat16"}
    assert {"nf4_ties", "dynamic_ties", "zero_blocks"} <= {c["case"]["values"] for c in nf4_cases}
    assert any(c["case"]["rows"] * c["case"]["cols"] % 2 for c in nf4_cases)  # odd counts
    for c in nf4_cases:
        assert c["inputs"] == ["w"] and set(c["args"]) == {"blocksize", "double_quant"}
        assert c["outputs"] == ["packed", "absmax"] + ["nested_absmax", "offset"] * \
            c["args"]["double_quant"]
    functions = {c["function"] for c in cases}
    assert {"nf4.dequantize_nf4", "lora.lora_forward", "dora.dora_forward", "vera.vera_forward",
            "paged_optim.adamw_step"} <= functions
    lora_case = next(c for c in cases if c["function"] == "lora.lora_forward")
    assert set(lora_case["outputs"]) == set(lora_case["atol"]) == {"y", "grad_x", "grad_A",
                                                                   "grad_B"}
    tensors, metadata = safetensors_io.load_file(os.path.join(directory, lora_case["file"]))
    assert "grad_out" in tensors and json.loads(metadata["args"]) == lora_case["args"]
    adamw_case = next(c for c in cases if c["function"] == "paged_optim.adamw_step")
    adamw_tensors, _ = safetensors_io.load_file(os.path.join(directory, adamw_case["file"]))
    assert adamw_tensors["grads"].shape[0] > 1  # several steps
    assert oracle_kit.golden.main(["verify", directory]) == 0
    assert capsys.readouterr().out.strip().endswith("every case matches the reference")


def test_a_changed_byte_makes_verify_fail_naming_the_case(golden, tmp_path, capsys):
    directory = str(tmp_path / "golden")
    shutil.copytree(golden[0], directory)
    damaged, resaved = "nf4_quantize_03.safetensors", "nf4_quantize_05.safetensors"
    path = os.path.join(directory, damaged)
    with open(path, "r+b") as file:  # one bit of the last data byte
        file.seek(-1, os.SEEK_END)
        last = file.read(1)[0]
        file.seek(-1, os.SEEK_END)
        file.write(bytes([last ^ 1]))
    tensors, metadata = safetensors_io.load_file(os.path.join(directory, resaved))
    tensors["packed"][3] ^= 0x10  # a valid file with a wrong byte: only recomputing finds it
    metadata.pop(safetensors_io.CHECKSUM_KEY, None)
    safetensors_io.save_file(tensors, os.path.join(directory, resaved), metadata)
    assert oracle_kit.golden.main(["verify", directory]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out if line.startswith("DIFFERS")] == \
        [f"DIFFERS {damaged}", f"DIFFERS {resaved}"]
    assert "packed differs from the reference at element 3" in out[1]
    assert out[-1] == "2 case(s) differ"


def test_an_edited_or_damaged_manifest_makes_verify_fail(golden, tmp_path, capsys):
    directory = str(tmp_path / "golden")
    shutil.copytree(golden[0], directory)
    path = os.path.join(directory, "manifest.json")
    with open(path, encoding="utf-8") as file:
        manifest = json.load(file)
    entry = next(e for e in manifest["cases"] if e.get("atol"))
    name = next(iter(entry["atol"]))
    entry["atol"][name] *= 2  # a looser tolerance: every file still matches the reference
    with open(path, "w", encoding="utf-8") as file:
        json.dump(manifest, file)
    assert oracle_kit.golden.main(["verify", directory]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("DIFFERS manifest.json: cases_sha256 differs (edited or damaged); run "
                      "golden again") and out[-1] == "1 case(s) differ"
    with open(path, "w", encoding="utf-8") as file:
        file.write('{"cases": [')  # cut short
    assert oracle_kit.golden.main(["verify", directory]) == 1
    assert "manifest.json: unreadable (" in (out := capsys.readouterr().out) and \
        "manifest.json: not valid JSON (Expecting value" in out


def test_command_line_errors_are_one_line_and_status_2(tmp_path, capsys, monkeypatch):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("x")
    for argv in ([], ["golden"], ["check", str(tmp_path)], ["verify", str(tmp_path)],
                 ["golden", str(not_a_directory)], ["verify", str(tmp_path), "more"]):
        assert oracle_kit.golden.main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    monkeypatch.setattr(sys, "argv", ["oracle.py", "verify"])  # `python oracle.py verify`
    with pytest.raises(SystemExit) as exit_status:
        runpy.run_path(os.path.join(ROOT, "oracle.py"), run_name="__main__")
    assert exit_status.value.code == 2
    assert capsys.readouterr().err.startswith("oracle.py: expected a command")


def test_golden_nf4_files_hold_bitsandbytes_bytes(golden):
    bnb = pytest.importorskip("bitsandbytes")
    directory, cases = golden
    dynamic = nf4.dynamic_code().double()
    for case in (c for c in cases if c["function"] == "nf4.quantize_nf4"):
        tensors, _ = safetensors_io.load_file(os.path.join(directory, case["file"]))
        double_quant = case["args"]["double_quant"]
        packed, state = bnb.functional.quantize_4bit(
            tensors["w"], blocksize=case["args"]["blocksize"], quant_type="nf4",
            compress_statistics=double_quant)
        theirs = f"{case['file']} vs bitsandbytes"
        assert_same(tensors["packed"], packed.reshape(-1), f"packed NF4 bytes, {theirs}",
                    blocksize=case["args"]["blocksize"] // 2)  # two 4-bit codes a byte
        if not double_quant:
            assert_same(tensors["absmax"], state.absmax, f"absmax, {theirs}")
            continue
        assert_same(tensors["offset"], state.offset, f"offset, {theirs}")
        assert_same(tensors["nested_absmax"], state.state2.absmax, f"nested_absmax, {theirs}")
        # bitsandbytes' CPU path picks the 8-bit code through a 65,536-bin table, not always the
        # nearest one: ours must be at least as near to each scale, so compare the distances
        scales = plain_quantize(tensors["w"], case["args"]["blocksize"], False)["absmax"]
        nested = tensors["nested_absmax"].double().repeat_interleave(256)[: scales.numel()]
        target = (scales.double() - tensors["offset"].double()) / nested.clamp(min=1e-38)
        ours = (dynamic[tensors["absmax"].long()] - target).abs()
        theirs = (dynamic[state.absmax.long()] - target).abs()
        assert bool((ours <= theirs + 2.0**-22).all()), case["file"]


def test_golden_files_load_with_the_safetensors_package(golden):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    directory, cases = golden
    for case in cases:
        path = os.path.join(directory, case["file"])
        theirs = safetensors_torch.load_file(path)
        ours, _ = safetensors_io.load_file(path)
        assert set(theirs) == set(ours) == set(case["inputs"]) | set(case["outputs"])
        for name, tensor in ours.items():
            assert tensor.dtype == theirs[name].dtype and tensor.shape == theirs[name].shape
            assert_same(tensor.view(-1).view(torch.uint8), theirs[name].view(-1).view(torch.uint8),
                        f"bytes of {name} in {case['file']}, ours vs the safetensors package")
