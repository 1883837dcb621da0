"""training/locks.py and what train.py does with a run folder it shares: two real processes of
different methods into one folder both complete; of the same method, one trains and the other
refuses in one line. Saves are slowed (safetensors_io.TEST_DELAY_VARIABLE) so the runs overlap."""

import fcntl
import os
import subprocess
import sys
import time

import pytest

import train
from formats import safetensors_io
from training import locks, runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The least train.py does: --quick's tiny model, one pretraining and one fine-tuning step (7 saves
# for the run that pretrains, each slowed below).
TINY = ["--quick", "--pretrain-steps", "1", "--steps", "1"]
# Seconds each save sleeps between writing its temporary file and renaming it: long against a
# save of this tiny model (milliseconds), so a run's temporaries stay in flight while the other
# run starts, cleans up and saves.
SAVE_DELAY_S = 0.25


def start(folder, method: str, delay: float) -> subprocess.Popen:
    # One thread each: two processes on a 2-core machine, not four threads fighting over two cores.
    environment = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                       **{safetensors_io.TEST_DELAY_VARIABLE: str(delay)})
    return subprocess.Popen([sys.executable, "train.py", *TINY, "--out", str(folder), "--method",
                             method], cwd=ROOT, env=environment, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def held_by_another(path) -> bool:
    """Whether another process holds the flock of the lock file `path` now."""
    try:
        descriptor = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)  # also releases the lock if this call took it
    return False


def test_two_processes_share_a_folder_and_one_method_has_one_writer(tmp_path, capsys):
    """`train.py --method lora` and `--method dora` as two processes into one folder at once,
    each save slowed by SAVE_DELAY_S; while the lora process holds its lock, a third lora run (in
    this process: no third import of torch) refuses in one line. Before the fix, a run deleted the
    other's in-flight temporary file and died (3 in 10 trials)."""
    folder = tmp_path / "runs"
    folder.mkdir()
    processes = [start(folder, method, SAVE_DELAY_S) for method in ("lora", "dora")]
    while not held_by_another(folder / ".lock-lora") and processes[0].poll() is None:
        time.sleep(0.02)
    assert processes[0].poll() is None, processes[0].stderr.read()
    capsys.readouterr()
    assert train.cli([*TINY, "--out", str(folder), "--method", "lora"]) == 1
    refusal = capsys.readouterr().err.strip()
    assert refusal.count("\n") == 0, refusal
    assert refusal.startswith(f"train.py: another train.py is training lora into {folder}")
    results = [(process.wait(timeout=120), process.stderr.read()) for process in processes]
    assert [status for status, _ in results] == [0, 0], results
    run = runs.read_json(folder / "run.json")
    assert set(run) == {"base", "lora", "dora"}
    assert [row["method"] for row in runs.read_json(folder / "results.json")] == ["lora", "dora"]
    assert not [name for name in os.listdir(folder) if name.startswith(".tmp-")]


def test_a_held_method_lock_refuses_the_same_method_and_not_another(tmp_path):
    held = locks.MethodLocks(str(tmp_path), ["lora", "dora"])
    try:
        with pytest.raises(locks.RunBusy, match="another train.py is training dora into"):
            locks.MethodLocks(str(tmp_path), ["vera", "dora"])
        # all or nothing: the refused run released the vera lock it took first
        locks.MethodLocks(str(tmp_path), ["vera"]).release()
    finally:
        held.release()
    locks.MethodLocks(str(tmp_path), ["lora"]).release()  # released: free again


def test_the_lock_is_the_kernels_so_a_killed_holder_frees_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from training import locks; "
        "locks.MethodLocks(sys.argv[2], ['lora']); print('held', flush=True); time.sleep(60)"),
        ROOT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(locks.RunBusy):
            locks.MethodLocks(str(tmp_path), ["lora"])
    finally:
        holder.kill()
        holder.wait()
    locks.MethodLocks(str(tmp_path), ["lora"]).release()


def test_a_lock_file_that_is_a_link_is_not_followed(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("a user's file")
    os.symlink(target, tmp_path / ".lock-lora")
    with pytest.raises(OSError) as error:
        locks.MethodLocks(str(tmp_path), ["lora"])
    assert error.value.filename == str(tmp_path / ".lock-lora")
    assert target.read_text() == "a user's file"


def test_the_shared_file_lock_waits_and_serializes(tmp_path):
    with locks.shared_file_lock(str(tmp_path), "records"):
        descriptor = os.open(tmp_path / ".lock-records", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(descriptor)
    with locks.shared_file_lock(str(tmp_path), "records"):
        pass  # released at the end of the block


def test_a_vanished_folder_is_one_line():
    with pytest.raises(locks.RunFolderGone, match="disappeared while the run was writing"):
        locks.check_folder_is_there(os.path.join(ROOT, "no-such-run-folder"))
