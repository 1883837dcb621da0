"""sample.py: text from a run folder, reproducible; what train.py prints is what sample.py prints;
missing or damaged files and bad flags are one line each."""
import os

import pytest
import torch

import sample
import train
from assertions import assert_same
from test_train import copy_of_quick_run, flip_byte, one_line, quick_run
from training import runs

METHODS = ("base",) + train.METHODS


def run_sample(argv, capsys) -> tuple[int, str, str]:
    """sample.main's exit status (0 when it returns), stdout and stderr."""
    capsys.readouterr()
    try:
        sample.main(argv)
        status = 0
    except SystemExit as exit:
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


def printed_samples(stdout: str) -> dict[str, str]:
    """The samples train.py printed after its table: {method: text}."""
    blocks = stdout.split("\n--- ")[1:]
    return {block.split("\n", 1)[0]: block.split("\n", 1)[1].rstrip("\n") for block in blocks}


def test_sample_prints_what_train_printed_for_every_method(capsys):
    folder, _, stdout = quick_run()
    printed = printed_samples(stdout)
    assert list(printed) == list(METHODS)
    for method in METHODS:
        status, out, _ = run_sample(["--out", folder, "--method", method, "--tokens", "80"], capsys)
        assert status == 0 and out == printed[method] + "\n", method
        assert out.startswith("def ") and len(out) == len("def ") + 80 + 1


def test_same_seed_same_text_other_seed_other_text(capsys):
    folder = quick_run()[0]
    argv = ["--out", folder, "--method", "lora", "--prompt", "class ", "--tokens", "60",
            "--temperature", "0.8", "--top-k", "20"]
    first, second = (run_sample(argv + ["--seed", "7"], capsys)[1] for _ in range(2))
    assert first == second and first.startswith("class ")
    assert run_sample(argv + ["--seed", "8"], capsys)[1] != first


def test_sampling_runs_torch_on_one_thread(capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    run_sample(["--out", quick_run()[0], "--method", "base", "--tokens", "5"], capsys)
    assert calls == [1]


def test_the_loaded_model_is_the_trained_one_bit_for_bit():
    folder, _, _ = quick_run()
    model, vocab = runs.load_model(folder, "dora")
    assert not model.training and len(vocab) == model.config.vocab_size
    for name, tensor in model.state_dict().items():
        assert torch.isfinite(tensor).all() if tensor.is_floating_point() else True, name
    saved = runs.read_checkpoint(os.path.join(folder, "finetune-dora.pt"))["model"]
    state = model.state_dict()
    assert set(saved) == set(state)
    for key in saved:
        assert_same(state[key], saved[key], f"{key} loaded by runs.load_model vs the checkpoint")


def test_a_missing_run_or_method_says_which_command_makes_it(tmp_path, capsys):
    status, _, err = run_sample(["--out", str(tmp_path / "nothing"), "--method", "lora"], capsys)
    assert status == 2 and f"`python train.py --out {tmp_path / 'nothing'} --method lora`" in \
        one_line(err)
    folder = copy_of_quick_run(tmp_path, only_base=True)
    run = runs.read_json(os.path.join(quick_run()[0], "run.json"))
    runs.record(folder, "base", run["base"])
    status, _, err = run_sample(["--out", folder, "--method", "vera"], capsys)
    assert status == 2 and "holds no vera run" in one_line(err)
    assert f"python train.py --out {folder} --method vera" in err
    assert run_sample(["--out", folder, "--method", "base", "--tokens", "3"], capsys)[0] == 0
    os.remove(os.path.join(folder, next(n for n in os.listdir(folder) if n.startswith("base-"))))
    status, _, err = run_sample(["--out", folder, "--method", "base"], capsys)
    assert status == 2 and "is missing" in one_line(err)


@pytest.mark.parametrize("file,method", [("adapter-lora/adapter_model.safetensors", "lora"),
                                         ("adapter-vera/adapter_config.json", "vera"),
                                         ("full.safetensors", "full"), ("run.json", "qlora"),
                                         ("base", "dora")])
def test_a_flipped_byte_in_any_file_is_one_line_naming_it(tmp_path, capsys, file, method):
    folder = copy_of_quick_run(tmp_path)
    if file == "base":
        file = next(name for name in os.listdir(folder) if name.startswith("base-"))
    flip_byte(os.path.join(folder, file))
    status, out, err = run_sample(["--out", folder, "--method", method], capsys)
    line = one_line(err)
    assert status == 1 and out == ""
    assert os.path.basename(file) in line and "python train.py" in line


BAD_FLAGS = [(["--tokens", "0"], "--tokens"), (["--tokens", "x"], "--tokens"),
             (["--temperature", "0"], "--temperature"), (["--temperature", "nan"], "--temperature"),
             (["--top-k", "0"], "--top-k"), (["--top-k", "1000"], "--top-k"),
             (["--seed", "-1"], "--seed"), (["--seed", str(2**64)], "--seed"),
             (["--prompt", ""], "--prompt"), (["--method", "nope"], "--method"),
             (["--out", ""], "--out")]


@pytest.mark.parametrize("argv,flag", BAD_FLAGS)
def test_every_bad_flag_is_one_line_naming_it_with_exit_status_2(capsys, argv, flag):
    status, out, err = run_sample(["--out", quick_run()[0]] + argv, capsys)
    line = one_line(err)
    assert status == 2 and line.startswith("sample.py: ") and flag in line and out == ""
