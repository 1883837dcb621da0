"""NF4 by lookup tables, chunk by chunk: nf4.quantize_nf4 and nf4.dequantize_nf4, bit for bit.

The references search the sorted code with `torch.bucketize` and make a tensor per step over the
whole weight. Here the nearest-code search is two gathers and a compare, a byte's two values are
one int64 gather, and the work goes in chunks of whole blocks that stay in cache, each result
written once (fresh memory costs a page fault a page). The code tables come in as arguments
(nf4.nf4_code(), nf4.dynamic_code()): this module imports no concept module. Arguments are checked
by the caller; these take what the references accept.

Proved equal to the references by tests/test_nf4.py::test_lookup_kernels_pass_the_oracle
(oracle.check_nf4_quantize and oracle.check_nf4_dequantize) and the bit-for-bit tests beside it.
"""
import functools
import math

import torch

# Same values as nf4's constants of these names (tests/test_nf4.py checks they agree).
ABSMAX_FLOOR = 1e-38
NESTED_BLOCKSIZE = 256
QUANTIZE_CHUNK_VALUES = 1 << 15  # weights per chunk, rounded down to whole blocks (at least one)
DEQUANTIZE_CHUNK_BYTES = 1 << 17  # packed bytes per chunk, rounded down to whole blocks likewise
LOOKUP_BINS = 64  # bins of [-1, 1] for the nearest NF4 code: bin = trunc(32 s + 32), 32 s exact


@functools.lru_cache(maxsize=None)
def _tables(code_values: tuple, dynamic_values: tuple, device: torch.device) -> dict:
    code = torch.tensor(code_values, dtype=torch.float32)  # (16,), exact: float32 values
    byte = torch.arange(256)
    half = LOOKUP_BINS // 2
    midpoints = (code[:-1] + code[1:]) / 2  # (15,)
    midpoint_bins = midpoints.mul(half).add(half).int()  # (15,) increasing strictly (tested)
    count_below = torch.searchsorted(midpoint_bins, torch.arange(LOOKUP_BINS + 1).int())  # (65,)
    # (65,) the midpoint in each bin, inf where a bin holds none
    midpoint_in_bin = torch.full((LOOKUP_BINS + 1,), math.inf)
    midpoint_in_bin.index_put_((midpoint_bins.long(),), midpoints)
    # byte b: the float32 pair (q[b >> 4], q[b & 15]) as one int64, in memory order
    pairs = torch.stack([code[byte >> 4], code[byte & 0x0F]], dim=1)  # (256, 2)
    dynamic = torch.tensor(dynamic_values, dtype=torch.float32)  # (256,)
    return dict(count_below=count_below.to(device, torch.uint8),
                midpoint_in_bin=midpoint_in_bin.to(device),
                pairs=pairs.view(torch.int64).view(256).to(device),
                zero_index=code_values.index(0.0),
                dynamic=dynamic.to(device),
                dynamic_midpoints=((dynamic[:-1] + dynamic[1:]) / 2).to(device))


def lookup_tables(code: torch.Tensor, dynamic: torch.Tensor, device) -> dict:
    """The tables for NF4 `code` (16,) and the `dynamic` map (256,) on `device`, built once."""
    return _tables(tuple(code.tolist()), tuple(dynamic.tolist()), torch.device(device))


