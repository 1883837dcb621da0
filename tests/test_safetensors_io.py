"""safetensors_io: round trips, the `safetensors` package as oracle both ways, corrupt files,
the checksum, atomic writes.

Comparisons are bit for bit (through a uint8 view of each tensor), so NaN payloads, -0.0 and
subnormals must survive unchanged: a file format has no tolerance.
"""
import errno
import hashlib
import json
import os
import resource
import stat
import subprocess
import sys

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from assertions import assert_same
from formats import safetensors_io
from formats.safetensors_io import atomic_write, load_file, remove_stale_temporaries, save_file

PROJECT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8,
                  torch.int32, torch.int64]
ALL_DTYPES = PROJECT_DTYPES + [torch.int8, torch.int16, torch.bool]
HASH_DIGITS_AT = 8 + len(safetensors_io.CHECKSUM_PREFIX)  # where the 64 hex digits start


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes in row-major order: (numel * itemsize,) uint8."""
    copy = torch.empty(tensor.shape, dtype=tensor.dtype)  # row-major strides, whatever the input's
    return copy.copy_(tensor.detach()).reshape(-1).view(torch.uint8)


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        got = actual[name]
        assert got.dtype == tensor.dtype, (name, got.dtype, tensor.dtype)
        assert got.shape == tensor.shape, (name, got.shape, tensor.shape)
        assert_same(raw_bytes(got), raw_bytes(tensor), f"the bytes of {name!r}")


def random_tensor(dtype: torch.dtype, shape: tuple, seed: int, strided: bool) -> torch.Tensor:
    """Random bits (every float pattern: NaN payloads, infinities, subnormals); bool is 0/1.

    `strided` returns a non-contiguous view of the same values' shape (every other column of a
    wider tensor, or a transpose)."""
    generator = torch.Generator().manual_seed(seed)
    wide = shape[:-1] + (2 * shape[-1],) if shape else shape
    if dtype == torch.bool:
        full = torch.randint(0, 2, wide, generator=generator).bool()
    else:
        count = torch.Size(wide).numel() * dtype.itemsize
        bits = torch.randint(0, 256, (count,), dtype=torch.uint8, generator=generator)
        full = bits.view(dtype).reshape(wide)
    if not strided or not shape:
        return full[..., : shape[-1]].contiguous() if shape else full
    if len(shape) >= 2 and shape[-1] == shape[-2]:
        return full[..., ::2].transpose(-1, -2)
    return full[..., ::2]


tensor_dicts = st.dictionaries(
    keys=st.text(min_size=0, max_size=12).filter(lambda name: name != "__metadata__"),
    values=st.tuples(st.sampled_from(ALL_DTYPES),
                     st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple),
                     st.integers(0, 2**31), st.booleans()),
    max_size=4,
).map(lambda specs: {name: random_tensor(*spec) for name, spec in specs.items()})
metadata_dicts = st.dictionaries(st.text(max_size=10).filter(lambda k: k != "content_sha256"),
                                 st.text(max_size=20), max_size=3)


# -------------------------------------------------------------------------------------------------
# Round trips

@pytest.mark.exercise("formats.safetensors_io.save_file")
@given(tensors=tensor_dicts, metadata=metadata_dicts)
def test_round_trip_is_bit_exact(tmp_path_factory, tensors, metadata):
    path = str(tmp_path_factory.mktemp("st") / "t.safetensors")
    save_file(tensors, path, metadata)
    loaded, loaded_metadata = load_file(path)
    assert_same_tensors(loaded, tensors)
    assert loaded_metadata == metadata


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5,), (2, 3)], ids=str)
def test_every_dtype_and_shape(tmp_path, dtype, shape):
    tensors = {"t": random_tensor(dtype, shape, seed=1, strided=False)}
    save_file(tensors, tmp_path / "t.safetensors")
    assert_same_tensors(load_file(tmp_path / "t.safetensors")[0], tensors)


def test_special_float_values_survive(tmp_path):
    nan_payload = torch.tensor([0x7FC00001, 0xFFC12345, 0x7F800001], dtype=torch.int64)
    tensors = {"nan": nan_payload.to(torch.int32).view(torch.float32),
               "signed": torch.tensor([-0.0, float("inf"), -float("inf"), 1e-45]),
               "bf16": torch.tensor([0x7FC1, -0x8000, 1], dtype=torch.int16).view(torch.bfloat16)}
    save_file(tensors, tmp_path / "t.safetensors")
    assert_same_tensors(load_file(tmp_path / "t.safetensors")[0], tensors)


def test_loaded_tensors_are_writable_and_own_their_memory(tmp_path):
    shared = torch.arange(12.0)
    save_file({"all": shared, "tail": shared[6:], "int": torch.arange(3)}, tmp_path / "t.st")
    loaded, _ = load_file(tmp_path / "t.st")
    for tensor in loaded.values():
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        assert tensor.data_ptr() % tensor.element_size() == 0
    loaded["all"][6:] = -1.0
    assert_same(loaded["tail"], torch.arange(6.0, 12.0), "tail, after a write to all[6:]")


def test_grad_tensors_and_empty_dicts(tmp_path):
    weight = torch.randn(3, 2, requires_grad=True)
    save_file({"w": weight}, tmp_path / "w.st")
    assert_same_tensors(load_file(tmp_path / "w.st")[0], {"w": weight.detach()})
    save_file({}, tmp_path / "empty.st")
    assert load_file(tmp_path / "empty.st") == ({}, {})


@pytest.mark.exercise("formats.safetensors_io.save_file")
def test_layout_follows_the_reference_writer(tmp_path):
    """Header padded to 8 bytes; tensors by decreasing element size, then name; aligned offsets."""
    tensors = {"b": torch.zeros(3, dtype=torch.uint8), "a": torch.zeros(1, dtype=torch.uint8),
               "c": torch.zeros(2, dtype=torch.float16), "d": torch.zeros(1, dtype=torch.float64)}
    save_file(tensors, tmp_path / "t.st")
    data = (tmp_path / "t.st").read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    assert (8 + header_length) % 8 == 0
    header = json.loads(data[8:8 + header_length])
    assert list(header) == ["__metadata__", "d", "c", "a", "b"]
    for name, info in header.items():
        if name != "__metadata__":
            assert info["data_offsets"][0] % tensors[name].element_size() == 0


# -------------------------------------------------------------------------------------------------
# The `safetensors` package as oracle, both ways

@pytest.mark.exercise("formats.safetensors_io.save_file")
@given(tensors=tensor_dicts, metadata=metadata_dicts)
def test_reference_reads_our_files(tmp_path_factory, tensors, metadata):
    safetensors = pytest.importorskip("safetensors")
    from safetensors.torch import load_file as reference_load
    path = str(tmp_path_factory.mktemp("st") / "ours.safetensors")
    save_file(tensors, path, metadata)
    assert_same_tensors(reference_load(path), tensors)
    with safetensors.safe_open(path, framework="pt") as file:
        reference_metadata = file.metadata()
    assert reference_metadata.pop("content_sha256") == load_checksum(path)
    assert reference_metadata == metadata


@given(tensors=tensor_dicts, metadata=st.none() | metadata_dicts)
def test_we_read_reference_files(tmp_path_factory, tensors, metadata):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file as reference_save
    # safetensors 0.8.0 writes `{},"__metadata__":{}}` for no tensors and empty metadata: invalid
    # JSON that its own reader refuses too, and so do we.
    assume(tensors or metadata != {})
    path = str(tmp_path_factory.mktemp("st") / "theirs.safetensors")
    # The reference refuses tensors sharing memory and non-contiguous ones: hand it copies.
    reference_save({name: t.contiguous().clone() for name, t in tensors.items()}, path, metadata)
    loaded, loaded_metadata = load_file(path)
    assert_same_tensors(loaded, tensors)
    assert loaded_metadata == (metadata or {})


def load_checksum(path) -> str:
    with open(path, "rb") as file:
        return file.read()[HASH_DIGITS_AT:HASH_DIGITS_AT + 64].decode()


@pytest.mark.exercise("formats.safetensors_io.save_file")
def test_checksum_is_the_documented_sha256(tmp_path):
    """content_sha256 = sha256(file with its own 64 hex digits replaced by '0'), the first entry."""
    save_file({"w": torch.arange(5.0)}, tmp_path / "t.st", {"note": "x"})
    data = bytearray((tmp_path / "t.st").read_bytes())
    assert data[8:HASH_DIGITS_AT] == safetensors_io.CHECKSUM_PREFIX
    stored = data[HASH_DIGITS_AT:HASH_DIGITS_AT + 64].decode()
    data[HASH_DIGITS_AT:HASH_DIGITS_AT + 64] = b"0" * 64
    assert stored == hashlib.sha256(data).hexdigest() == safetensors_io.sha256_hex(bytes(data))


# -------------------------------------------------------------------------------------------------
# Corrupt, truncated and foreign files: one-line ValueErrors naming the file

def write_raw(path, header, data: bytes = b"", header_length: int | None = None) -> str:
    """A file with a hand-made header (a dict, dumped to JSON, or raw bytes) and data."""
    if header is None:  # the file is `data` alone
        path.write_bytes(data)
        return str(path)
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(header_bytes) if header_length is None else header_length
    path.write_bytes(length.to_bytes(8, "little") + header_bytes + data)
    return str(path)


def assert_refused(path, *words: str, **kwargs) -> None:
    with pytest.raises(ValueError) as error:
        load_file(path, **kwargs)
    message = str(error.value)
    assert str(path) in message and "\n" not in message, message
    for word in words:
        assert word in message, message


def entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


CORRUPT_FILES = {
    "empty file": (None, None, b"", ["too short"]),
    "five bytes": (None, None, b"\x01\x02\x03\x04\x05", ["too short"]),
    "header length beyond the file": ({"t": entry()}, 10**6, b"\0" * 8, ["beyond"]),
    "huge header length": ({"t": entry()}, 2**64 - 1, b"\0" * 8, ["beyond"]),
    "not JSON": (b"{not json}", None, b"", ["not valid JSON"]),
    "not an object": (b"[1, 2]", None, b"", ["begin with '{'"]),
    "not UTF-8": (b'{"\xff": 1}', None, b"", ["not valid JSON"]),
    "duplicate key": (b'{"t": {}, "t": {}}', None, b"", ["duplicate key 't'"]),
    "NaN in the header": (b'{"t": NaN}', None, b"", ["NaN"]),
    "unknown dtype": ({"t": entry(dtype="F128")}, None, b"\0" * 8, ["dtype 'F128'"]),
    "missing field": ({"t": {"dtype": "F32", "shape": [2]}}, None, b"\0" * 8, ["fields"]),
    "negative shape": ({"t": entry(shape=(-2,))}, None, b"\0" * 8, ["shape"]),
    "float shape": ({"t": entry(shape=(2.0,))}, None, b"\0" * 8, ["shape"]),
    "reversed offsets": ({"t": entry(offsets=(8, 0))}, None, b"\0" * 8, ["data_offsets"]),
    "span does not fit the shape": ({"t": entry(offsets=(0, 12))}, None, b"\0" * 12, ["needs 8"]),
    "hole": ({"t": entry(offsets=(4, 12))}, None, b"\0" * 12, ["holes"]),
    "overlap": ({"a": entry(), "b": entry(shape=(1,), offsets=(4, 8))}, None, b"\0" * 8,
                ["overlaps"]),
    "truncated data": ({"t": entry()}, None, b"\0" * 5, ["truncated"]),
    "trailing bytes": ({"t": entry()}, None, b"\0" * 9, ["trailing"]),
    "metadata not strings": ({"__metadata__": {"k": 1}}, None, b"", ["__metadata__"]),
    "BOOL byte 2": ({"t": entry("BOOL", (2,), (0, 2))}, None, b"\x01\x02", ["BOOL"]),
    "misplaced checksum": ({"t": entry(), "__metadata__": {"content_sha256": "0" * 64}}, None,
                           b"\0" * 8, ["content_sha256"]),
}


@pytest.mark.parametrize("case", CORRUPT_FILES)
def test_corrupt_files_are_refused_naming_the_file(tmp_path, case):
    header, header_length, data, words = CORRUPT_FILES[case]
    path = write_raw(tmp_path / "bad.safetensors", header, data, header_length)
    assert_refused(path, *words)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_file(tmp_path / "missing.safetensors")
    assert_refused(tmp_path, "directory")


def checksummed_file(path) -> bytes:
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "ids": torch.arange(3, dtype=torch.uint8)}
    save_file(tensors, path, {"base": "tiny"})
    return path.read_bytes()


@given(position=st.integers(0, 10**6), mask=st.integers(1, 255))
def test_any_flipped_byte_is_detected(tmp_path_factory, position, mask):
    path = tmp_path_factory.mktemp("st") / "t.safetensors"
    data = bytearray(checksummed_file(path))
    data[position % len(data)] ^= mask
    path.write_bytes(data)
    assert_refused(path)


@pytest.mark.parametrize("old, new", [(b"c", b"d"), (b"o", b"\\"), (b"_", b"-")])
def test_damage_to_the_checksum_key_is_not_taken_for_a_missing_checksum(tmp_path, old, new):
    """A one-byte change in "content_sha256" still leaves valid JSON (`\\n` is an escape), but the
    header's first bytes still identify the file as checksummed."""
    path = tmp_path / "t.safetensors"
    data = checksummed_file(path)
    at = data.index(b'"content_sha256"') + 1
    at += data[at:].index(old)
    path.write_bytes(data[:at] + new + data[at + 1:])
    assert_refused(path, "content_sha256 does not match")


