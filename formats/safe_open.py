"""Opening a file to read it, safely: only a regular file, and never more bytes than it holds.

A path where a file is expected may name a FIFO (opening it for reading waits for a writer,
forever), a socket, a device (/dev/zero never ends) or a folder. open_regular opens without
blocking (O_NONBLOCK) and asks the open descriptor what it is (fstat), so the answer is about the
file that was opened, not one that replaced it in between; anything but a regular file is a
one-line NotRegularFile naming the path.

Readers then read the first bytes (a header, a magic line) and check what they claim against the
file's real size before they allocate: read_exactly never allocates more than the caller asks,
and the caller asks only for what the header validly claims and the file holds.
"""

from __future__ import annotations

import json
import os
import stat

# A read of a JSON file of a run or an adapter config: run.json and results.json of a run are
# a few kilobytes; 16 MiB is thousands of times more and still nothing to hold in memory.
MAX_JSON_BYTES = 16 * 2**20

# Reading a large file in pieces (hashing it) holds one piece at a time.
CHUNK_BYTES = 2**20


class NotRegularFile(ValueError):
    """A path that names a FIFO, socket, device or folder where a regular file is expected."""


def kind_of(mode: int) -> str:
    """What a file of st_mode `mode` is, in words."""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    return next((words for test, words in kinds if test(mode)), "not a regular file")


def open_regular(path):
    """Open `path` for binary reading if it is a regular file: (file, its size in bytes).

    FileNotFoundError for a missing path (as open raises it); NotRegularFile, one line naming the
    path and what it is, for anything else that is not a regular file.
    """
    path = os.fspath(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError:  # a socket cannot be opened (ENXIO): say what it is where we can
        status = os.stat(path)
        if not stat.S_ISREG(status.st_mode):
            raise NotRegularFile(f"{path}: is {kind_of(status.st_mode)}, not a regular file"
                                 ) from None
        raise
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise NotRegularFile(f"{path}: is {kind_of(status.st_mode)}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(descriptor, True)  # a regular file: the flag never mattered
        return os.fdopen(descriptor, "rb"), status.st_size
    except BaseException:
        os.close(descriptor)
        raise


def read_exactly(file, count: int, path) -> bytes:
    """`count` bytes from `file`, or a ValueError naming `path` if it ends (or shrank) first."""
    data = file.read(count)
    if len(data) != count:
        raise ValueError(f"{os.fspath(path)}: ended after {len(data)} of {count} bytes (it "
                         f"shrank while being read?)")
    return data


def read_regular(path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; a bigger one is a ValueError."""
    file, size = open_regular(path)
    with file:
        if size > limit:
            raise ValueError(f"{os.fspath(path)}: {size:,} bytes, more than the {limit:,} a file "
                             f"of this kind may hold")
        return read_exactly(file, size, path)


def load_json(path, limit: int = MAX_JSON_BYTES):
    """A JSON file's value, read as read_regular reads it. Invalid JSON, invalid UTF-8 and nesting
    too deep for Python's parser (RecursionError) are each a one-line ValueError naming the path."""
    data = read_regular(path, limit)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{os.fspath(path)}: not valid JSON ({error})") from None
    except RecursionError:
        raise ValueError(f"{os.fspath(path)}: not valid JSON (nested too deeply to read)") from None
