"""train.py: the corpus, batches, checkpoints (atomic, config-checked) and bit-exact resume."""
import dataclasses
import os

import pytest
import torch

import adapters
import lora
import train
from tiny_gpt import GPT, GPTConfig

QUICK = train.TrainConfig(**train.QUICK)


def test_vocab_has_unk_first_and_unknown_characters_map_to_it():
    vocab = train.build_vocab("banana")
    assert vocab == train.UNK + "abn"
    ids, unknown = train.encode("nab\u03c3a!", vocab)
    assert ids.tolist() == [3, 1, 2, 0, 1, 0] and unknown == 2


def test_corpora_are_deterministic_and_split_by_position():
    text = train.pretraining_text()
    vocab = train.build_vocab(text)
    a, b = train.make_corpus(text, vocab), train.make_corpus(text, vocab)
    assert a.fingerprint == b.fingerprint and a.unknown == 0
    assert len(a.train) + len(a.val) == len(text)
    assert abs(len(a.val) / len(text) - train.VAL_FRACTION) < 1e-3
    fine = train.make_corpus(train.finetuning_text(), vocab)
    decoded = "".join(vocab[i] for i in fine.train[:20000].tolist())
    assert decoded.startswith("# ---- textwrap.py") and "def " in decoded


def test_get_batch_targets_are_inputs_shifted_by_one():
    data = torch.arange(1000)
    x, y = train.get_batch(data, 4, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8)
    assert torch.equal(y, x + 1)  # data[i] = i, so the next token is the id plus one


def test_checkpoint_of_another_config_fails_clearly(tmp_path):
    model = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8))
    path = str(tmp_path / "c.pt")
    adapters.atomic_save({"model": model.state_dict(), "model_config": model.config.to_dict()}, path)
    same = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8),
               generator=torch.Generator().manual_seed(9))
    train.load_checkpoint(path, same)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))
    other = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=2, n_head=2, n_embd=8))
    with pytest.raises(ValueError, match="model config"):
        train.load_checkpoint(path, other)


class Crash(Exception):
    pass


def run_steps(tmp_path, crash_at=None, resume=False, optimizer="adamw"):
    cfg = QUICK
    model = train.build_model(cfg, 11, "cpu")
    opt = train.make_optimizer(model, optimizer, 1e-2, 0 if optimizer == "paged_adamw" else None)
    data = torch.arange(3000) % 11

    def callback(step):
        if step == crash_at:
            raise Crash

    train.train_loop(model, opt, data, cfg, 25, 1e-2, 5, str(tmp_path / "run.pt"), "test", resume,
                     "cpu", callback)
    return model


@pytest.mark.parametrize("optimizer", ["adamw", "paged_adamw"])
def test_resumed_run_reaches_the_same_weights_bit_for_bit(tmp_path, optimizer):
    straight = run_steps(tmp_path / "a", optimizer=optimizer)
    with pytest.raises(Crash):  # checkpoints every 10 steps: the crash at 17 loses 7 steps
        run_steps(tmp_path / "b", crash_at=17, optimizer=optimizer)
    assert torch.load(tmp_path / "b" / "run.pt", weights_only=True)["step"] == 10
    resumed = run_steps(tmp_path / "b", resume=True, optimizer=optimizer)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_main_quick_runs_every_method_and_writes_adapters(tmp_path, capsys):
    rows = train.main(["--quick", "--out", str(tmp_path)])
    assert [r["method"] for r in rows] == list(train.METHODS)
    table = capsys.readouterr().out
    for method in train.METHODS:
        assert method in table
        assert os.path.getsize(tmp_path / f"adapter-{method}.pt") > 0
    by = {r["method"]: r for r in rows}
    cfg = QUICK
    C, L = cfg.n_embd, cfg.n_layer
    per_block = 4 * (C + C) + (C + 4 * C) + (4 * C + C)  # q,k,v,o + up + down: sum of in + out
    assert by["lora"]["trainable"] == 8 * per_block * L
    assert by["dora"]["trainable"] == 8 * per_block * L + L * (4 * C + C + 4 * C)  # + out per layer
    r_vera = train.METHOD_DEFAULTS["vera"]["rank"]
    assert by["vera"]["trainable"] == L * 6 * r_vera + L * (4 * C + C + 4 * C)  # Σ (r + out) over layers
    assert by["full"]["trainable_fraction"] == 1.0
    assert by["lora"]["adapter_bytes"] < by["full"]["adapter_bytes"]
    # The cached base model is reused by a second run with the same config and seed.
    train.main(["--quick", "--out", str(tmp_path), "--method", "lora"])
    assert "reusing the pretrained base model" in capsys.readouterr().err


def test_qlora_with_half_the_state_as_budget_pages_and_gives_the_same_weights(tmp_path):
    out = str(tmp_path)
    [free] = train.main(["--quick", "--out", out, "--method", "qlora"])
    unpaged = torch.load(tmp_path / "adapter-qlora.pt", weights_only=True)
    assert free["paging"]["page_outs"] == 0  # no budget: nothing ever leaves the device
    half = free["trainable"] * 4 * 2 // 2  # float32 exp_avg and exp_avg_sq: 8 bytes a parameter
    [paged] = train.main(["--quick", "--out", out, "--method", "qlora", "--budget", str(half)])
    assert paged["paging"]["page_outs"] > 0 and paged["paging"]["page_ins"] > 0
    assert paged["paging"]["peak_resident_bytes"] <= max(half, 0) + max(
        p.numel() for p in unpaged.values()) * 8  # the rule: budget, or one parameter's state if larger
    again = torch.load(tmp_path / "adapter-qlora.pt", weights_only=True)
    assert unpaged.keys() == again.keys()
    for key in unpaged:
        assert torch.equal(unpaged[key], again[key]), key
    assert json_rows(tmp_path)[0]["method"] == "qlora"


def json_rows(path):
    import json
    with open(path / "results.json") as f:
        return json.load(f)


def test_resume_from_a_run_of_another_config_fails_clearly(tmp_path):
    with pytest.raises(Crash):
        run_steps(tmp_path, crash_at=12)
    other = dataclasses.replace(QUICK, batch_size=QUICK.batch_size + 1)
    model = train.build_model(other, 11, "cpu")
    opt = train.make_optimizer(model, "adamw", 1e-2, None)
    with pytest.raises(ValueError, match="cannot resume"):
        train.train_loop(model, opt, torch.arange(3000) % 11, other, 25, 1e-2, 5,
                         str(tmp_path / "run.pt"), "test", True, "cpu")


@pytest.mark.parametrize("optimizer,budget", [("adamw", None), ("paged_adamw", 0)])
def test_training_memory_counts_weights_gradients_and_state_wherever_it_lies(optimizer, budget):
    model = lora.apply_lora(train.build_model(QUICK, 11, "cpu"), r=4, alpha=8.0, seed=0)
    opt = train.make_optimizer(model, optimizer, 1e-2, budget)
    x = torch.arange(QUICK.block_size)[None] % 11
    model(x, x)[1].backward()
    opt.step()
    trainable = adapters.count_trainable(model)
    memory = train.training_memory(model, opt)
    weights = sum(p.numel() for p in model.parameters()) * 4  # float32, no buffers in a LoRA GPT
    # budget 0 pages every moment out to the host after the step: it still counts
    assert memory == dict(weights=weights, grads=4 * trainable, optimizer=2 * 4 * trainable,
                          total=weights + 12 * trainable)