@given(keep=st.integers(0, 10**6))
def test_every_truncation_is_detected(tmp_path_factory, keep):
    path = tmp_path_factory.mktemp("st") / "t.safetensors"
    data = checksummed_file(path)
    path.write_bytes(data[:keep % len(data)])
    assert_refused(path)


def test_files_without_checksum_load_unless_one_is_required(tmp_path):
    path = write_raw(tmp_path / "peft.safetensors", {"__metadata__": {"format": "pt"},
                                                     "t": entry()}, b"\0" * 8)
    tensors, metadata = load_file(path)
    assert metadata == {"format": "pt"} and tensors["t"].tolist() == [0.0, 0.0]
    assert_refused(path, "no content_sha256", require_checksum=True)
    save_file({"t": torch.zeros(2)}, tmp_path / "ours.safetensors")
    load_file(tmp_path / "ours.safetensors", require_checksum=True)


def test_our_file_rewritten_by_the_reference_is_refused(tmp_path):
    """Its checksum entry survives the rewrite but no longer describes the bytes."""
    safetensors = pytest.importorskip("safetensors")
    from safetensors.torch import load_file as reference_load
    from safetensors.torch import save_file as reference_save
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.arange(3.0)}, path, {"note": "x"})
    with safetensors.safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
    reference_save(reference_load(str(path)), str(path), {**metadata, "note": "edited"})
    assert_refused(path, "content_sha256")


