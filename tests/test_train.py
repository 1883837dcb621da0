"""train.py: batches, the learning-rate schedule, resume (bit for bit, and refused for another
run), the stop at a non-finite loss, every flag checked when parsed, and the run folder one
`--quick` run leaves (shared by the tests that read it, test_sample.py and test_runs.py).
"""
import atexit
import contextlib
import dataclasses
import functools
import io
import json
import os
import shutil
import tempfile

import pytest
import torch

import adapters
import lora
import train
from assertions import assert_same
from formats import safetensors_io
from test_safetensors_io import dead_pid
from training import runs

QUICK = train.TrainConfig(**train.QUICK)


@functools.lru_cache(maxsize=None)
def quick_run() -> tuple[str, list, str]:
    """One `train.py --quick` of every method for the whole session: (folder, rows, stdout).
    Tests that change files work on a copy (copy_of_quick_run)."""
    folder = tempfile.mkdtemp(prefix="quick-run-")
    atexit.register(shutil.rmtree, folder, True)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        rows = train.main(["--quick", "--out", folder])
    return folder, rows, printed.getvalue()


def copy_of_quick_run(tmp_path, only_base: bool = False) -> str:
    """A private copy of the quick run's folder; `only_base`: just its pretrained base (a cache
    hit, so pretraining is skipped)."""
    folder = tmp_path / "run"
    source = quick_run()[0]
    if only_base:
        folder.mkdir()
        for name in os.listdir(source):
            if name.startswith("base-"):
                shutil.copy(os.path.join(source, name), folder / name)
    else:
        shutil.copytree(source, folder)
    return str(folder)


def run_main(argv, capsys) -> tuple[int, str]:
    """train.main's exit status (0 when it returns) and what it wrote to stderr."""
    capsys.readouterr()
    try:
        train.main(argv)
        status = 0
    except SystemExit as exit:
        status = exit.code
    return status, capsys.readouterr().err


def flip_byte(path: str, where: float = 0.5) -> None:
    """Change one byte, `where` of the way into the file (by default its middle)."""
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        index = int(len(data) * where)
        data[index] ^= 0x01
        f.seek(0)
        f.write(data)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text  # one line, no traceback
    return lines[0]


def error_line(text: str) -> str:
    """The one error line at the end of what a run wrote to stderr (after its progress lines)."""
    assert "Traceback" not in text, text
    errors = [line for line in text.strip().splitlines() if line.startswith("train.py: ")]
    assert len(errors) == 1 and text.strip().endswith(errors[0]), text
    return errors[0]


# ----------------------------------------------------------------------------------- schedule

def test_get_batch_targets_are_inputs_shifted_by_one():
    data = torch.arange(1000)
    x, y = train.get_batch(data, 4, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8)
    assert_same(y, x + 1, "targets (data[i] = i: the next token is the id plus one)")


def test_warm_up_reaches_the_peak_on_its_last_step_then_decays_to_a_tenth():
    peak, warmup, total = 3e-3, 30, 700
    lrs = [train.lr_at(step, total, peak, warmup) for step in range(total)]
    assert lrs[0] == peak / warmup  # step 0 already learns: peak * 1 / warmup, not 0
    assert lrs[warmup - 1] == peak  # the last warm-up step reaches the peak exactly
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup]))
    assert lrs[warmup] == peak  # the cosine starts at the peak ...
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))
    assert peak / 10 < lrs[-1] < peak / 10 * 1.001  # ... and ends just above a tenth of it
    assert train.lr_at(0, 10, peak, 0) == peak  # fine-tuning: no warm-up


def test_format_table_aligns_any_columns():
    columns = (("name", lambda r: r["name"], "<"), ("value", lambda r: f"{r['v']:.1f}", ">"))
    table = train.format_table([dict(name="a", v=1.0), dict(name="long", v=22.25)], columns)
    assert table.splitlines() == ["name  value", "----  -----", "a       1.0", "long   22.2"]


