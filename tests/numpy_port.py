"""A port of NF4 quantization in numpy alone, run against the golden files: docs/oracle.md's worked
example (tests/test_oracle_compare.py::test_a_numpy_port_meets_the_contract runs it).

    python tests/numpy_port.py GOLDEN_DIR CANDIDATE_DIR
    python oracle.py compare GOLDEN_DIR CANDIDATE_DIR --only nf4.quantize_nf4

It reads manifest.json and each nf4.quantize_nf4 case's input `w` (a small safetensors reader),
quantizes it with the tables the manifest pins, takes the offset as np.mean (pairwise summation:
not torch's order), and writes the outputs under the manifest's names. It never imports torch.
"""
import json
import os
import struct
import sys

import numpy as np

DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U8": np.uint8,
          "F64": np.float64}


def read_safetensors(path: str) -> dict:
    """{name: array}: 8 bytes of header length, the JSON header, then the data (bfloat16 is the
    high half of a float32, so it widens exactly by a 16-bit shift)."""
    with open(path, "rb") as file:
        data = file.read()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    header.pop("__metadata__", None)
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        raw = np.frombuffer(data[8 + length + begin:8 + length + end], DTYPES[entry["dtype"]])
        if entry["dtype"] == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = raw.reshape(entry["shape"])
    return tensors


def write_safetensors(path: str, tensors: dict) -> None:
    names = {np.dtype(np.float32): "F32", np.dtype(np.uint8): "U8"}
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        blob = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": names[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path + ".tmp", "wb") as file:
        file.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    os.replace(path + ".tmp", path)


def table(hex_values) -> np.ndarray:
    return np.array([int(h, 16) for h in hex_values], np.uint32).view(np.float32)


def blockwise(x, code, blocksize):
    """(indices, absmax): s = x * (1 / absmax) in full blocks, x / absmax in a partial last one,
    the index the number of float32 midpoints strictly below s (a tie takes the lower code)."""
    n = x.size
    full = n - n % blocksize
    absmax = np.abs(np.concatenate([x, np.zeros(-n % blocksize, np.float32)]))
    absmax = absmax.reshape(-1, blocksize).max(axis=1)  # (nblocks,)
    safe = np.maximum(absmax, np.float32(1e-38))
    scaled = np.concatenate([
        (x[:full].reshape(-1, blocksize) * (np.float32(1) / safe[:full // blocksize, None])
         ).reshape(-1),
        x[full:] / safe[full // blocksize:]])
    midpoints = (code[:-1] + code[1:]) / np.float32(2)
    return np.searchsorted(midpoints, scaled, side="left").astype(np.uint8), absmax


def quantize_nf4(w, blocksize, double_quant, nf4_code, dynamic):
    x = w.reshape(-1).astype(np.float32)
    indices, absmax = blockwise(x, nf4_code, blocksize)
    if x.size % blocksize:
        absmax[-1] = max(absmax[-1], np.float32(1e-38))  # a partial block's absmax is floored
    indices = np.concatenate([indices, np.full(x.size % 2, 7, np.uint8)])  # pad with the zero
    out = {"packed": (indices[0::2] << 4) | indices[1::2], "absmax": absmax}
    if double_quant:
        offset = np.mean(absmax, dtype=np.float32)  # pairwise: within the contract's ulps
        codes, nested = blockwise(absmax - offset, dynamic, 256)
        out.update(absmax=codes, nested_absmax=nested, offset=np.array(offset, np.float32))
    return out


def main(golden: str, candidates: str) -> None:
    with open(os.path.join(golden, "manifest.json"), encoding="utf-8") as file:
        manifest = json.load(file)
    nf4_code, dynamic = table(manifest["tables"]["nf4"]), table(manifest["tables"]["dynamic"])
    os.makedirs(candidates, exist_ok=True)
    for case in manifest["cases"]:
        if case["function"] == "nf4.quantize_nf4":
            w = read_safetensors(os.path.join(golden, case["file"]))["w"]
            out = quantize_nf4(w, case["args"]["blocksize"], case["args"]["double_quant"],
                               nf4_code, dynamic)
            write_safetensors(os.path.join(candidates, case["file"]), out)
    assert "torch" not in sys.modules, "the port must not need torch"


if __name__ == "__main__":
    main(*sys.argv[1:])