# -------------------------------------------------------------------------------------------------
# Bad arguments to save_file / load_file

@pytest.mark.parametrize("tensors, metadata, error, words", [
    ([torch.zeros(1)], None, TypeError, "tensors must be a dict"),
    ({1: torch.zeros(1)}, None, TypeError, "must be a str"),
    ({"__metadata__": torch.zeros(1)}, None, ValueError, "reserved"),
    ({"w": [1.0]}, None, TypeError, "tensors['w'] must be a torch.Tensor"),
    ({"w": torch.zeros(1, dtype=torch.complex64)}, None, ValueError, "dtype torch.complex64"),
    ({"w": torch.zeros(1, device="meta")}, None, ValueError, "meta"),
    ({"w": torch.zeros(2).to_sparse()}, None, ValueError, "dense"),
    ({"w": torch.zeros(1)}, {"k": 1}, TypeError, "metadata must map str to str"),
    ({"w": torch.zeros(1)}, [("k", "v")], TypeError, "metadata must be a dict"),
    ({"w": torch.zeros(1)}, {"content_sha256": "x"}, ValueError, "reserved"),
])
def test_save_file_refuses_bad_input(tmp_path, tensors, metadata, error, words):
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        save_file(tensors, tmp_path / "t.st", metadata)
    assert os.listdir(tmp_path) == []