# ----------------------------------------------------------------------------------- the loop

class Crash(Exception):
    pass


def fine_tune_steps(folder, method, dropout, crash_at=None, resume=False):
    """train.py's fine-tuning path (prepare, optimizer, loop with checkpoints) on a tiny base: 12
    steps, checkpoints every 5; `crash_at` raises after that step, as a kill would stop it."""
    cfg = dataclasses.replace(QUICK, finetune_steps=12, checkpoint_every=5)
    folder.mkdir(exist_ok=True)  # train.py makes its run folder; checkpoints never do
    opts = train.method_options(method, train.build_parser().parse_args(
        [] if method == "full" else ["--dropout", str(dropout)]))
    model = train.prepare(method, train.build_model(cfg, 11, "cpu"), opts, cfg.seed)
    optimizer = train.make_optimizer(model, opts["optimizer"], opts["lr"], opts["budget"])

    def callback(step):
        if step == crash_at:
            raise Crash

    identity = dict(method=method, options=opts, train_config=dataclasses.asdict(cfg))
    train.train_loop(model, optimizer, torch.arange(3000) % 11, cfg, cfg.finetune_steps, opts["lr"],
                     0, str(folder / "ckpt.pt"), identity, resume, "cpu", method, callback)
    return model


RESUME_CASES = [(m, d) for m in train.METHODS for d in (0.0, 0.3) if not (m == "full" and d)]


@pytest.mark.parametrize("method,dropout", RESUME_CASES)
def test_resumed_run_reaches_the_same_weights_bit_for_bit(tmp_path, method, dropout):
    straight = fine_tune_steps(tmp_path / "a", method, dropout)
    torch.manual_seed(12345)  # whatever the process drew since: the checkpoint restores its own
    with pytest.raises(Crash):  # checkpoints at 5 and 10: the crash at 8 loses 3 steps
        fine_tune_steps(tmp_path / "b", method, dropout, crash_at=8)
    assert runs.read_checkpoint(str(tmp_path / "b" / "ckpt.pt"))["step"] == 5
    resumed = fine_tune_steps(tmp_path / "b", method, dropout, resume=True)
    resumed_state = resumed.state_dict()
    for name, tensor in straight.state_dict().items():
        assert_same(resumed_state[name], tensor, f"{name} resumed vs straight through")


@pytest.mark.parametrize("method", ["lora", "qlora", "dora", "vera"])
def test_dropout_reaches_every_adapter(method):
    args = train.build_parser().parse_args(["--dropout", "0.5"])
    model = train.prepare(method, train.build_model(QUICK, 11, "cpu"),
                          train.method_options(method, args), 0)
    with torch.no_grad():  # a fresh adapter adds zero whatever its input: make it add something
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(generator=torch.Generator().manual_seed(0))
    x = torch.arange(QUICK.block_size)[None] % 11
    model.train()
    assert not torch.equal(model(x)[0], model(x)[0])  # two dropout masks, two outputs
    model.eval()
    assert_same(model(x)[0], model(x)[0], "logits in eval mode (no dropout), second vs first")


