"""Tests for papers/qlora_experiments.py: qlora-dtypes' error figures against an independent float64
computation, its fake-quantized NF4 base against qlora.NF4Linear, the device account, and both
experiments at the tiny size (the JSON's fields; the paged run's losses equal the unpaged run's).

Tolerances: the error figures rtol 1e-5: the experiment rounds s = w / c and code * c to float32
(2^-24 relative each), the reference does not, and a value within ~1e-7 of a midpoint may take the
other code; everything else is compared exactly.
"""
import math

import pytest
import torch

import experiments
import qlora
from papers import four_bit, runner
from papers import qlora_experiments as qe
from tiny_gpt import GPT, GPTConfig


def reference_error(w: torch.Tensor, code: torch.Tensor, blocksize: int) -> dict:
    """Blockwise absmax in float64, the nearest code by argmin |s - q| (no midpoints), errors in
    float64: written apart from nf4.py's and four_bit.py's routes."""
    flat = w.reshape(-1).double()
    pad = (-flat.numel()) % blocksize
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, blocksize)
    c = blocks.abs().amax(dim=1, keepdim=True)  # (nblocks, 1)
    s = blocks / torch.where(c > 0, c, 1.0)
    nearest = code.double()[(s[..., None] - code.double()).abs().argmin(dim=-1)]
    error = (blocks - nearest * c).reshape(-1)[: flat.numel()]
    return dict(mse=float(error.square().mean()), mae=float(error.abs().mean()))


CODES = {"nf4": lambda: qe.nf4.nf4_code(), "fp4": four_bit.fp4_code,
         "int4": lambda: four_bit.int4_code()[[n for n in range(16) if n != 8]]}


@pytest.mark.parametrize("dtype", qe.DTYPES)
def test_error_figures_match_an_independent_float64_computation(dtype):
    generator = torch.Generator().manual_seed(3)
    normal = torch.randn(2**14 + 37, generator=generator)  # a partial last block too
    weights = [torch.randn(48, 32, generator=generator) * 0.02,
               torch.randn(100, generator=generator)]
    got = qe.quantization_error([normal], dtype)
    expected = reference_error(normal, CODES[dtype](), qe.BLOCKSIZE)
    for key in ("mse", "mae"):
        assert math.isclose(got[key], expected[key], rel_tol=1e-5), (key, got, expected)
    got = qe.quantization_error(weights, dtype)
    errors = [reference_error(w, CODES[dtype](), qe.BLOCKSIZE) for w in weights]
    counts = [w.numel() for w in weights]
    for key in ("mse", "mae"):  # the tensors' errors pooled over all their values
        pooled = sum(e[key] * n for e, n in zip(errors, counts)) / sum(counts)
        assert math.isclose(got[key], pooled, rel_tol=1e-5), (key, got[key], pooled)


def tiny_model():
    config = GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=32)
    return GPT(config, generator=torch.Generator().manual_seed(0))


def test_fake_quantized_nf4_base_equals_nf4linear():
    """quantized_copy(model, "nf4") computes what qlora.NF4Linear (float32 compute, no double
    quantization) computes, bit for bit: the frozen dense weight is the dequantized NF4 one."""
    model = tiny_model()
    x = torch.randint(20, (3, 8), generator=torch.Generator().manual_seed(1))
    real = qlora.quantize_model(qe.copy.deepcopy(model), blocksize=qe.BLOCKSIZE,
                                double_quant=False, compute_dtype=torch.float32)
    fake = qe.quantized_copy(model, "nf4")
    assert torch.equal(fake(x, x)[1], real(x, x)[1])
    assert not torch.equal(fake(x, x)[1], model(x, x)[1])  # it did quantize


def test_bits_per_parameter_from_the_stored_tensors():
    model = tiny_model()
    n = sum(w.numel() for w in qe.linear_weights(model).values())  # 6 linears, 12,288 weights
    plain = qe.bits_per_parameter(model, double_quant=False)
    assert plain["parameters"] == n and plain["bits"] == 4 + 32 / 64  # whole blocks, even counts
    nested = qe.bits_per_parameter(model, double_quant=True)
    # per tensor: 8-bit codes for its scales, a float32 nested absmax per (started) 256 scales
    # and a float32 offset
    scales = sum(w.numel() // 64 * 8 + 32 * (-(-w.numel() // 64 // 256) + 1)
                 for w in qe.linear_weights(model).values())
    assert nested["scale_bits"] == scales / n


def test_device_account_counts_saved_activations_not_weights():
    layer = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(layer.parameters())
    account = qe.DeviceAccount(layer, optimizer, None)
    assert account.fixed == 2 * (12 + 3) * 4  # weights and their gradients, float32
    x = torch.randn(5, 4)
    account.start_forward(5)
    with torch.autograd.graph.saved_tensors_hooks(account.pack, lambda t: t):
        y = torch.relu(layer(x))  # saves x (for the weight's gradient) and relu's output
    assert account.activations == x.nbytes + y.nbytes


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("experiments"))  # one pretrained base for both
    return {e.name: runner.run_experiment(e, "tiny", range(2), out, log=lambda line: None)
            for e in qe.EXPERIMENTS}


def test_qlora_dtypes_tiny_json(tiny_runs):
    result = tiny_runs["qlora-dtypes"]["result"]
    assert set(result["errors"]) == {"normal", "weights"}
    for sample in result["errors"].values():
        assert set(sample) == {"nf4", "fp4", "int4"}
        assert all(set(v) == {"mse", "mae"} and v["mse"] > 0 for v in sample.values())
    assert set(result["quantized_val_loss"]) == {"float32", "bfloat16", "nf4", "fp4", "int4"}
    assert all(len(v["values"]) == 2 for v in result["finetuned_val_loss"].values())
    assert result["bits"]["no_double_quant"]["bits"] == 4.5
    assert result["bits"]["double_quant"]["bits"] < 4.5


def test_paged_spike_tiny_json_and_bit_equal_losses(tiny_runs):
    result = tiny_runs["paged-spike"]["result"]
    paged, unpaged = result["paged"]["steps"], result["unpaged"]["steps"]
    assert len(paged) == len(unpaged) == runner.SIZES["tiny"].steps
    assert [r["loss"] for r in paged] == [r["loss"] for r in unpaged]  # bit for bit (floats)
    assert result["losses_bit_equal"] and result["weights_bit_equal"]
    spikes = [i + 1 for i, r in enumerate(unpaged) if r["batch_size"] > unpaged[0]["batch_size"]]
    assert spikes and result["unpaged"]["over_budget_steps"] == spikes
    assert result["paged"]["over_budget_steps"] == []
    assert max(r["peak"] for r in paged) <= result["budget"]
    for i, row in enumerate(paged, 1):  # traffic at the spikes only, and everything back after
        assert (row["bytes_out"] > 0) == (i in spikes) and row["bytes_in"] == row["bytes_out"]
        assert row["resident_after"] == result["optimizer_state"]


@pytest.mark.parametrize("argv", [["qlora-dtypes", "--seeds", "0"], ["paged-spike", "--quick",
                                                                     "--seeds", "x"]])
def test_bad_flags_are_one_line_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        experiments.main(argv)
    assert exit_info.value.code != 0
    assert "Traceback" not in capsys.readouterr().err