def test_bad_paths_and_devices(tmp_path):
    with pytest.raises(TypeError, match="path"):
        save_file({}, 3)
    with pytest.raises(ValueError, match="path"):
        load_file("")
    save_file({"w": torch.zeros(1)}, tmp_path / "t.st")
    with pytest.raises(ValueError, match="device"):
        load_file(tmp_path / "t.st", device="gpu7")


def test_big_endian_hosts_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "byteorder", "big")
    with pytest.raises(RuntimeError, match="big-endian"):
        save_file({"w": torch.zeros(1)}, tmp_path / "t.st")
    with pytest.raises(RuntimeError, match="big-endian"):
        load_file(tmp_path / "t.st")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_round_trip(tmp_path):
    tensors = {"w": torch.randn(3, 4, device="cuda")}
    save_file(tensors, tmp_path / "t.st")
    loaded, _ = load_file(tmp_path / "t.st", device="cuda")
    assert loaded["w"].is_cuda
    assert_same_tensors({"w": loaded["w"].cpu()}, {"w": tensors["w"].cpu()})


# -------------------------------------------------------------------------------------------------
# atomic_write and remove_stale_temporaries

def test_atomic_write_replaces_the_file_with_the_usual_mode(tmp_path):
    path = tmp_path / "sub" / "out.bin"
    atomic_write(path, lambda file: file.write(b"first"))
    atomic_write(path, lambda file: file.write(b"second"))
    assert path.read_bytes() == b"second"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
    assert os.listdir(path.parent) == ["out.bin"]