def test_a_non_finite_loss_or_gradient_stops_the_loop_naming_the_step():
    model = train.build_model(QUICK, 11, "cpu")
    x = torch.arange(QUICK.block_size)[None] % 11
    _, loss = model(x, x)
    loss.backward()
    train.check_finite(model, loss, "lora", 3, 1e-2)  # finite: nothing happens
    next(model.parameters()).grad[0, 0] = float("nan")
    with pytest.raises(train.TrainingDiverged, match="gradient is not finite at step 3"):
        train.check_finite(model, loss, "lora", 3, 1e-2)
    with pytest.raises(train.TrainingDiverged, match="loss is not finite at step 7 .*--lr"):
        train.check_finite(model, torch.tensor(float("inf")), "lora", 7, 1e30)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_lr_1e30_exits_1_at_the_first_non_finite_step_and_saves_nothing(tmp_path, capsys, method):
    folder = copy_of_quick_run(tmp_path, only_base=True)
    status, err = run_main(["--quick", "--out", folder, "--method", method, "--lr", "1e30"], capsys)
    line = error_line(err)
    assert status == 1 and "is not finite at step" in line and "learning rate" in line
    assert not os.path.exists(os.path.join(folder, runs.weights_name(method)))
    # one step: only its update goes non-finite; caught before the checkpoint and the weights
    shutil.rmtree(folder)
    folder = copy_of_quick_run(tmp_path, only_base=True)  # the same path, empty but the base
    status, err = run_main(["--quick", "--out", folder, "--method", method, "--lr", "1e30",
                            "--steps", "1"], capsys)
    line = error_line(err)
    assert status == 1 and f"{method} validation: the loss is not finite at step 1" in line
    assert not os.path.exists(os.path.join(folder, runs.weights_name(method)))


@pytest.mark.parametrize("optimizer,budget", [("adamw", None), ("paged_adamw", 0)])
def test_training_memory_counts_weights_gradients_and_state_wherever_it_lies(optimizer, budget):
    model = lora.apply_lora(train.build_model(QUICK, 11, "cpu"), r=4, alpha=8.0, seed=0)
    opt = train.make_optimizer(model, optimizer, 1e-2, budget)
    x = torch.arange(QUICK.block_size)[None] % 11
    model(x, x)[1].backward()
    opt.step()
    trainable = adapters.count_trainable(model)
    memory = train.training_memory(model, opt)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    # budget 0 pages every moment out to the host after the step: it still counts
    assert memory == dict(weights=weights, grads=4 * trainable, optimizer=2 * 4 * trainable,
                          total=weights + 12 * trainable)


# --------------------------------------------------------------------------- the run folder

def test_quick_run_writes_each_method_in_peft_format_and_a_run_file():
    folder, rows, printed = quick_run()
    assert [r["method"] for r in rows] == list(train.METHODS)
    for method in train.METHODS:
        assert method in printed
        path = os.path.join(folder, runs.weights_name(method))
        if method != "full":
            assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors"]
            with open(os.path.join(path, "adapter_config.json")) as f:
                assert json.load(f)["peft_type"] == ("VERA" if method == "vera" else "LORA")
        assert rows[train.METHODS.index(method)]["adapter_bytes"] == runs.path_bytes(path)
    state, _ = safetensors_io.load_file(os.path.join(folder, "full.safetensors"))
    trained = runs.read_checkpoint(os.path.join(folder, "finetune-full.pt"))["model"]
    assert state.keys() == trained.keys()
    for k in state:
        assert_same(state[k], trained[k], f"{k} in full.safetensors vs the checkpoint")
    run = runs.read_json(os.path.join(folder, "run.json"))
    assert set(run) == {"base", *train.METHODS}
    assert run["lora"]["options"]["rank"] == 8 and run["qlora"]["options"]["quantization"] == \
        train.QUANTIZATION
    assert runs.read_json(os.path.join(folder, "results.json")) == json.loads(json.dumps(rows))
    by = {r["method"]: r for r in rows}
    C, L = QUICK.n_embd, QUICK.n_layer
    per_block = 4 * (C + C) + (C + 4 * C) + (4 * C + C)  # q,k,v,o + up + down: sum of in + out
    assert by["lora"]["trainable"] == 8 * per_block * L
    assert by["dora"]["trainable"] == 8 * per_block * L + L * (4 * C + C + 4 * C)  # + out each
    r_vera = train.METHOD_DEFAULTS["vera"]["rank"]
    assert by["vera"]["trainable"] == L * 6 * r_vera + L * (4 * C + C + 4 * C)  # Σ (r + out)
    assert by["full"]["trainable_fraction"] == 1.0
    assert by["lora"]["adapter_bytes"] < by["full"]["adapter_bytes"]


