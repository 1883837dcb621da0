"""training/distributed.py and train.py under torchrun: two gloo processes on the CPU, on loopback.

The test starts the two ranks itself (torchrun's env:// variables, MASTER_ADDR 127.0.0.1) on the
--quick model, after one single-process run of the same flags, and checks for LoRA and QLoRA:
- the ranks hold bit-equal adapters (DDP hands every rank the same averaged gradient);
- rank 0's adapters equal the single-process run's within TOLERANCE (same global batch; only the
  order of summation differs: two half-batch means, all-reduced, against one mean);
- the bytes the communication hook saw at every step equal the trainable parameters' bytes, and
  the single-process run's column (one backward through DDP on a group of one) says the same;
- rank 1 writes nothing and prints nothing;
- --resume under torchrun, from a checkpoint rank 0 wrote mid-run, reaches the same bits.
"""
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import train
from training import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Largest |difference| allowed between a parameter trained on 2 ranks and on 1 after STEPS AdamW
# steps at the quick sizes. Measured: at most 1.4e-6 after 10 steps over every method (see
# docs/distributed.md): a gradient's rounding differs (~1e-7 relative), and Adam's normalized
# update turns that into up to about lr x 1e-4 on the parameters where the gradient is near 0.
TOLERANCE = 1e-5
STEPS = 12  # quick sizes checkpoint every 10 steps: one mid-run checkpoint to resume from
ARGV = ["--quick", "--pretrain-steps", "5", "--steps", str(STEPS), "--method", "lora,qlora"]
LOOPBACK = "127.0.0.1"

# What each rank runs: train.main with ARGV into its own folder, then (from a checkpoint rank 0
# kept at step 10, in a folder both share) train.main with --resume; it keeps the trained
# parameters and the measured traffic of both in a result file beside, not in, the run folders.
CHILD = r"""
import os, shutil, sys
import torch
import train
from training import distributed

harness, out, shared, argv = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
worlds, params = [], {}
start, finetune = distributed.start, train.finetune


def start_and_keep(*args):
    world, device = start(*args)
    worlds.append(world)
    return world, device


def finetune_and_keep(*args, **kwargs):
    def keep_checkpoint(step):
        if step == 10 and worlds[-1].is_main:
            shutil.copy(os.path.join(out, f"finetune-{args[0]}.pt"), harness)
    row, model = finetune(*args, callback=keep_checkpoint, **kwargs)
    params[row["method"]] = {name: p.detach().clone() for name, p in model.named_parameters()
                             if p.requires_grad}
    return row, model


def run(argv, folder):
    params.clear()
    rows = train.main(argv + ["--out", folder])
    traffic = {label: t.per_step for label, t in worlds[-1].traffic.items()}
    return dict(rows=rows, params=dict(params), traffic=traffic)


distributed.start, train.finetune = start_and_keep, finetune_and_keep
first = run(argv, out)
if worlds[0].is_main:  # the harness, not train.py, fills the shared folder
    for name in os.listdir(out):
        if name.startswith("base-"):
            shutil.copy(os.path.join(out, name), shared)
    shutil.copy(os.path.join(harness, "finetune-lora.pt"), shared)
os.environ["MASTER_PORT"] = os.environ["RESUME_PORT"]  # a new group: rank 1 waits for rank 0
resumed = run(argv[:-1] + ["lora", "--resume"], shared)
rank = worlds[0].rank
torch.save(dict(first=first, resumed=resumed), os.path.join(harness, f"rank{rank}.pt"))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def run_ranks(outs, shared, harness, argv):
    """Two ranks of CHILD, rank k writing into outs[k] and then into `shared`; returns each one's
    (result, stdout, stderr)."""
    env = dict(os.environ, MASTER_ADDR=LOOPBACK, MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               RESUME_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo talks over loopback only
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, harness, out, shared] + argv,
                              cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)))
             for rank, out in enumerate(outs)]
    done = []
    for rank, proc in enumerate(procs):
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        result = torch.load(os.path.join(harness, f"rank{rank}.pt"), weights_only=True)
        done.append((result, stdout, stderr))
    return done


def listing(folder):
    return {name: (os.path.getsize(os.path.join(folder, name)),
                   os.stat(os.path.join(folder, name)).st_mtime_ns)
            for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single-process run, then the same flags on two ranks (rank k into its own folder,
    both starting from the single run's base), then the resumed run on two ranks."""
    root = tmp_path_factory.mktemp("distributed")
    single, kept = str(root / "single"), {}
    finetune = train.finetune

    def finetune_and_keep(*args, **kwargs):
        row, model = finetune(*args, **kwargs)
        kept[row["method"]] = {name: p.detach().clone() for name, p in model.named_parameters()
                               if p.requires_grad}
        return row, model
    with pytest.MonkeyPatch.context() as patch, open(os.devnull, "w") as silence:
        patch.setattr(train, "finetune", finetune_and_keep)
        patch.setattr(sys, "stdout", silence)
        patch.setattr(sys, "stderr", silence)
        single_rows = train.main(ARGV + ["--out", single])
    folders = {name: str(root / name) for name in ("rank0", "rank1", "shared", "harness")}
    base = [name for name in os.listdir(single) if name.startswith("base-")]
    for folder in folders.values():
        os.mkdir(folder)
    for name in base:
        shutil.copy(os.path.join(single, name), folders["rank0"])
        shutil.copy(os.path.join(single, name), folders["rank1"])
    rank1_before = listing(folders["rank1"])
    ranks = run_ranks([folders["rank0"], folders["rank1"]], folders["shared"],
                      folders["harness"], ARGV)
    return dict(single_rows=single_rows, single=kept, ranks=ranks, rank1_before=rank1_before,
                rank1_after=listing(folders["rank1"]), **folders)


