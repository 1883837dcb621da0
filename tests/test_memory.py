"""Tests for training/memory.py: the bytes a QLoRA run stores, counted from the tensors, against
the counts worked out from the shapes by hand."""
import pytest
import torch

import adapters
import qlora
from test_qlora import expected_nf4_bytes, make_gpt, tokens
from training import memory


@pytest.mark.parametrize("n_embd", [16, 32, 64, 128])
@pytest.mark.parametrize("double_quant", [True, False])
def test_bits_per_parameter_for_the_tiny_gpt_shapes(n_embd, double_quant):
    """4.5 bits without double quantization; with it 4 + 8/64 + 32/(64·256) = 4.127 for a large
    tensor, plus 32/n for each tensor's float32 offset, plus the unused part of a partial nested
    block when the 64 n_embd² / 64 blocks of a layer are not a multiple of 256 (n_embd < 128)."""
    model = qlora.quantize_model(make_gpt(0, n_layer=1, n_embd=n_embd), double_quant=double_quant)
    layers = [m for m in model.modules() if isinstance(m, qlora.NF4Linear)]
    assert len(layers) == 6
    for layer in layers:
        n = layer.in_features * layer.out_features
        assert layer.quantized_weight.nbytes == expected_nf4_bytes(n, 64, double_quant)
    report = memory.qlora_memory_report(model)
    n_total = 4 * n_embd ** 2 + 2 * 4 * n_embd ** 2
    assert report["quantized_parameters"] == n_total
    bits = report["bits_per_parameter"]
    assert bits == 8 * sum(expected_nf4_bytes(m.in_features * m.out_features, 64, double_quant)
                           for m in layers) / n_total
    if not double_quant:
        assert bits == 4.5
    elif n_embd == 128:  # every layer holds whole nested blocks: only the offsets add to 4.127
        assert bits == 4 + 8 / 64 + 32 / (64 * 256) + 6 * 32 / n_total  # 4.1279
        assert round(4 + 8 / 64 + 32 / (64 * 256), 3) == 4.127 and bits - 4.127 < 1e-3
    else:
        assert bits > 4 + 8 / 64 + 32 / (64 * 256)


def test_memory_report_counts_every_byte():
    """One block of the default width (128): every figure from shapes, and the total equals the
    bytes of all parameters, buffers, gradients and optimizer moments."""
    C, r, V = 128, 8, 13
    model, optimizer = qlora.prepare_qlora(make_gpt(0, n_layer=1, n_embd=C, vocab_size=V), r=r,
                                           compute_dtype=torch.float32, seed=0)
    empty = memory.qlora_memory_report(model, optimizer)
    assert empty["gradients"] == 0 and empty["optimizer_state"] == 0
    _, loss = model(tokens(0, V), tokens(0, V))
    loss.backward()
    optimizer.step()
    report = memory.qlora_memory_report(model, optimizer)
    n = 12 * C * C  # q, k, v, o: C², up and down: 4 C²
    adapter_bytes = 4 * r * (4 * 2 * C + 2 * 5 * C)  # float32 A and B, r·(in + out) per layer
    assert report["nf4_weights"] == n // 2
    # codes, nested absmax, offset: 4 layers of C² weights, 2 of 4 C²
    assert report["nf4_statistics"] == (4 * (256 + 4 + 4) + 2 * (1024 + 16 + 4))
    assert report["adapters"] == adapter_bytes and report["gradients"] == adapter_bytes
    assert report["optimizer_state"] == 2 * adapter_bytes == report["optimizer_state_on_device"]
    # tok_emb, pos_emb (block_size 16), 3 norms (weight, bias), biases of q k v o up down, lm_head
    dense_other = 4 * (V * C + 16 * C + 3 * 2 * C + (4 * C + 4 * C + C) + V * C)
    # + the 16-byte nf4_format records + the adapter layers' own buffers (bookkeeping such as a
    # merged flag, not adapter weights)
    bookkeeping = 6 * 16 + sum(t.nbytes for layer in adapters.adapter_layers(model).values()
                               for t in layer.buffers(recurse=False))
    assert report["other_weights"] == dense_other + bookkeeping
    everything = sum(t.nbytes for t in list(model.parameters()) + list(model.buffers()))
    # + gradients + two moments
    assert report["total"] == everything + adapter_bytes + 2 * adapter_bytes
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        dense = memory.dense_weight_bytes(model, dtype)
        assert dense["quantized_layers"] == size * n
        assert dense["base_model"] == size * (n + dense_other // 4)
    dense_bytes = memory.dense_weight_bytes(model, torch.float32)["quantized_layers"]
    ratio = (report["nf4_weights"] + report["nf4_statistics"]) / dense_bytes
    assert ratio == report["bits_per_parameter"] / 32 and abs(ratio - 4.127 / 32) < 0.001 / 32