def test_a_rerun_replaces_its_own_row_and_keeps_the_others(tmp_path, capsys):
    folder = copy_of_quick_run(tmp_path)
    before = runs.read_json(os.path.join(folder, "results.json"))
    status, err = run_main(["--quick", "--out", folder, "--method", "full", "--steps", "3"], capsys)
    assert status == 0 and "reusing the pretrained base model" in err
    after = runs.read_json(os.path.join(folder, "results.json"))
    assert [r["method"] for r in after] == list(train.METHODS)
    assert after[1:] == before[1:] and after[0] != before[0]  # full's row is the new one
    assert set(runs.read_json(os.path.join(folder, "run.json"))) == {"base", *train.METHODS}


def test_corrupt_run_and_results_files_are_set_aside_and_started_afresh(tmp_path, capsys):
    folder = copy_of_quick_run(tmp_path)
    for name in ("run.json", "results.json"):
        flip_byte(os.path.join(folder, name), 0.9)
    status, err = run_main(["--quick", "--out", folder, "--method", "full", "--steps", "1"], capsys)
    assert status == 0 and err.count("set aside") == 2
    assert all(os.path.exists(os.path.join(folder, name + ".corrupt"))
               for name in ("run.json", "results.json"))
    assert set(runs.read_json(os.path.join(folder, "run.json"))) == {"base", "full"}
    assert [r["method"] for r in runs.read_json(os.path.join(folder, "results.json"))] == ["full"]


def test_stale_temporary_files_are_removed_on_the_next_run(tmp_path, capsys):
    folder = copy_of_quick_run(tmp_path, only_base=True)
    os.makedirs(os.path.join(folder, "adapter-lora"))
    gone = dead_pid()
    stale = [os.path.join(folder, f".tmp-{gone}-abc12345"),
             os.path.join(folder, "adapter-lora", f".tmp-{gone}-x1234567")]
    users = [os.path.join(folder, ".tmp-notes.txt"), os.path.join(folder, ".tmp-abc123.pt")]
    for path in stale + users:
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
    status, err = run_main(["--quick", "--out", folder, "--method", "full", "--steps", "1"], capsys)
    assert status == 0 and not any(os.path.exists(path) for path in stale)
    assert all(os.path.exists(path) for path in users)  # not atomic_write's names: kept
    assert "left by an interrupted save" in err


def test_a_corrupt_pretraining_cache_is_set_aside_and_built_again(tmp_path, capsys):
    folder = copy_of_quick_run(tmp_path, only_base=True)
    [name] = os.listdir(folder)
    original = runs.read_checkpoint(os.path.join(folder, name))["model"]
    flip_byte(os.path.join(folder, name))
    status, err = run_main(["--quick", "--out", folder, "--method", "full", "--steps", "1"], capsys)
    assert status == 0 and f"{name} does not match its SHA-256" in err and "set aside" in err
    assert os.path.exists(os.path.join(folder, name + ".corrupt"))
    rebuilt = runs.read_checkpoint(os.path.join(folder, name))["model"]
    for key in original:  # same seed, same bits
        assert_same(rebuilt[key], original[key], f"{key} rebuilt vs the original cache")


# ------------------------------------------------------------------------------------- resume

