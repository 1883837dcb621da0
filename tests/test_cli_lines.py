"""The round-2 WEAK list: every failure of a file, folder or flag of train.py and sample.py is one
line naming it, with a non-zero exit; Ctrl-C says how to go on; run.json names only its own
folder's files and a vocabulary that fits its model."""
import errno
import json
import os
import shutil

import pytest

import sample
import train
from formats import adapter_files, safetensors_io
from training import runs

TINY = ["--quick", "--pretrain-steps", "1", "--steps", "1"]


def cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        status = train.cli(argv)
    except SystemExit as exit:  # a flag error (argparse)
        status = exit.code
    err = capsys.readouterr().err.strip()
    return status, err.splitlines()[-1] if err else ""


def sample_line(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        sample.main(argv)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return exit.value.code, err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny") / "run")
    assert train.cli([*TINY, "--out", folder, "--method", "lora,dora"]) == 0
    return folder


def test_ctrl_c_says_how_to_resume_and_exits_130(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "train_loop", interrupted)
    status, line = cli([*TINY, "--out", str(tmp_path / "run"), "--method", "lora"], capsys)
    assert status == 130 and line.startswith("train.py: interrupted; resume with --resume")


def test_a_run_folder_deleted_mid_run_stops_in_one_line_and_is_not_recreated(tmp_path, capsys,
                                                                             monkeypatch):
    folder = tmp_path / "run"
    original = train.train_loop

    def then_delete(*args, **kwargs):
        result = original(*args, **kwargs)
        if args[11] == "lora":  # the label: after fine-tuning, before the weights are saved
            shutil.rmtree(folder)
        return result
    monkeypatch.setattr(train, "train_loop", then_delete)
    status, line = cli([*TINY, "--out", str(folder), "--method", "lora"], capsys)
    assert status == 1 and f"the run folder {folder} disappeared" in line
    assert not folder.exists()


@pytest.mark.parametrize("name", ["run.json", "results.json", "finetune-lora.pt"])
def test_a_directory_or_fifo_where_a_run_file_belongs_is_one_line(tiny_run, tmp_path, capsys,
                                                                  name):
    for make in (os.mkdir, os.mkfifo):
        folder = str(tmp_path / make.__name__)
        shutil.copytree(tiny_run, folder)
        os.remove(os.path.join(folder, name))
        make(os.path.join(folder, name))
        status, line = cli([*TINY, "--out", folder, "--method", "lora", "--resume"], capsys)
        assert status == 1 and line.startswith(f"train.py: {os.path.join(folder, name)}: is a"), \
            line


def test_a_full_disk_names_the_file(tmp_path, capsys, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors_io, "_test_delay", full)
    status, line = cli([*TINY, "--out", str(tmp_path / "run"), "--method", "lora"], capsys)
    assert status == 1 and line.startswith(f"train.py: cannot read or write {tmp_path / 'run'}")
    assert line.endswith(": No space left on device")


@pytest.mark.parametrize("out", ["x" * 300, "/proc/no-such-run"])
def test_an_out_that_cannot_be_made_is_one_line(tmp_path, capsys, out, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, line = cli([*TINY, "--out", out, "--method", "lora"], capsys)
    assert status == 2 and line.startswith("train.py: argument --out:")


def test_sample_bounds_tokens_and_temperature(tiny_run, capsys):
    status, line = sample_line(["--out", tiny_run, "--tokens", str(10**9)], capsys)
    assert status == 2 and f"[1, {sample.MAX_TOKENS}]" in line and "--tokens" in line
    status, line = sample_line(["--out", tiny_run, "--temperature", "1e-300"], capsys)
    assert status == 2 and "--temperature" in line and "0.001" in line


def rewrite_run(folder, change) -> None:
    path = os.path.join(folder, "run.json")
    run = runs.read_json(path)
    change(run)
    runs.write_json(path, run)  # a recomputed SHA-256: anyone can


def test_sample_refuses_another_methods_weights_and_a_short_vocabulary(tiny_run, tmp_path,
                                                                       capsys):
    folder = str(tmp_path / "run")
    shutil.copytree(tiny_run, folder)
    rewrite_run(folder, lambda run: run["lora"].update(weights="adapter-dora"))
    status, line = sample_line(["--out", folder, "--method", "lora"], capsys)
    assert status == 1 and "lora's weights are 'adapter-dora'" in line
    rewrite_run(folder, lambda run: run["lora"].update(weights="../other/adapter-lora"))
    assert sample_line(["--out", folder, "--method", "lora"], capsys)[0] == 1
    rewrite_run(folder, lambda run: run["lora"].update(weights="adapter-lora"))
    shutil.rmtree(os.path.join(folder, "adapter-lora"))
    shutil.copytree(os.path.join(folder, "adapter-dora"), os.path.join(folder, "adapter-lora"))
    status, line = sample_line(["--out", folder, "--method", "lora"], capsys)
    assert status == 1 and "holds a dora adapter, not lora's" in line
    rewrite_run(folder, lambda run: run["dora"]["base"].update(vocab=run["dora"]["base"][
        "vocab"][:-1]))
    status, line = sample_line(["--out", folder, "--method", "dora"], capsys)
    assert status == 1 and "dora's vocabulary has" in line


def test_sample_with_use_rslora_as_a_string_is_one_line(tiny_run, tmp_path, capsys):
    folder = str(tmp_path / "run")
    shutil.copytree(tiny_run, folder)
    adapter = os.path.join(folder, "adapter-lora")
    config_path = os.path.join(adapter, adapter_files.CONFIG_FILE)
    with open(config_path) as file:
        config = json.load(file)
    with open(config_path, "w") as file:
        json.dump(dict(config, use_rslora="false"), file)
    tensor_path = os.path.join(adapter, adapter_files.TENSOR_FILE)
    tensors, metadata = safetensors_io.load_file(tensor_path)
    metadata.pop("config_sha256")  # a PEFT-style config: no pairing check
    safetensors_io.save_file(tensors, tensor_path, metadata)
    status, line = sample_line(["--out", folder, "--method", "lora"], capsys)
    assert status == 1 and "use_rslora must be a bool" in line
