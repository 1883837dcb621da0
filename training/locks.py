"""Run folders shared by several train.py processes: a lock per method, and one per shared file.

Two terminals training different methods into the default `runs/` is ordinary use. Each method's
files (finetune-<method>.pt, adapter-<method>/ or full.safetensors) belong to one run at a time:
a run holds the lock file `.lock-<method>` of its folder (fcntl.flock, exclusive) for as long as
it trains, and a second run of the same method into the same folder refuses at once, in one line
(RunBusy). The files every run shares are written under a short lock that waits instead: the
pretrained base (`.lock-base`: the second run waits, then reuses the first's cache) and run.json
with results.json (`.lock-records`: a read-modify-write each, so no run's entry is lost).

flock locks belong to the open file: the kernel releases them when the process ends, however it
ends, so a killed run never leaves a folder locked. The lock files stay (removing one while
another process waits on it would let two hold "the" lock); they are empty.
Where flock does not exist (Windows), the locks are no-ops and one run per folder is the rule.
"""

from __future__ import annotations

import contextlib
import os

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

LOCK_PREFIX = ".lock-"


class RunBusy(RuntimeError):
    """Another process is training the same method into the same run folder."""


class RunFolderGone(RuntimeError):
    """The run folder was removed (or replaced) while the run was writing into it."""


def _open_lock_file(folder: str, name: str) -> int:
    path = os.path.join(folder, f"{LOCK_PREFIX}{name}")
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags, 0o644)
    except OSError as error:
        raise type(error)(error.errno, error.strerror, path) from None


class MethodLocks:
    """The exclusive locks of some methods in one run folder, taken together or not at all."""

    def __init__(self, folder: str, methods) -> None:
        self.folder = folder
        self.descriptors = []
        try:
            for method in methods:
                descriptor = _open_lock_file(folder, method)
                self.descriptors.append(descriptor)
                if fcntl is not None and not _try_lock(descriptor):
                    raise RunBusy(f"another train.py is training {method} into {folder} (it "
                                  f"holds {os.path.join(folder, LOCK_PREFIX + method)}); wait for "
                                  f"it to finish, or pass another --out")
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        for descriptor in self.descriptors:
            os.close(descriptor)  # closing the file releases its flock
        self.descriptors = []


def _try_lock(descriptor: int) -> bool:
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def shared_file_lock(folder: str, name: str):
    """Hold `folder`'s lock `name` exclusively for the block, waiting for it if another holds it."""
    descriptor = _open_lock_file(folder, name)
    try:
        if fcntl is not None:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def check_folder_is_there(folder: str) -> None:
    """RunFolderGone, naming the folder, if it no longer exists (deleted while the run wrote)."""
    if not os.path.isdir(folder):
        raise RunFolderGone(f"the run folder {folder} disappeared while the run was writing into "
                            f"it; nothing more was written")