def test_resume_refuses_other_options_naming_each_with_both_values(tmp_path, capsys):
    folder = copy_of_quick_run(tmp_path)
    argv = ["--quick", "--out", folder, "--resume", "--method", "lora"]
    changed = ["--alpha", "32", "--dropout", "0.1", "--rslora", "--lr", "0.01", "--optimizer",
               "paged_adamw"]
    status, err = run_main(argv + changed, capsys)
    line = error_line(err)
    assert status == 1 and "finetune-lora.pt" in line
    for named in ("alpha 16.0 there, 32.0 here", "dropout 0.0 there, 0.1 here",
                  "rslora False there, True here", "lr 0.006 there, 0.01 here",
                  "optimizer 'adamw' there, 'paged_adamw' here"):
        assert named in line
    status, err = run_main(argv + ["--steps", "12"], capsys)
    assert status == 1 and "finetune_steps 10 there, 12 here" in error_line(err)
    status, err = run_main(argv + ["--rank", "4"], capsys)  # alpha follows: 2r
    assert status == 1 and "rank 8 there, 4 here" in err and "alpha 16.0 there, 8.0 here" in err
    status, err = run_main(argv[:-1] + ["qlora", "--budget", "64"], capsys)
    assert status == 1 and "budget None there, 64 here" in error_line(err)
    status, err = run_main(argv + ["--targets", "q_proj,v_proj"], capsys)
    assert status == 1 and "targets 'all-linear' there, ('q_proj', 'v_proj') here" in err


def test_resume_refuses_a_checkpoint_of_another_method_and_damaged_ones(tmp_path, capsys):
    folder = copy_of_quick_run(tmp_path)
    checkpoint = os.path.join(folder, "finetune-dora.pt")
    argv = ["--quick", "--out", folder, "--resume", "--method", "dora"]
    shutil.copy(os.path.join(folder, "finetune-lora.pt"), checkpoint)
    status, err = run_main(argv, capsys)
    assert status == 1 and "method 'lora' there, 'dora' here" in error_line(err)
    for damage in (flip_byte, lambda path: open(path, "wb").close()):
        shutil.copy(os.path.join(quick_run()[0], "finetune-dora.pt"), checkpoint)
        damage(checkpoint)
        status, err = run_main(argv, capsys)
        line = error_line(err)
        assert status == 1 and "finetune-dora.pt" in line and "delete it" in line
    os.remove(checkpoint)  # gone: --resume starts the method over
    assert run_main(argv, capsys)[0] == 0


def test_resume_of_a_finished_run_changes_nothing(tmp_path, capsys):
    folder = copy_of_quick_run(tmp_path)
    before = safetensors_io.load_file(os.path.join(folder, "adapter-vera",
                                                   "adapter_model.safetensors"))[0]
    [row] = train.main(["--quick", "--out", folder, "--resume", "--method", "vera"])
    assert row["ms_per_step"] is None  # no step left to run
    after = safetensors_io.load_file(os.path.join(folder, "adapter-vera",
                                                  "adapter_model.safetensors"))[0]
    assert before.keys() == after.keys()
    for k in before:
        assert_same(after[k], before[k], f"{k} after resuming a finished run")


def test_qlora_with_half_the_state_as_budget_pages_and_gives_the_same_weights(tmp_path, capsys):
    folder = copy_of_quick_run(tmp_path, only_base=True)
    tensors = os.path.join(folder, "adapter-qlora", "adapter_model.safetensors")
    [free] = train.main(["--quick", "--out", folder, "--method", "qlora"])
    unpaged = safetensors_io.load_file(tensors)[0]
    assert free["paging"]["page_outs"] == 0  # no budget: nothing ever leaves the device
    half = free["trainable"] * 4 * 2 // 2  # float32 exp_avg and exp_avg_sq: 8 bytes a parameter
    [paged] = train.main(["--quick", "--out", folder, "--method", "qlora", "--budget", str(half)])
    assert paged["paging"]["page_outs"] > 0 and paged["paging"]["page_ins"] > 0
    assert paged["paging"]["peak_resident_bytes"] <= half + max(
        p.numel() for p in unpaged.values()) * 8  # the rule: budget, or one parameter's state
    again = safetensors_io.load_file(tensors)[0]
    assert unpaged.keys() == again.keys()
    for key in unpaged:
        assert_same(again[key], unpaged[key], f"{key} trained paged vs unpaged")


# ------------------------------------------------------------------------------- command line

