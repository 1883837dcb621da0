"""Safetensors files, read and written from scratch, with a checksum; atomic file writes.

The format (huggingface/safetensors, README section "Format"):

    bytes [0, 8)        N, the header's length in bytes: an unsigned 64-bit little-endian integer
    bytes [8, 8 + N)    the header: a UTF-8 JSON object; begins with "{", may end in spaces (0x20)
    bytes [8 + N, end)  the data: every tensor's raw bytes, little-endian, row-major ("C" order)

The header maps each tensor name to {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]},
offsets counted from the first data byte, `end` exclusive, end - begin = numel * element size.
The optional entry "__metadata__" maps strings to strings. load_file enforces the reference's
rules: no duplicate keys; the offsets, sorted, tile the data from 0 to its last byte (no hole, no
overlap, no trailing byte, so a file cannot carry a hidden payload); 0-d (shape []) and empty
tensors are valid; N is at most MAX_HEADER_BYTES. save_file pads the header with spaces to a
multiple of 8 bytes and orders tensors by decreasing element size, then name (as the reference
writer does), so each tensor's bytes start at a multiple of its element size within the file.

Checksum. save_file adds "content_sha256" to "__metadata__": the SHA-256, as 64 lowercase hex
digits, of the whole file as written, except that those 64 digits themselves count as 64 ASCII "0"
characters. It covers the length field, every header byte (names, dtypes, shapes, offsets, the other
metadata, the padding) and every data byte. save_file writes it as the header's first entry, so a
checksummed header always begins with CHECKSUM_PREFIX, `{"__metadata__":{"content_sha256":"`.
load_file treats a header that begins with these bytes, or with them after one changed byte, as
checksummed and verifies it: a damaged entry cannot pass the file off as one without a checksum.
Files without the entry (PEFT's, the `safetensors` package's) load unless `require_checksum`.

Byte order: torch holds tensors in the host's byte order, and this module copies those bytes as
they are; they are the file's little-endian bytes on a little-endian host. Big-endian hosts are
refused with a RuntimeError rather than written or read wrongly.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from typing import BinaryIO, Callable

import torch

from formats import safe_open

# safetensors' dtype names; the project uses the first seven.
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F64": torch.float64, "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64,
          "I8": torch.int8, "I16": torch.int16, "BOOL": torch.bool}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
TENSOR_FIELDS = {"dtype", "shape", "data_offsets"}
METADATA_KEY = "__metadata__"
MAX_HEADER_BYTES = 100_000_000  # the reference reader's limit on N
HEADER_ALIGNMENT = 8  # the reference writer pads the header so the data starts 8-byte aligned
LENGTH_BYTES = 8
CHECKSUM_KEY = "content_sha256"
CHECKSUM_PREFIX = b'{"__metadata__":{"content_sha256":"'
CHECKSUM_DIGITS = 64
TEMPORARY_PREFIX = ".tmp-"
# atomic_write's temporary files: the prefix, the writer's pid, "-", mkstemp's 8 characters.
TEMPORARY_NAME = re.compile(r"\.tmp-([0-9]{1,10})-[a-z0-9_]{8}")


def sha256_hex(data: bytes) -> str:
    """SHA-256 of `data` (any bytes-like object) as 64 lowercase hex digits."""
    return hashlib.sha256(data).hexdigest()


def file_checksum(file_bytes) -> str:
    """content_sha256 of a file whose header begins with CHECKSUM_PREFIX (see the docstring)."""
    start = LENGTH_BYTES + len(CHECKSUM_PREFIX)
    digest = hashlib.sha256(file_bytes[:start])
    digest.update(b"0" * CHECKSUM_DIGITS)
    digest.update(file_bytes[start + CHECKSUM_DIGITS:])
    return digest.hexdigest()


# -------------------------------------------------------------------------------------------------
# Writing.

def save_file(tensors: dict[str, torch.Tensor], path: str,
              metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` and `metadata` (plus content_sha256) to `path` atomically.

    Each tensor is copied as a contiguous CPU tensor, so views, non-contiguous tensors and
    tensors sharing memory are all fine (the `safetensors` package refuses the last).
    """
    _require_little_endian()
    path = _check_path(path, "path")
    if not isinstance(tensors, dict):
        raise TypeError(f"tensors must be a dict of str to torch.Tensor, "
                        f"got {type(tensors).__name__}")
    for name, tensor in tensors.items():
        _check_tensor_entry(name, tensor)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict of str to str or None, "
                        f"got {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str, got {key!r}: {value!r}")
    if CHECKSUM_KEY in metadata:
        raise ValueError(f"metadata key {CHECKSUM_KEY!r} is reserved: save_file writes it itself")

    header = {METADATA_KEY: {CHECKSUM_KEY: "0" * CHECKSUM_DIGITS, **metadata}}
    chunks, offset = [], 0
    for name in sorted(tensors, key=lambda name: (-tensors[name].element_size(), name)):
        # A fresh row-major copy: .contiguous() may keep a stride other than 1 on a dimension of
        # size 0 or 1, which the uint8 view below refuses.
        tensor = torch.empty(tensors[name].shape, dtype=tensors[name].dtype)
        tensor.copy_(tensors[name].detach())
        data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())  # (numel * itemsize,)
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % HEADER_ALIGNMENT)
    file_bytes = bytearray(len(header_bytes).to_bytes(LENGTH_BYTES, "little") + header_bytes)
    for data in chunks:
        file_bytes += data
    start = LENGTH_BYTES + len(CHECKSUM_PREFIX)
    file_bytes[start:start + CHECKSUM_DIGITS] = file_checksum(file_bytes).encode("ascii")
    atomic_write(path, lambda file: file.write(file_bytes))


