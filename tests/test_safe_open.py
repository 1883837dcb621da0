"""formats/safe_open.py and every reader built on it: a FIFO, socket, device or folder where a file
is expected is one line naming the path (never a hang), and a huge file whose first bytes lie is
refused having read those bytes only (sparse files: gigabytes on paper, nothing on disk)."""

import json
import os
import signal
import socket
import tracemalloc

import pytest
import torch

import oracle_kit.golden
from formats import adapter_files, safe_open, safetensors_io
from training import runs

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")

GIB = 2**30


@pytest.fixture
def no_hang():
    """Fail (instead of hanging the suite) if a read blocks for 5 s: what a FIFO did."""
    def timeout(signum, frame):
        raise TimeoutError("blocked for 5 s: a FIFO was opened as if it were a file")
    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(5)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def fifo(path) -> str:
    os.mkfifo(path)
    return str(path)


def one_line_error(error) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize("read", [
    lambda p: safetensors_io.load_file(p),
    lambda p: runs.read_checkpoint(p),
    lambda p: runs.read_json(p),
    lambda p: safe_open.load_json(p),
    lambda p: safe_open.read_regular(p, 100),
], ids=["safetensors", "checkpoint", "run-json", "json", "bytes"])
def test_every_reader_refuses_a_fifo_a_socket_a_device_and_a_folder(tmp_path, no_hang, read):
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "sock"))
    try:
        for path, kind in ((fifo(tmp_path / "pipe"), "a FIFO"), (str(tmp_path / "sock"), "socket"),
                           ("/dev/zero", "a character device"), (str(tmp_path), "a directory")):
            with pytest.raises(safe_open.NotRegularFile) as error:
                read(path)
            assert one_line_error(error).startswith(f"{path}: is ") and kind in str(error.value)
    finally:
        server.close()


def test_an_adapter_folder_with_a_fifo_config_or_tensor_file_is_one_line(tmp_path, no_hang):
    folder = tmp_path / "adapter"
    folder.mkdir()
    fifo(folder / adapter_files.CONFIG_FILE)
    (folder / adapter_files.TENSOR_FILE).write_bytes(b"x")
    with pytest.raises(safe_open.NotRegularFile, match="adapter_config.json: is a FIFO"):
        adapter_files.read_adapter(folder)
    os.remove(folder / adapter_files.CONFIG_FILE)
    (folder / adapter_files.CONFIG_FILE).write_text('{"peft_type": "LORA"}')
    os.remove(folder / adapter_files.TENSOR_FILE)
    (folder / adapter_files.TENSOR_FILE).mkdir()
    with pytest.raises(safe_open.NotRegularFile, match="adapter_model.safetensors: is a dir"):
        adapter_files.read_adapter(folder)


def test_verify_reads_no_fifo_and_nothing_outside_its_folder(tmp_path, no_hang, capsys):
    """The probes: a FIFO manifest; manifest `file` entries that leave DIR ("../", absolute
    paths, a link out); a case that is a string. Each is a line, never a read."""
    golden = tmp_path / "golden"
    golden.mkdir()
    fifo(golden / "manifest.json")
    assert oracle_kit.golden.main(["verify", str(golden)]) == 1
    assert "manifest.json: unreadable" in capsys.readouterr().out
    os.remove(golden / "manifest.json")
    outside = tmp_path / "outside.safetensors"
    safetensors_io.save_file({"w": torch.zeros(2)}, outside)
    os.symlink(outside, golden / "link.safetensors")
    names = ["../outside.safetensors", str(outside), "link.safetensors", "sub/x", "..", ""]
    cases = [{"file": name, "function": "nf4.quantize_nf4", "args": {}, "inputs": ["w"],
              "outputs": []} for name in names] + ["a string"]
    content = {"cases": cases, "tables": oracle_kit.golden.tables()}
    manifest = {**content, "cases_sha256": oracle_kit.golden._digest(content)}
    (golden / "manifest.json").write_text(json.dumps(manifest))
    assert oracle_kit.golden.main(["verify", str(golden)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(cases) + 1, lines
    for line in lines[:len(names) - 1]:
        assert "not a plain file name" in line or "a link out of" in line, line
    assert "a case of the manifest is a JSON object, not str" in lines[len(cases) - 1]


def test_golden_into_a_path_under_a_file_is_one_line_and_status_2(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert oracle_kit.golden.main(["golden", str(tmp_path / "file" / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("oracle.py: cannot write") and "\n" not in err


def sparse(path, size: int, head: bytes) -> str:
    with open(path, "wb") as file:
        file.write(head)
        file.truncate(size)  # a hole: `size` bytes on paper, one block on disk
    return str(path)


def peak_bytes(call) -> int:
    """Peak Python-allocated bytes during call() (bytearray and bytes buffers included)."""
    tracemalloc.start()
    try:
        call()
    except ValueError:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_a_sparse_2_gib_safetensors_file_with_a_lying_header_is_refused_cheaply(tmp_path):
    """The probe: the header claims 2^40 data bytes; 2.3 GB peak before the fix."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [2**40],
                               "data_offsets": [0, 2**40]}}).encode()
    path = sparse(tmp_path / "big.safetensors", 2 * GIB,
                  len(header).to_bytes(8, "little") + header)
    with pytest.raises(ValueError, match="offsets cover 1099511627776 data bytes but the file "
                                         "holds 2147483"):
        safetensors_io.load_file(path)
    assert peak_bytes(lambda: safetensors_io.load_file(path)) < 2**20
    lying_length = sparse(tmp_path / "length.safetensors", 2 * GIB, (2**62).to_bytes(8, "little"))
    with pytest.raises(ValueError, match="header length 4611686018427387904 goes beyond"):
        safetensors_io.load_file(lying_length)
    assert peak_bytes(lambda: safetensors_io.load_file(lying_length)) < 2**20


def test_a_sparse_4_gib_checkpoint_is_refused_having_read_its_first_line(tmp_path):
    """The probe: `--resume` with a 4 GiB sparse finetune-lora.pt peaked at 4.6 GB."""
    path = sparse(tmp_path / "finetune-lora.pt", 4 * GIB, b"")
    with pytest.raises(runs.CorruptFile, match="not a checkpoint of this project"):
        runs.read_checkpoint(path)
    assert peak_bytes(lambda: runs.read_checkpoint(path)) < 2**20
    # The right first line and a wrong SHA-256: hashed piece by piece, never held whole (a small
    # file here, so the test stays fast; the bound is the piece size, not the file's).
    lying = sparse(tmp_path / "lying.pt", 64 * 2**20, runs.CHECKPOINT_MAGIC + b"0" * 64 + b"\n")
    with pytest.raises(runs.CorruptFile, match="does not match its SHA-256"):
        runs.read_checkpoint(lying)
    assert peak_bytes(lambda: runs.read_checkpoint(lying)) < 4 * safe_open.CHUNK_BYTES


def test_json_files_too_big_or_nested_too_deep_are_one_line(tmp_path):
    big = sparse(tmp_path / "run.json", 2 * GIB, b"{")
    with pytest.raises(ValueError, match="more than the 16,777,216 a file of this kind may hold"):
        safe_open.load_json(big)
    assert peak_bytes(lambda: safe_open.load_json(big)) < 2**20
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError, match="nested too deeply") as error:
        safe_open.load_json(deep)
    one_line_error(error)
    payload = "[" * 200_000 + "]" * 200_000
    (tmp_path / "results.json").write_text(f'{{"sha256": "0", "payload": {payload}}}')
    with pytest.raises(runs.CorruptFile, match="not a JSON file of this project"):
        runs.read_json(tmp_path / "results.json")