BAD_FLAGS = [
    (["--rank", "0"], "--rank"), (["--rank", "1.5"], "--rank"), (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"), (["--lr", "1e400"], "--lr"), (["--lr", "0"], "--lr"),
    (["--alpha", "-1"], "--alpha"), (["--dropout", "1.0"], "--dropout"),
    (["--dropout", "nan"], "--dropout"), (["--steps", "-1"], "--steps"),
    (["--steps", "0"], "--steps"),
    (["--pretrain-steps", "0"], "--pretrain-steps"), (["--seed", str(2**70)], "--seed"),
    (["--seed", "-1"], "--seed"), (["--budget", "-5"], "--budget"), (["--out", ""], "--out"),
    (["--method", "lora", "--targets", ""], "targets"),
    (["--method", "dora", "--targets", "q_proj,,v_proj"], "targets"),
    (["--method", "vera", "--targets", "attn"], "targets"),
    (["--method", "qlora", "--targets", "nothing_here"], "targets"),
    (["--method", "nope"], "--method"), (["--method", "lora,lora"], "--method"),
    (["--device", "tpu"], "--device"), (["--optimizer", "sgd"], "--optimizer"),
    (["--method", "full", "--rank", "4"], "--rank"),
    (["--method", "vera", "--alpha", "8"], "--alpha"),
    (["--method", "full", "--targets", "q_proj"], "--targets"),
    (["--method", "full", "--dropout", "0.1"], "--dropout"),
    (["--method", "vera", "--rslora"], "--rslora"),
    (["--method", "lora", "--budget", "9"], "--budget"),
    (["--bogus"], "--bogus"),
]


@pytest.mark.parametrize("argv,flag", BAD_FLAGS)
def test_every_bad_flag_is_one_line_naming_it_with_exit_status_2(tmp_path, capsys, argv, flag):
    status, err = run_main(["--quick", "--out", str(tmp_path)] + argv, capsys)
    line = one_line(err)
    assert status == 2 and line.startswith("train.py: ") and flag in line
    assert os.listdir(tmp_path) == []  # refused before anything was written


def test_out_naming_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    status, err = run_main(["--quick", "--out", str(tmp_path / "a_file")], capsys)
    assert status == 2 and "--out" in one_line(err) and "a file" in err
    # below a file, or in a folder it may not write: refused when parsed, not after pretraining
    status, err = run_main(["--quick", "--out", str(tmp_path / "a_file" / "run")], capsys)
    assert status == 2 and "--out" in one_line(err) and "a_file is a file" in err
    (tmp_path / "locked").mkdir(mode=0o500)
    if not os.access(tmp_path / "locked", os.W_OK):  # root may write anywhere
        status, err = run_main(["--quick", "--out", str(tmp_path / "locked" / "run")], capsys)
        assert status == 2 and "--out" in one_line(err) and "locked is not writable" in err


@pytest.mark.parametrize("method, entry", [("lora", "adapter-lora"), ("full", "full.safetensors")])
def test_an_entry_in_the_way_of_the_weights_is_refused_before_training(tmp_path, capsys, method,
                                                                       entry):
    (tmp_path / entry).mkdir() if method == "full" else (tmp_path / entry).write_text("")
    status, err = run_main(["--quick", "--out", str(tmp_path), "--method", method], capsys)
    assert status == 2 and f"{entry} is in the way" in one_line(err)
    assert sorted(os.listdir(tmp_path)) == [entry]  # nothing trained, nothing written


def test_cuda_on_a_machine_without_it_is_a_flag_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, err = run_main(["--quick", "--out", str(tmp_path), "--device", "cuda"], capsys)
    assert status == 2 and "--device: CUDA is not available" in one_line(err)


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"),
                                     (3 * 2**20 // 2, "1.5 MiB"), (2**30, "1.0 GiB"),
                                     (2**41, "2048.0 GiB")])
def test_human_bytes_uses_binary_units_and_stops_at_gib(n, text):
    assert train.human_bytes(n) == text