def test_atomic_write_leaves_no_temporary_file_when_the_writer_raises(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def failing_writer(file):
        file.write(b"half of it")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(path, failing_writer)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]
    with pytest.raises(TypeError, match="write"):
        atomic_write(path, b"not callable")
    with pytest.raises(ValueError, match="directory"):
        atomic_write(tmp_path, lambda file: None)


def dead_pid() -> int:
    """The id of a process that has just ended (and been reaped): no process has it now."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_remove_stale_temporaries_removes_leftovers_and_nothing_else(tmp_path):
    gone, alive = dead_pid(), os.getpid()
    keep = ["model.safetensors", "tmp-not-hidden", ".tmpfile", "a.tmp-x", ".tmp-abc123",
            ".tmp-x.pt", ".tmp-notes.txt", f".tmp-{alive}-abcd1234", f".tmp-{gone}-abcd123",
            f".tmp-{gone}-abcd1234.txt", f".tmp-{gone}-ABCD1234"]
    stale = [f".tmp-{gone}-abcd1234", f".tmp-{gone}-x_9y8z7w"]
    for name in keep + stale:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / f".tmp-{gone}-folder01").mkdir()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / f".tmp-{gone}-inner012").write_bytes(b"x")
    os.symlink(tmp_path / "model.safetensors", tmp_path / f".tmp-{gone}-link0123")

    removed = remove_stale_temporaries(tmp_path)
    assert removed == sorted(str(tmp_path / name) for name in stale)
    assert sorted(os.listdir(tmp_path)) == sorted(
        keep + [f".tmp-{gone}-folder01", "sub", f".tmp-{gone}-link0123"])
    assert os.listdir(tmp_path / "sub") == [f".tmp-{gone}-inner012"]
    assert remove_stale_temporaries(tmp_path) == []
    assert remove_stale_temporaries(tmp_path / "does-not-exist") == []


def test_nothing_is_removed_through_a_link_out_of_the_root(tmp_path):
    """The probe: an adapter folder of the run that is a link to a folder elsewhere."""
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run.mkdir()
    elsewhere.mkdir()
    leftover = elsewhere / f".tmp-{dead_pid()}-abcd1234"
    leftover.write_bytes(b"someone else's")
    os.symlink(elsewhere, run / "adapter-lora")
    assert remove_stale_temporaries(run / "adapter-lora", root=run) == []
    assert leftover.exists()
    (run / "inside").mkdir()
    os.replace(leftover, run / "inside" / leftover.name)
    assert remove_stale_temporaries(run / "inside", root=run) == [
        str(run / "inside" / leftover.name)]


def test_atomic_write_names_its_temporary_with_its_pid_and_the_file_in_os_errors(tmp_path):
    seen = []

    def writer(file):
        seen.extend(os.listdir(tmp_path))
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError, match="No space left on device") as error:
        atomic_write(tmp_path / "t.st", writer)
    assert error.value.filename == str(tmp_path / "t.st") and error.value.errno == errno.ENOSPC
    (name,) = seen
    assert safetensors_io.TEMPORARY_NAME.fullmatch(name)[1] == str(os.getpid())
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError) as error:
        atomic_write(tmp_path / "gone" / "t.st", lambda file: None, make_folder=False)
    assert error.value.filename == str(tmp_path / "gone" / "t.st")


def test_a_file_size_limit_is_an_os_error_naming_the_file(tmp_path):
    """`ulimit -f`: Python ignores SIGXFSZ, so the write fails with EFBIG, named."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OSError) as error:
            atomic_write(tmp_path / "big.bin", lambda file: file.write(b"x" * 100_000))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert error.value.errno == errno.EFBIG and error.value.filename == str(tmp_path / "big.bin")
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_temporary_left_by_a_killed_writer_is_removed(tmp_path):
    """A process that dies inside atomic_write (os._exit: no cleanup runs) leaves its ".tmp-*"."""
    child = os.fork()
    if child == 0:  # the child writes half a file and dies without unwinding
        atomic_write(tmp_path / "t.st",
                     lambda file: (file.write(b"half"), file.flush(), os._exit(9)))
        os._exit(0)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 9
    (leftover,) = os.listdir(tmp_path)
    assert leftover.startswith(".tmp-") and (tmp_path / leftover).read_bytes() == b"half"
    assert remove_stale_temporaries(tmp_path) == [str(tmp_path / leftover)]
    assert os.listdir(tmp_path) == []
