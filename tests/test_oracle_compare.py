"""Tests for `python oracle.py compare` (oracle_kit/golden.py), the port contracts
(oracle_kit/contracts.py) and the golden files' independence from the CPU build.

A port's outputs written as candidate files meet the contract; every golden case is rejected by
at least one planted mistake; the escapes of issue 22 are caught by the checkers and by compare;
a numpy-only port (tests/numpy_port.py, docs/oracle.md's worked example) passes compare without
importing torch; the golden files are the same bytes under ATEN_CPU_CAPABILITY=default.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import dora
import lora
import nf4
import oracle
import paged_optim
import vera
from formats import safetensors_io
from oracle_kit import contracts, golden, references
from test_oracle import (
    ROOT,
    adamw,
    plain_dequantize,
    plain_lora,
    plain_quantize,
    plain_vera,
    variant,
)

REFERENCE = {"nf4_quantize": nf4.quantize_nf4, "nf4_dequantize": nf4.dequantize_nf4,
             "lora_forward": lora.lora_forward, "dora_forward": dora.dora_forward,
             "vera_forward": vera.vera_forward, "adamw_step": paged_optim.adamw_step}


def float32_adamw(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay,
                  fold_decay=False):
    """AdamW as a float32 port writes it: float32 hyperparameters (1.0f - 0.999f), bias
    corrections on the moments, a correctly rounded sqrt; fold_decay: Algorithm 2's
    theta - lr (lambda theta + m_hat / (sqrt(v_hat) + eps))."""
    def f32(value):
        return torch.tensor(value, dtype=torch.float32)
    one, beta1, beta2 = f32(1.0), f32(betas[0]), f32(betas[1])
    lr, eps, weight_decay = f32(lr), f32(eps), f32(weight_decay)
    if not fold_decay:
        param.mul_(one - lr * weight_decay)
    exp_avg.mul_(beta1).add_((one - beta1) * grad)
    exp_avg_sq.mul_(beta2).add_((one - beta2) * grad * grad)
    m_hat, v_hat = exp_avg / (one - beta1**step), exp_avg_sq / (one - beta2**step)
    update = m_hat / (v_hat.double().sqrt().float() + eps)  # sqrt correctly rounded
    param.sub_(lr * (weight_decay * param + update) if fold_decay else lr * update)


def bfloat16_state(param, grad, exp_avg, exp_avg_sq, *args):
    paged_optim.adamw_step(param, grad, exp_avg, exp_avg_sq, *args)
    exp_avg.copy_(exp_avg.bfloat16())
    exp_avg_sq.copy_(exp_avg_sq.bfloat16())


def no_bias_correction(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - betas[0])
    exp_avg_sq.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    param.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps), value=-lr)


def swapped_betas(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    paged_optim.adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, betas[::-1], eps,
                           weight_decay)


# Planted mistakes per contract: each golden case must fail at least one.
MISTAKES = {
    "nf4_quantize": [variant(plain_quantize, divide_partial=False),
                     variant(plain_quantize, high_first=False),
                     variant(plain_quantize, absmax_dtype=torch.bfloat16),
                     variant(plain_quantize, nested_blocksize=512),
                     variant(plain_quantize, offset=lambda absmax: absmax.max() / 2)],
    "nf4_dequantize": [variant(plain_dequantize, high_first=False),
                       variant(plain_dequantize, offset=False),
                       variant(plain_dequantize, nested_modulo=True),
                       lambda q, dtype: plain_dequantize(q, dtype, multiply_dtype=dtype)],
    "lora_forward": [variant(plain_lora, forget_scaling=True),
                     variant(plain_lora, detach_x=True)],
    "dora_forward": [lambda *args: lora.lora_forward(*args[:5], args[6])],
    "vera_forward": [variant(plain_vera, drop_lambda_b=True)],
    "adamw_step": [variant(adamw, eps_inside=True), variant(adamw, l2=True), bfloat16_state,
                   no_bias_correction, swapped_betas],
}
# The escapes issue 22 found: bugs that every check used to pass.
ESCAPES = [
    ("nf4_quantize", variant(plain_quantize, nested_blocksize=512)),
    ("nf4_quantize", variant(plain_quantize, nested_divide_partial=False)),
    ("nf4_dequantize", variant(plain_dequantize, nested_blocksize=512)),
    ("nf4_dequantize", variant(plain_dequantize, nested_modulo=True)),
    ("lora_forward", variant(plain_lora, in_base_dtype=True)),
    ("vera_forward", variant(plain_vera, in_base_dtype=True)),
]


@pytest.fixture(scope="module")
def golden_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("golden"))
    golden.write_golden(directory)
    with open(os.path.join(directory, "manifest.json"), encoding="utf-8") as file:
        return directory, json.load(file)["cases"]


def write_candidates(golden_dir, out, functions: dict) -> None:
    """Run functions[contract] on each golden case's inputs; write its outputs as a port would."""
    directory, cases = golden_dir
    os.makedirs(out, exist_ok=True)
    for entry in cases:
        contract = golden.CONTRACTS[entry["function"]]
        if contract not in functions:
            continue
        tensors, _ = safetensors_io.load_file(os.path.join(directory, entry["file"]))
        inputs = golden.inputs_from_file(contract, {k: tensors[k] for k in entry["inputs"]},
                                         entry["args"])
        try:
            outputs = references.run_contract(contract, functions[contract], inputs)
        except Exception:  # a mistake that crashes here writes nothing: compare reports it
            continue
        safetensors_io.save_file({k: v.detach().contiguous() for k, v in outputs.items()
                                  if v is not None},
                                 os.path.join(out, entry["file"]))