def _check_tensor_entry(name, tensor) -> None:
    if not isinstance(name, str):
        raise TypeError(f"tensors: every key must be a str (the tensor's name), got {name!r}")
    if name == METADATA_KEY:
        raise ValueError(f"tensors: the name {METADATA_KEY!r} is reserved for the metadata")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensors[{name!r}] must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.is_meta or tensor.layout != torch.strided:
        raise ValueError(f"tensors[{name!r}] must be a dense tensor with data, got a "
                         f"{'meta' if tensor.is_meta else str(tensor.layout)} tensor")
    if tensor.dtype not in DTYPE_NAMES:
        raise ValueError(f"tensors[{name!r}] has dtype {tensor.dtype}; this format takes "
                         f"{', '.join(str(dtype) for dtype in DTYPE_NAMES)}")


# -------------------------------------------------------------------------------------------------
# Reading.

def load_file(path: str, device="cpu", *, require_checksum: bool = False
              ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read, validate and return (tensors, metadata) from `path`.

    A checksummed file is verified and its content_sha256 entry left out of the returned metadata,
    so load_file returns what save_file was given. Every problem with the file's contents is a
    one-line ValueError naming the file; a missing file is a FileNotFoundError. The tensors own
    their memory (one copy per tensor out of the file's bytes) and are writable.
    """
    _require_little_endian()
    path = _check_path(path, "path")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must name a torch device such as 'cpu', got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device is {device} but CUDA is not available; use device='cpu'")
    file, size = safe_open.open_regular(path)  # a FIFO, device or folder: one line
    with file:
        prefix = _read_header_bytes(file, size, path)
        entries, metadata, data_start = _parse(memoryview(prefix), path, require_checksum, size)
        # The offsets tile the file's data exactly (_parse): the buffer is what the file holds.
        file_bytes = bytearray(size)
        file_bytes[:len(prefix)] = prefix
        if file.readinto(memoryview(file_bytes)[len(prefix):]) != size - len(prefix):
            raise ValueError(f"{path}: the file shrank while being read")
    _verify_checksum(memoryview(file_bytes), path, metadata)
    everything = torch.frombuffer(file_bytes, dtype=torch.uint8)  # (file bytes,) no copy
    tensors = {}
    for name, (dtype, shape, begin, end) in entries.items():
        raw = everything[data_start + begin:data_start + end].clone()  # own, aligned memory
        if dtype == torch.bool and raw.numel() and int(raw.max()) > 1:
            raise ValueError(f"{path}: not a valid safetensors file: BOOL tensor {name!r} holds "
                             f"a byte other than 0 or 1")
        tensors[name] = raw.view(dtype).reshape(shape).to(device)
    return tensors, metadata


def _read_header_bytes(file, size: int, path: str) -> bytes:
    """The length field and the header, read only after N is checked against the file's size."""
    if size < LENGTH_BYTES:
        raise ValueError(f"{path}: not a valid safetensors file: {size} bytes, too short to hold "
                         f"the 8-byte header length (truncated?)")
    length_field = safe_open.read_exactly(file, LENGTH_BYTES, path)
    header_length = int.from_bytes(length_field, "little")
    if header_length > MAX_HEADER_BYTES or LENGTH_BYTES + header_length > size:
        raise ValueError(f"{path}: not a valid safetensors file: the header length "
                         f"{header_length} goes beyond the file's {size} bytes (truncated?)")
    return length_field + safe_open.read_exactly(file, header_length, path)


def _parse(view: memoryview, path: str, require_checksum: bool, size: int | None = None):
    """Validate the file's layout from its first bytes `view` (the length field and the header at
    least) and its `size` (default len(view)); returns ({name: (dtype, shape, begin, end)},
    metadata, start). A checksum is verified when `view` is the whole file (_verify_checksum)."""
    def corrupt(what: str) -> ValueError:
        return ValueError(f"{path}: not a valid safetensors file: {what}")

    size = len(view) if size is None else size
    if size < LENGTH_BYTES:
        raise corrupt(f"{size} bytes, too short to hold the 8-byte header length (truncated?)")
    header_length = int.from_bytes(view[:LENGTH_BYTES], "little")
    if header_length > MAX_HEADER_BYTES or LENGTH_BYTES + header_length > size:
        raise corrupt(f"the header length {header_length} goes beyond the file's {size} bytes "
                      f"(truncated?)")
    header_bytes = bytes(view[LENGTH_BYTES:LENGTH_BYTES + header_length])
    try:
        if not header_bytes.startswith(b"{"):
            raise ValueError("it does not begin with '{'")
        header = json.loads(header_bytes.decode("utf-8"), object_pairs_hook=_refuse_duplicates,
                            parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError, JSONDecodeError included
        raise corrupt(f"the header is not valid JSON: {error}") from None
    metadata = header.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt(f"{METADATA_KEY} must map strings to strings")
    entries = {name: _tensor_entry(name, info, corrupt) for name, info in header.items()}

    data_size = size - LENGTH_BYTES - header_length
    position = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin != position:
            raise corrupt(f"tensor {name!r} starts at data byte {begin}, expected {position}: "
                          f"the offsets must tile the data without holes or overlaps")
        position = end
    if position != data_size:
        raise corrupt(f"the offsets cover {position} data bytes but the file holds {data_size} "
                      f"({'truncated' if data_size < position else 'trailing bytes'})")

    claims_checksum = header_length >= len(CHECKSUM_PREFIX) + CHECKSUM_DIGITS and sum(
        a != b for a, b in zip(header_bytes, CHECKSUM_PREFIX)) <= 1
    if claims_checksum:
        start = len(CHECKSUM_PREFIX)
        if not header_bytes.startswith(CHECKSUM_PREFIX) or CHECKSUM_KEY not in metadata:
            raise corrupt(f"{CHECKSUM_KEY} does not match the contents: the file changed after "
                          f"it was written (a flipped bit, a partial copy or an edit)")
        metadata[CHECKSUM_KEY] = header_bytes[start:start + CHECKSUM_DIGITS]
        if len(view) == size:
            _verify_checksum(view, path, metadata)
    elif CHECKSUM_KEY in metadata:
        raise corrupt(f"its {CHECKSUM_KEY} is not the header's first entry, where save_file "
                      f"writes it, so it cannot be verified (rewritten by another tool?)")
    elif require_checksum:
        raise corrupt(f"it has no {CHECKSUM_KEY} checksum, and this caller requires one")
    return entries, metadata, LENGTH_BYTES + header_length


def _verify_checksum(view: memoryview, path: str, metadata: dict) -> None:
    """Check the whole file against the digits _parse found (kept in metadata as bytes, then
    removed); nothing to do for a file without a checksum."""
    stored = metadata.pop(CHECKSUM_KEY, None)
    if stored is not None and stored != file_checksum(view).encode("ascii"):
        raise ValueError(f"{path}: not a valid safetensors file: {CHECKSUM_KEY} does not match "
                         f"the contents: the file changed after it was written (a flipped bit, "
                         f"a partial copy or an edit)")


def _tensor_entry(name: str, info, corrupt) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    if not isinstance(info, dict) or set(info) != TENSOR_FIELDS:
        got = sorted(info) if isinstance(info, dict) else type(info).__name__
        raise corrupt(f"tensor {name!r} must have exactly the fields dtype, shape and "
                      f"data_offsets, got {got}")
    dtype = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise corrupt(f"tensor {name!r} has unsupported dtype {info['dtype']!r} "
                      f"(this reader takes {', '.join(DTYPES)})")
    shape, offsets = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and all(_is_count(size) for size in shape)):
        raise corrupt(f"tensor {name!r} has shape {shape!r}; a shape is a list of ints >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
            and offsets[0] <= offsets[1]):
        raise corrupt(f"tensor {name!r} has data_offsets {offsets!r}; they must be [begin, end] "
                      f"with 0 <= begin <= end")
    needed = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != needed:
        raise corrupt(f"tensor {name!r} of shape {shape} and dtype {info['dtype']} needs {needed} "
                      f"bytes, but its data_offsets {offsets} span {offsets[1] - offsets[0]}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _refuse_duplicates(pairs: list) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        keys = [key for key, _ in pairs]
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return result


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


# -------------------------------------------------------------------------------------------------
# Files: atomic writes and what an interrupted one leaves behind.

def atomic_write(path: str, write: Callable[[BinaryIO], None], *, make_folder: bool = True
                 ) -> None:
    """Make `path` hold exactly what `write(file)` writes, or leave it as it was.

    `write` fills a temporary file in the same folder (so os.replace is a rename within one file
    system), named ".tmp-<pid>-<8 random characters>": the writer's process id marks it as its
    own (remove_stale_temporaries). It is flushed to disk, given the usual mode 0o666 & ~umask,
    and renamed over `path`. If `write` raises, the temporary file is removed and `path` is
    untouched; a process killed mid-write leaves the temporary file, which
    remove_stale_temporaries deletes once that process is gone. An OSError (a full disk, a file
    size limit, a read-only file system) names `path`. `make_folder`: create the folder if it is
    missing (False: a missing folder is a FileNotFoundError naming `path`).
    """
    path = _check_path(path, "path")
    if not callable(write):
        raise TypeError(f"write must be a callable taking a binary file, got {write!r}")
    if os.path.isdir(path):
        raise ValueError(f"path {path!r} is a directory; atomic_write needs a file name")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        if make_folder:
            os.makedirs(directory, exist_ok=True)
        file_descriptor, temporary = tempfile.mkstemp(dir=directory,
                                                      prefix=f"{TEMPORARY_PREFIX}{os.getpid()}-")
    except OSError as error:
        raise _naming(error, path) from None
    try:
        with os.fdopen(file_descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
            _test_delay()
        umask = os.umask(0)  # reading the umask means setting it; put it straight back
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0o600
        os.replace(temporary, path)
    except BaseException as error:
        if os.path.lexists(temporary):
            os.remove(temporary)
        if isinstance(error, OSError):
            raise _naming(error, path) from None
        raise
    _fsync_directory(directory)


def _naming(error: OSError, path: str) -> OSError:
    """`error` naming `path`, where it names no file (ENOSPC, EFBIG from write()) or only the
    temporary file (which the user never asked for)."""
    named = error.filename is not None and not TEMPORARY_NAME.fullmatch(
        os.path.basename(os.fspath(error.filename)))
    if named or error.errno is None:
        return error
    return type(error)(error.errno, error.strerror, path)


# For the tests only: seconds atomic_write sleeps between writing a temporary file and renaming
# it, to stand for a slow disk (two runs sharing a folder, tests/test_locks.py). Unset: no delay.
TEST_DELAY_VARIABLE = "TINY_GPT_TEST_SAVE_DELAY_S"


def _test_delay() -> None:
    delay = os.environ.get(TEST_DELAY_VARIABLE)
    if delay:
        time.sleep(float(delay))


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable, where a folder can be opened and synced (not on Windows)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except OSError:
        pass


def remove_stale_temporaries(directory: str, root: str | None = None) -> list[str]:
    """Delete the temporary files that interrupted atomic_writes left in `directory`; return them.

    Only what can be proven stale goes: a regular file directly in `directory` (no folder, link
    or subfolder) named as atomic_write names its temporaries, ".tmp-<pid>-<8 characters>",
    whose writer process no longer exists. A writer still at work, another run's in-flight save
    or a user's ".tmp-notes.txt" stays. With `root`, a `directory` that is a link, or that lies
    outside `root` once links are resolved, is left alone: nothing is removed through a link out
    of a run folder. A folder that does not exist holds nothing stale: the result is [].
    """
    directory = _check_path(directory, "directory")
    if not os.path.isdir(directory):
        return []
    if root is not None:
        inside = os.path.realpath(_check_path(root, "root"))
        real = os.path.realpath(directory)
        if os.path.islink(directory) or os.path.commonpath([inside, real]) != inside:
            return []
    removed = []
    with os.scandir(directory) as entries:
        for entry in entries:
            match = TEMPORARY_NAME.fullmatch(entry.name)
            if match and entry.is_file(follow_symlinks=False) and not _alive(int(match[1])):
                os.remove(entry.path)
                removed.append(entry.path)
    return sorted(removed)


def _alive(pid: int) -> bool:
    """Whether a process `pid` exists (on this machine); unsure counts as alive."""
    if pid <= 0 or pid == os.getpid():
        return pid > 0
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process (or a pid this system cannot hold): not ours
    return True


def _check_path(path, name: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise ValueError(f"{name} must be a non-empty text path, got {path!r}")
    return path


def _require_little_endian() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("safetensors_io copies torch's native bytes, which are the file's "
                           "little-endian bytes only on a little-endian host; this host is "
                           "big-endian")
