"""Tests for oracle_kit/references.py: the registry names the plain references of the concept
modules, called directly; the tolerances follow the sum of absolute terms; raw_bits sees bits.
"""
import importlib

import pytest
import torch

from oracle_kit import contracts, references

CONCEPT_MODULES = {"nf4", "lora", "dora", "vera", "paged_optim"}


@pytest.mark.parametrize("contract", sorted(references.REFERENCES))
def test_each_contract_names_its_reference_in_a_concept_module(contract):
    module_name, name = references.FUNCTIONS[contract].split(".")
    assert module_name in CONCEPT_MODULES, references.FUNCTIONS[contract]
    module = importlib.import_module(module_name)
    assert getattr(module, name) is references.REFERENCES[contract]


def test_every_contract_has_its_cases_and_the_adapters_their_arguments():
    from oracle_kit import cases
    assert set(references.REFERENCES) == set(cases.STRATEGIES) == set(cases.EXAMPLES)
    assert set(references.REFERENCES) == set(cases.GOLDEN)
    assert set(references.ADAPTER_ARGS) == set(references.TRAINED)
    for contract, trained in references.TRAINED.items():
        assert set(trained) <= set(references.ADAPTER_ARGS[contract])


def test_the_tolerance_scales_with_the_absolute_terms_not_the_cancelled_result():
    # y = x w + s x a b = 1 - 1 = 0 exactly; its sum of absolute terms is 2
    one = torch.ones(1, 1)
    inputs = {"x": torch.ones(1), "weight": one, "bias": None, "A": one, "B": -one,
              "scaling": 1.0, "grad_out": torch.ones(1)}
    expected = references.expected_outputs("lora_forward", inputs)
    assert expected["y"].dtype == torch.float64 and expected["y"].tolist() == [0.0]
    atol = references.adapter_tolerances("lora_forward", inputs, expected)
    assert atol["y"] == references.TOLERANCE[torch.float32] * 2.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_raw_bits_tell_negative_zero_from_zero_and_nothing_else_apart(dtype):
    values = torch.tensor([0.0, -0.0, 1.0, -2.5], dtype=dtype)
    bits = contracts.raw_bits(values)
    assert bits.dtype == torch.int64 and bits.shape == (4,)
    assert len(set(bits.tolist())) == 4
    assert contracts.raw_bits(values.clone()).equal(bits)


def test_raw_bits_of_bytes_are_the_bytes():
    packed = torch.tensor([[0, 255], [16, 1]], dtype=torch.uint8)
    assert contracts.raw_bits(packed).tolist() == [0, 255, 16, 1]