def differing(golden_dir, candidates, only=None) -> set:
    lines, _ = golden.compare_golden(golden_dir[0], candidates, only)
    return {line.split()[1].rstrip(":") for line in lines if line.startswith("DIFFERS")}


def test_the_references_and_float32_ports_meet_the_contract(golden_dir, tmp_path, capsys):
    candidates = str(tmp_path / "candidates")
    write_candidates(golden_dir, candidates, REFERENCE)
    assert golden.main(["compare", golden_dir[0], candidates]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "every case meets the contract"
    assert len([line for line in out if line.startswith("MATCHES")]) == len(golden_dir[1])
    for port in (float32_adamw, variant(float32_adamw, fold_decay=True)):
        write_candidates(golden_dir, candidates, {"adamw_step": port})
        assert not differing(golden_dir, candidates)
        oracle.check_adamw_step(port, examples=5, exact=False)
        with pytest.raises(AssertionError, match=r"call \d of \d \(step \d+\) is the first"):
            oracle.check_adamw_step(port, examples=0)  # not torch's bits


def test_a_missing_or_unreadable_candidate_is_a_failure_naming_it(golden_dir, tmp_path, capsys):
    candidates = str(tmp_path / "candidates")
    write_candidates(golden_dir, candidates, REFERENCE)
    missing, damaged = golden_dir[1][0]["file"], golden_dir[1][1]["file"]
    os.remove(os.path.join(candidates, missing))
    with open(os.path.join(candidates, damaged), "wb") as file:
        file.write(b"\x10\x00")
    assert golden.main(["compare", golden_dir[0], candidates]) == 1
    out = capsys.readouterr().out
    assert f"DIFFERS {missing}: no candidate file {os.path.join(candidates, missing)}" in out
    assert f"DIFFERS {damaged}: candidate file {os.path.join(candidates, damaged)} unreadable" \
        in out
    assert out.strip().endswith("2 case(s) break the contract")


def test_compare_reports_the_first_difference_with_index_block_values_and_ulps(golden_dir,
                                                                               tmp_path, capsys):
    candidates = str(tmp_path / "candidates")
    wrong = variant(plain_quantize, nested_divide_partial=False)
    write_candidates(golden_dir, candidates, {"nf4_quantize": wrong})
    assert golden.main(["compare", golden_dir[0], candidates, "--only", "nf4.quantize_nf4"]) == 1
    out = capsys.readouterr().out
    assert "absmax differs at block 5" in out and "(nested block 2): expected 0x" in out
    assert "(expected from the candidate's own offset)" in out
    write_candidates(golden_dir, candidates, {"lora_forward": variant(plain_lora,
                                                                      in_base_dtype=True)})
    assert golden.main(["compare", golden_dir[0], candidates, "--only", "lora.lora_forward"]) == 1
    out = capsys.readouterr().out
    assert "grad_A differs at index (" in out and "float32 ulps apart: |difference|" in out


@pytest.mark.parametrize("contract", sorted(MISTAKES))
def test_every_golden_case_is_rejected_by_a_planted_mistake(golden_dir, tmp_path, contract):
    function = references.FUNCTIONS[contract]
    files = {e["file"] for e in golden_dir[1] if e["function"] == function}
    rejected = set()
    for i, mistake in enumerate(MISTAKES[contract]):
        candidates = str(tmp_path / f"mistake{i}")
        write_candidates(golden_dir, candidates, {contract: mistake})
        rejected |= differing(golden_dir, candidates, function)
    assert rejected == files, sorted(files - rejected)


@pytest.mark.parametrize("contract, wrong", ESCAPES, ids=lambda v: getattr(v, "__name__", v))
def test_the_escapes_are_caught_by_the_checker_and_by_compare(golden_dir, tmp_path, contract,
                                                               wrong):
    with pytest.raises(AssertionError, match="differs"):
        getattr(oracle, f"check_{contract}")(wrong, examples=0)
    candidates = str(tmp_path / "candidates")
    write_candidates(golden_dir, candidates, {contract: wrong})
    assert differing(golden_dir, candidates, references.FUNCTIONS[contract])


def test_the_offset_tolerance_accepts_any_summation_order_and_not_a_wrong_count():
    scales = torch.rand(700, generator=torch.Generator().manual_seed(1)) * 3
    mean = contracts.correctly_rounded_mean(scales)
    ulps = contracts.offset_tolerance_ulps(scales.numel())
    assert ulps == 702
    for order in (scales, scales.flip(0), scales.sort().values):
        naive = torch.zeros((), dtype=torch.float32)
        for value in order:  # the worst order a port might write: a running float32 sum
            naive = naive + value
        assert abs((naive / 700).item() - mean) <= ulps * contracts.ulp_float32(mean)
    off_by_one = (scales.double().sum() / 699).float().item()
    assert abs(off_by_one - mean) > 10 * ulps * contracts.ulp_float32(mean)
    assert contracts.round_float32(contracts.Fraction(1, 3)) == torch.tensor(1 / 3).item()


def test_a_numpy_port_meets_the_contract(golden_dir, tmp_path):
    candidates = str(tmp_path / "numpy")
    port = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "numpy_port.py"),
                           golden_dir[0], candidates], capture_output=True, text=True)
    assert port.returncode == 0, port.stderr  # it asserts that torch was never imported
    compare = subprocess.run([sys.executable, os.path.join(ROOT, "oracle.py"), "compare",
                              golden_dir[0], candidates, "--only", "nf4.quantize_nf4"],
                             capture_output=True, text=True, cwd=ROOT)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    assert compare.stdout.strip().endswith("every case meets the contract")
    # np.mean is not torch's order: some offsets differ from the golden ones, and still pass
    entries = [e for e in golden_dir[1]
               if e["function"] == "nf4.quantize_nf4" and e["args"]["double_quant"]]
    theirs = [safetensors_io.load_file(os.path.join(candidates, e["file"]))[0] for e in entries]
    ours = [safetensors_io.load_file(os.path.join(golden_dir[0], e["file"]))[0] for e in entries]
    assert any(a["offset"] != b["offset"] for a, b in zip(theirs, ours))


def test_golden_files_and_tables_are_the_same_bytes_under_the_default_cpu_capability(golden_dir,
                                                                                     tmp_path):
    directory = str(tmp_path / "default")
    script = ("import sys, torch; from oracle_kit import golden; "
              "golden.write_golden(sys.argv[1]); print(torch.backends.cpu.get_cpu_capability())")
    run = subprocess.run([sys.executable, "-c", script, directory], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "ATEN_CPU_CAPABILITY": "default"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-1] == "DEFAULT"
    names = sorted(os.listdir(golden_dir[0]))
    assert names == sorted(os.listdir(directory))
    for name in names:
        with open(os.path.join(golden_dir[0], name), "rb") as a, \
                open(os.path.join(directory, name), "rb") as b:
            assert a.read() == b.read(), name


def test_the_docs_numpy_port_is_the_tested_code():
    with open(os.path.join(ROOT, "docs", "oracle.md"), encoding="utf-8") as file:
        docs = file.read()
    block = docs.split("## A port end to end, in numpy alone", 1)[1].split("```python\n")[1]
    block = block.split("```", 1)[0]
    with open(os.path.join(ROOT, "tests", "numpy_port.py"), encoding="utf-8") as file:
        assert block.strip() and block in file.read()