def first_runs(runs):
    return [result["first"] for result, _, _ in runs["ranks"]]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_ranks_hold_bit_equal_adapters_that_match_the_single_process_run(runs, method):
    zero, one = first_runs(runs)
    single = runs["single"][method]
    assert set(zero["params"][method]) == set(one["params"][method]) == set(single)
    for name, tensor in zero["params"][method].items():
        assert torch.equal(tensor, one["params"][method][name]), f"{name}: the ranks differ"
        difference = (tensor - single[name]).abs().max().item()
        assert difference <= TOLERANCE, f"{name}: 2 ranks vs 1 differ by {difference:.3g}"


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_the_all_reduced_bytes_are_the_trainable_bytes_at_every_step(runs, method):
    zero, one = first_runs(runs)
    [single_row] = [row for row in runs["single_rows"] if row["method"] == method]
    trainable_bytes = sum(p.numel() * p.element_size() for p in zero["params"][method].values())
    assert trainable_bytes == 4 * single_row["trainable"]  # float32 adapters
    for result in (zero, one):
        assert result["traffic"][method] == [trainable_bytes] * STEPS
        [row] = [row for row in result["rows"] if row["method"] == method]
        assert row["allreduce_bytes"] == trainable_bytes
        assert row["distributed"]["world_size"] == 2
        assert not row["distributed"]["broadcast_buffers"]
    assert single_row["allreduce_bytes"] == trainable_bytes  # measured on a group of one
    # Buffers DDP lists and, forward_sync_buffers off, does not send each step: every adapter's
    # merge flag and digest (1 + 32 bytes), and QLoRA's 4-bit base besides
    [row] = [row for row in zero["rows"] if row["method"] == method]
    layers = len(zero["params"][method]) // 2  # two parameters (A, B) an adapted layer
    # the 4-bit codes and their scales, and a layout record (4 int32) a layer
    nf4 = single_row["nf4"]["bytes"] + 16 * layers if method == "qlora" else 0
    assert row["distributed"]["buffer_bytes"] == 33 * layers + nf4


def test_only_rank_0_writes_files_and_prints(runs):
    assert runs["rank1_after"] == runs["rank1_before"], "rank 1 wrote into its folder"
    written = set(os.listdir(runs["rank0"]))
    assert {"adapter-lora", "adapter-qlora", "finetune-lora.pt", "finetune-qlora.pt",
            "results.json", "run.json"} <= written
    (_, out0, err0), (_, out1, err1) = runs["ranks"]
    assert out0.startswith("method  trainable") and f"step   {STEPS}/{STEPS}" in err0
    assert out1 == "" and "step" not in err1


def test_resume_under_torchrun_reaches_the_same_bits(runs):
    """Both ranks continue from rank 0's step-10 checkpoint in a folder they share."""
    random = train.read_checkpoint(os.path.join(runs["harness"], "finetune-lora.pt"))["random"]
    assert len(random["ranks"]) == 2  # each rank's own dropout stream, seeded apart
    assert torch.equal(random["ranks"][0]["torch"], random["torch"])
    assert not torch.equal(random["ranks"][1]["torch"], random["torch"])
    straight = first_runs(runs)[0]["params"]["lora"]
    trainable_bytes = sum(p.numel() * p.element_size() for p in straight.values())
    for result, _, _ in runs["ranks"]:
        resumed = result["resumed"]
        assert resumed["traffic"]["lora"] == [trainable_bytes] * (STEPS - 10)  # steps 11, 12
        for name, tensor in resumed["params"]["lora"].items():
            assert torch.equal(tensor, straight[name]), f"{name}: resumed vs straight through"


def test_shards_of_the_ranks_make_up_the_global_batch_and_an_uneven_split_is_refused():
    x, y = torch.arange(24).view(8, 3), -torch.arange(24).view(8, 3)  # (B, T) = (8, 3)
    for size in (1, 2, 4, 8):
        shards = [distributed.shard(x, y, distributed.World(rank=k, size=size))
                  for k in range(size)]
        assert all(part.shape == (8 // size, 3) for shard in shards for part in shard)
        assert torch.equal(torch.cat([a for a, _ in shards]), x)
        assert torch.equal(torch.cat([b for _, b in shards]), y)
    distributed.check_batch(8, distributed.World(rank=0, size=4))
    with pytest.raises(ValueError, match="batch size 8 does not split evenly over 3 ranks"):
        distributed.check_batch(8, distributed.World(rank=0, size=3))