def nearest_nf4_index_lookup(scaled: torch.Tensor, tables: dict) -> torch.Tensor:
    """nf4.nearest_code_index(scaled, nf4_code()) for s in [-1 - 2^-22, 1 + 2^-22] (as scaling by
    the absmax makes them), uint8: the bin map is monotone, so midpoints in lower bins are below s,
    those in higher bins above; only the one in s's bin needs the (strict) compare."""
    bins = scaled.mul(LOOKUP_BINS // 2).add_(LOOKUP_BINS // 2).int().view(-1)  # (n,)
    index = torch.index_select(tables["count_below"], 0, bins)  # (n,) midpoints in lower bins
    above = scaled.view(-1) > torch.index_select(tables["midpoint_in_bin"], 0, bins)  # (n,)
    return index.add_(above).view(scaled.shape)


def _absmax_and_scaled(flat: torch.Tensor, blocksize: int):
    """nf4.blockwise_absmax and nf4.scale_blocks in one go: (absmax (nblocks,), s (n,)) float32."""
    full = flat.numel() - flat.numel() % blocksize
    absmax = flat[:full].view(-1, blocksize).abs().amax(dim=1)  # (n_full / B,)
    if full < flat.numel():
        absmax = torch.cat([absmax, flat[full:].abs().amax().view(1)])  # (nblocks,)
    absmax = absmax.float()
    safe = absmax.clamp(min=ABSMAX_FLOOR)
    reciprocal = safe[: full // blocksize].reciprocal().unsqueeze(1)  # (n_full / B, 1)
    scaled_full = flat[:full].view(-1, blocksize) * reciprocal  # (n_full / B, B)
    scaled_last = flat[full:] / safe[full // blocksize:]  # (n - n_full,) / (0 or 1,)
    return absmax, torch.cat([scaled_full.view(-1), scaled_last])


def _pack(indices: torch.Tensor, pad_index: int) -> torch.Tensor:
    """nf4.pack_nibbles: byte j = k[2j] << 4 | k[2j+1], an odd count padded with pad_index."""
    if indices.numel() % 2:
        indices = torch.cat([indices, indices.new_full((1,), pad_index)])  # (n+1,)
    pairs = indices.view(-1, 2)  # (n/2, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def quantize_nf4_chunked(w: torch.Tensor, blocksize: int, double_quant: bool,
                         tables: dict) -> dict:
    """nf4.quantize_nf4(w, blocksize, double_quant)'s tensors, bit for bit: {"packed", "absmax",
    "nested_absmax", "offset"} (the last two None without double quantization). w finite;
    `tables`: lookup_tables(nf4_code(), dynamic_code(), w.device)."""
    flat = w.detach().reshape(-1)  # (n,)
    step = max(QUANTIZE_CHUNK_VALUES // blocksize, 1) * blocksize  # whole blocks, an even count
    absmax = [w.new_empty(0, dtype=torch.float32)]
    packed = [w.new_empty(0, dtype=torch.uint8)]
    for chunk in flat.split(step):  # (m,), the last chunk may end in a partial block
        scales, scaled = _absmax_and_scaled(chunk, blocksize)
        absmax.append(scales)
        packed.append(_pack(nearest_nf4_index_lookup(scaled, tables), tables["zero_index"]))
    absmax = torch.cat(absmax)
    if flat.numel() % blocksize:  # bitsandbytes stores a partial block's absmax clamped
        absmax[-1:].clamp_(min=ABSMAX_FLOOR)
    result = dict(packed=torch.cat(packed), absmax=absmax, nested_absmax=None, offset=None)
    if double_quant:
        # nf4.double_quantize: c2 - mean(c2) to the nearest dynamic code, in blocks of 256
        offset = absmax.mean() if absmax.numel() else absmax.new_zeros(())
        nested_absmax, scaled = _absmax_and_scaled(absmax - offset, NESTED_BLOCKSIZE)
        codes = torch.bucketize(scaled, tables["dynamic_midpoints"], right=False)
        result.update(absmax=codes.to(torch.uint8), nested_absmax=nested_absmax, offset=offset)
    return result


def _block_scales(q, tables) -> torch.Tensor:
    """nf4.block_scales(q), bit for bit, in a few calls: scales padded to whole nested blocks."""
    if q.nested_blocksize is None:
        return q.absmax
    scales = q.nested_absmax.new_empty(q.nested_absmax.numel(), NESTED_BLOCKSIZE)  # padded
    codes = q.absmax.int()
    torch.index_select(tables["dynamic"], 0, codes, out=scales.view(-1)[: codes.numel()])
    # c2^ = dynamic[codes] * c1 + offset     (nnested, 256) * (nnested, 1) + ()
    return scales.mul_(q.nested_absmax[:, None]).add_(q.offset).view(-1)[: codes.numel()]


def dequantize_nf4_chunked(q, dtype, tables: dict, *,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """nf4.dequantize_nf4(q, dtype), bit for bit, for q an nf4.NF4Weight (read by its fields): a
    byte's values gathered as an int64 into a float32 buffer in cache, then scaled into a new
    tensor or `out` (contiguous, q.shape, on q's device). dtype None: out's, else q.dtype.
    `tables`: lookup_tables(nf4_code(), dynamic_code(), q's device), looked up once by the caller
    (building their key from the code tables costs a quarter of a small layer's dequantize)."""
    device = q.packed.device
    if out is not None and not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if dtype is None:
        dtype = q.dtype if out is None else out.dtype
    if out is not None and (out.dtype, out.shape, out.device, out.is_contiguous()) != (
            dtype, q.shape, device, True):
        raise ValueError(f"out must be contiguous, {dtype}, {tuple(q.shape)}, on {device}")
    absmax = _block_scales(q, tables)
    n = q.numel
    blocksize = q.blocksize
    full = n - n % blocksize
    dst = torch.empty(n, dtype=dtype, device=device) if out is None else out.view(-1)
    step = max(2 * DEQUANTIZE_CHUNK_BYTES // blocksize, 1) * blocksize  # values per chunk
    work = torch.empty(min(step, full), device=device)  # float32, reused chunk after chunk
    for start in range(0, full, step):
        stop = min(start + step, full)
        packed = q.packed[start // 2: stop // 2].int()  # (m/2,) int32
        torch.index_select(tables["pairs"], 0, packed, out=work.view(torch.int64)[: packed.numel()])
        # w^ = q[k] * c_b     (m/B, B) * (m/B, 1), rounded once into the output's dtype
        scales = absmax[start // blocksize: stop // blocksize, None]
        torch.mul(work[: stop - start].view(-1, blocksize), scales,
                  out=dst[start:stop].view(-1, blocksize))
    if full < n:  # the partial last block and the odd-count pad: q[k_i] * c_last
        last = tables["pairs"][q.packed[full // 2:].long()].view(torch.float32)[: n - full]
        dst[full:] = last * absmax[-1]
    return dst.view(q.shape) if out is None else out
