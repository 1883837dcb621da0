"""The cases behind oracle.py: what each checker draws, and the fixed cases of the golden files.

A case is a dict of plain Python values (shapes, dtype names, parameters, the kind of values, a
seed), so that a failing one can be printed and pasted back; `case_inputs(contract, case, device)`
makes its tensors on the CPU from the seed (the same numbers for every device), then moves them.
The kinds of values are those that catch real mistakes:
- NF4 weights: "normal"; "heavy" tails (normal times a log-normal scale); "nf4_ties" (each block's
  absmax a power of two, the other values the 15 NF4 midpoints times it: the scaled values lie
  exactly on the midpoints in float32, near them in 16 bits); "zero_blocks" (every other block and
  the last, maybe partial, block all zeros); "dynamic_ties" (block scales such that with double
  quantization the centred scales lie exactly on midpoints of the 8-bit dynamic map);
  "partial_ties" (in the partial last block, values w whose w / c and w * (1 / c) fall on either
  side of an NF4 midpoint: that block divides, the full ones multiply by the reciprocal);
  "nested_ties" (float32; more than 512 block scales whose sum is exact in any order, so the
  offset is exactly 1.0 however it is summed, and in the partial last nested block centred scales
  t whose t / a and t * (1 / a) fall on either side of a midpoint of the 8-bit dynamic map).
- NF4Weight to dequantize: those, quantized, or "random_bytes" (every nibble, every 8-bit code).
- adapters: odd widths, rank 1, leading dims (), (n,), (a, b), bias or not, 16-bit bases (float32
  adapters beside them, as adapters.adapter_dtype does), B not zero; for DoRA maybe a zero row.
- AdamW: 1-3 consecutive calls from step 1 (zero state) or late steps, tiny gradients where eps
  dominates the denominator, zero gradients, weight decay on and off.
The paper each contract comes from is cited in oracle_kit/references.py.
"""
from __future__ import annotations

import functools
import math

import torch
from hypothesis import strategies as st

import nf4

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NF4_VALUES = ("normal", "heavy", "nf4_ties", "zero_blocks", "dynamic_ties", "partial_ties",
              "nested_ties")
# Block counts drawn: 1-3 blocks, or several nested blocks of 256 scales (the last one partial),
# for which the blocksize is 32 or 64 to keep a case small.
NF4_BLOCK_COUNTS = (1, 2, 3, 300, 700)
NESTED_TIE_GRID = 2.0**-13  # nested_ties' scales: multiples of this in (0.5, 1.5), sums exact
SCALINGS = (0.5, 1.0, 2.0, 16 / 3, 8 / math.sqrt(3))  # alpha / r and rsLoRA's alpha / sqrt(r)
ADAMW_STEPS = (1, 2, 3, 10, 1000, 10**6)
ADAMW_GRADIENTS = ("normal", "tiny", "zero", "large")
# "tiny": |g| ~ 1e-10, so sqrt(v_hat) ~ 1e-10 is far below eps = 1e-8 and eps decides the step
GRADIENT_SCALE = {"normal": 1.0, "tiny": 1e-10, "zero": 0.0, "large": 1e3}


def normal(shape, generator) -> torch.Tensor:
    """Float32 values of mean 0 and variance 1, nearly normal, the same bits on every build: the
    sum of 12 uniform float32 values (multiples of 2^-24) less 6, exact in float64 and rounded
    once (Irwin-Hall). torch.randn's vectorised Box-Muller differs in the last bit between CPU
    capabilities, and the golden files must not."""
    uniform = torch.rand((12, *shape), generator=generator)  # (12, *shape) float32
    return (uniform.double().sum(dim=0) - 6).float()


def _powers_of_two(exponents: torch.Tensor) -> torch.Tensor:
    """2^k for small integer k, float32, by lookup (exact; torch.exp2 need not be)."""
    table = torch.tensor([2.0**k for k in range(-16, 17)])  # (33,)
    return table[exponents.long() + 16]


def _generator(case) -> torch.Generator:
    return torch.Generator().manual_seed(case["seed"])


def _shape(case) -> tuple:
    return (case["cols"],) if case["rows"] == 1 else (case["rows"], case["cols"])


# ----------------------------------------------------------------------------- NF4 weights
def _midpoints(code: torch.Tensor) -> torch.Tensor:
    return (code[:-1] + code[1:]) / 2  # float32, as the reference rounds them


def _block_scales(nblocks: int, generator) -> torch.Tensor:
    """Scales whose double quantization puts the centred scale of block i + 2 exactly on a midpoint
    of the dynamic map, for the midpoints m where 1 + m - 1 == m in float32 (84 of the 255).

    Block 0 holds 2.0, block 1 a balancer searched so that mean() is exactly 1.0, the others 1 + m
    (in a seeded order) and then fillers: the offset is 1, the nested absmax 1, so m is not rounded.
    """
    midpoints = _midpoints(nf4.dynamic_code())
    reachable = midpoints[(1 + midpoints) - 1 == midpoints]  # (84,)
    targets = reachable[torch.randperm(reachable.numel(), generator=generator)]
    scales = torch.ones(nblocks)
    count = max(0, min(nblocks - 2, nf4.NESTED_BLOCKSIZE - 2, targets.numel()))
    while count and abs(1 + float(targets[:count].sum())) > (nblocks - count - 2) * 0.9 + 1:
        count -= 1  # too few fillers to bring the mean back to 1: fewer targets
    scales[2:2 + count] = 1 + targets[:count]
    fillers = nblocks - count - 2
    if fillers > 0:  # fillers take the imbalance, each within (0, 2) so the nested absmax stays 1
        scales[2 + count:] = 1 - (1 + float(targets[:count].sum())) / (fillers + 1)
    if nblocks == 1:
        return scales
    scales[0] = 2.0
    low, high = (torch.tensor(v).view(torch.int32).item() for v in (0.0, 2.0))
    while low < high:  # mean() is monotone in the balancer: bisect its float32 bit pattern
        middle = (low + high) // 2
        scales[1] = torch.tensor(middle, dtype=torch.int32).view(torch.float32)
        low, high = (middle + 1, high) if scales.mean() < 1 else (low, middle)
    scales[1] = torch.tensor(low, dtype=torch.int32).view(torch.float32)
    return scales


def _division_ties(count: int, generator) -> torch.Tensor:
    """count float32 values: an absmax c, then values w (|w| < c) for which w / c and w * (1 / c)
    lie on either side of an NF4 midpoint m, taken from the float32 neighbours of m c."""
    midpoints = _midpoints(nf4.nf4_code())[:, None]  # (15, 1)
    while True:
        c = torch.rand((), generator=generator) * 3 + 0.1  # float32
        near = (midpoints.double() * c.double()).float()  # (15, 1) m c, rounded
        w = (near.view(torch.int32) + torch.arange(-3, 4, dtype=torch.int32)).view(torch.float32)
        split = (w / c > midpoints) != (w * c.reciprocal() > midpoints)  # (15, 7)
        if bool(split.any()):
            return torch.cat([c.view(1), w[split].repeat(count)])[:count]


@functools.lru_cache(maxsize=None)
def _nested_division_ties() -> tuple:
    """(a, ts): a nested absmax a and centred scales t (|t| < a), all multiples of
    NESTED_TIE_GRID, for which t / a and t * (1 / a) lie on either side of a dynamic-map midpoint
    (found by a seeded search: the same pair every run)."""
    midpoints = _midpoints(nf4.dynamic_code())[:, None]  # (255, 1)
    generator = torch.Generator().manual_seed(0)
    grid = NESTED_TIE_GRID
    while True:
        a = torch.randint(int(0.3 / grid), int(0.9 / grid), (), generator=generator) * grid
        a = a.float()
        t = ((torch.round(midpoints.double() * a / grid) + torch.arange(-3, 4)) * grid).float()
        split = ((t / a > midpoints) != (t * a.reciprocal() > midpoints)) & (t.abs() < a)
        if bool(split.any()):
            return float(a), tuple(t[split].tolist())


def _nested_tie_scales(nblocks: int, generator) -> torch.Tensor:
    """nblocks float32 scales 1 + t, t on NESTED_TIE_GRID: every partial sum is a multiple of the
    grid below 2^11, exact in float32 in any order, and the t sum to zero, so the mean is 1.0
    exactly for every summation order; the partial last nested block holds the division ties."""
    grid = NESTED_TIE_GRID
    steps = torch.randint(-int(0.45 / grid), int(0.45 / grid) + 1, (nblocks,), generator=generator)
    a, ties = _nested_division_ties()
    last = nblocks - nblocks % nf4.NESTED_BLOCKSIZE  # the partial nested block's first scale
    if last < nblocks:
        pattern = torch.tensor((a,) + ties * (nf4.NESTED_BLOCKSIZE // (len(ties) + 1)))
        values = pattern[: nblocks - last] / grid
        steps[last:] = values.round().long()  # exact: multiples of the grid, |t| <= a
    # balancers in the first nested block bring the sum of the t to zero, each within +-0.45
    rest = -int(steps.sum())
    i = 0
    while rest:
        change = max(-int(0.45 / grid) - int(steps[i]), min(int(0.45 / grid) - int(steps[i]), rest))
        steps[i] += change
        rest -= change
        i += 1
    return 1 + steps.double() * grid  # (nblocks,) float64, exact in float32


def nf4_weight(case) -> torch.Tensor:
    """The weight of an NF4 case (fields rows, cols, blocksize, dtype, values, seed), on the CPU."""
    generator, n, blocksize = _generator(case), math.prod(_shape(case)), case["blocksize"]
    nblocks = -(-n // blocksize)
    kind = case["values"]
    flat = normal((n,), generator)  # (n,)
    if kind == "heavy":
        # normal times 2^k, k a rounded normal of deviation 3: tails over many binades
        exponents = (3 * normal((n,), generator)).round().clamp(-16, 16)
        flat = (flat * _powers_of_two(exponents)).clamp(-6e4, 6e4)
    elif kind == "nf4_ties":
        code = nf4.nf4_code()
        pattern = torch.cat([_midpoints(code), -_midpoints(code), code])  # (46,)
        pattern = pattern[torch.randperm(46, generator=generator)]
        position = torch.arange(n)
        flat = pattern[(position - position // blocksize - 1) % 46]  # (n,), cycling past the +-1s
        flat[::blocksize] = torch.randint(0, 2, (nblocks,), generator=generator) * 2.0 - 1  # +-1
        exponents = torch.randint(-4, 5, (nblocks,), generator=generator).float()
        flat = flat * _powers_of_two(exponents).repeat_interleave(blocksize)[:n]  # exact
    elif kind == "zero_blocks":
        blocks = torch.arange(n) // blocksize  # (n,) block of each element
        flat[(blocks % 2 == 1) | (blocks == nblocks - 1)] = 0.0
    elif kind == "partial_ties":
        full = n - n % blocksize
        flat[full:] = _division_ties(n - full, generator)
    elif kind in ("dynamic_ties", "nested_ties"):
        scales = _block_scales(nblocks, generator) if kind == "dynamic_ties" else \
            _nested_tie_scales(nblocks, generator).float()
        scales = scales.repeat_interleave(blocksize)[:n]  # (n,)
        flat = scales * (torch.rand(n, generator=generator) * 2 - 1)  # |x| < scale
        flat[::blocksize] = scales[::blocksize]  # each block's absmax is its scale exactly
    return flat.to(DTYPES[case["dtype"]]).view(_shape(case))


def nf4_weight_to_dequantize(case) -> nf4.NF4Weight:
    """The NF4Weight of a dequantize case: the reference's quantization, or random bytes."""
    if case["values"] != "random_bytes":
        weight = nf4_weight({**case, "dtype": case["source_dtype"]})
        return nf4.quantize_nf4(weight, case["blocksize"], case["double_quant"])
    generator, n = _generator(case), math.prod(_shape(case))
    nblocks = -(-n // case["blocksize"])
    packed = torch.randint(0, 256, ((n + 1) // 2,), generator=generator, dtype=torch.uint8)
    if not case["double_quant"]:
        absmax = torch.rand(nblocks, generator=generator) * 4
        nested = offset = nested_blocksize = None
    else:
        absmax = torch.randint(0, 256, (nblocks,), generator=generator, dtype=torch.uint8)
        nested = torch.rand(-(-nblocks // nf4.NESTED_BLOCKSIZE), generator=generator) * 2
        offset, nested_blocksize = torch.rand((), generator=generator) * 2, nf4.NESTED_BLOCKSIZE
    return nf4.NF4Weight(packed, absmax, nested, offset, _shape(case),
                         DTYPES[case["source_dtype"]], case["blocksize"], nested_blocksize)


@st.composite
def nf4_cases(draw, values=NF4_VALUES):
    nblocks = draw(st.sampled_from(NF4_BLOCK_COUNTS))
    blocksizes = nf4.ALLOWED_BLOCKSIZES if nblocks <= 3 else nf4.ALLOWED_BLOCKSIZES[:2]
    blocksize, rows = draw(st.sampled_from(blocksizes)), draw(st.integers(1, 3))
    # the last block short by 0..blocksize-1 elements, then split into rows (rounded up)
    count = nblocks * blocksize - draw(st.integers(0, blocksize - 1))
    kind = draw(st.sampled_from(values))
    # nested_ties' scales need float32's 24 bits: its cases are drawn (and reported) in float32
    dtype = "float32" if kind == "nested_ties" else draw(st.sampled_from(tuple(DTYPES)))
    return {"rows": rows, "cols": -(-count // rows), "blocksize": blocksize,
            "double_quant": draw(st.booleans()), "dtype": dtype, "values": kind,
            "seed": draw(st.integers(0, 2**16))}


@st.composite
def nf4_dequantize_cases(draw):
    case = draw(nf4_cases(values=NF4_VALUES + ("random_bytes",)))
    return {**case, "source_dtype": case["dtype"], "dtype": draw(st.sampled_from(tuple(DTYPES)))}


# ----------------------------------------------------------------------------- adapters
@st.composite
def adapter_cases(draw, contract):
    case = {"lead": draw(st.sampled_from([(), (1,), (3,), (2, 3)])),
            "in_features": draw(st.integers(1, 9)), "out_features": draw(st.integers(1, 9)),
            "r": draw(st.integers(1, 4)), "bias": draw(st.booleans()),
            "dtype": draw(st.sampled_from(tuple(DTYPES))), "seed": draw(st.integers(0, 2**16))}
    if contract != "vera_forward":
        case["scaling"] = draw(st.sampled_from(SCALINGS))
    if contract == "dora_forward":
        case["zero_row"] = draw(st.booleans())
    return case


def adapter_inputs(contract, case) -> dict:
    """x, weight, bias, the adapter's tensors and grad_out (dL/dy) of a case, on the CPU."""
    generator, dtype = _generator(case), DTYPES[case["dtype"]]
    n_in, n_out, r = case["in_features"], case["out_features"], case["r"]

    def randn(*shape, scale=1.0):
        return normal(shape, generator) * scale

    x = randn(*case["lead"], n_in)  # (..., in)
    weight = randn(n_out, n_in, scale=n_in**-0.5)  # (out, in)
    bias = randn(n_out) if case["bias"] else None
    A, B = randn(r, n_in, scale=n_in**-0.5), randn(n_out, r, scale=r**-0.5)  # (r, in), (out, r)
    grad_out = randn(*case["lead"], n_out)  # (..., out)
    inputs = {"x": x.to(dtype), "weight": weight.to(dtype),
              "bias": None if bias is None else bias.to(dtype), "A": A, "B": B}
    if contract == "vera_forward":
        inputs.update(lambda_d=randn(r), lambda_b=randn(n_out))
    else:
        inputs["scaling"] = case["scaling"]
    if contract == "dora_forward":
        if case["zero_row"]:  # a zero row of V: ||V|| = 0 there (PEFT's NaN, its issue 2049)
            inputs["weight"][0], B[0] = 0.0, 0.0
        # ||V_i|| of V = W0 + s B A, each row in exact sums (math.fsum), rounded once: a matmul's
        # or a norm's order of summation may depend on the build, the golden files may not
        W0, s = inputs["weight"].double().tolist(), case["scaling"]
        BA = [[[b * a for b, a in zip(B[i].double().tolist(), A[:, j].double().tolist())]
               for j in range(n_in)] for i in range(n_out)]
        norms = [math.sqrt(math.fsum(math.fsum([W0[i][j], *(s * t for t in BA[i][j])]) ** 2
                                     for j in range(n_in))) for i in range(n_out)]
        magnitude = torch.tensor(norms) * (1 + 0.25 * randn(n_out))  # (out,): ||V|| perturbed
        inputs["magnitude"] = magnitude
    inputs["grad_out"] = grad_out.to(dtype)
    return inputs


# ----------------------------------------------------------------------------- AdamW
@st.composite
def adamw_cases(draw):
    return {"rows": draw(st.integers(1, 3)), "cols": draw(st.integers(1, 17)),
            "step": draw(st.sampled_from(ADAMW_STEPS)), "steps": draw(st.integers(1, 3)),
            "lr": draw(st.sampled_from([1e-3, 1e-2, 0.1, 1.0])),
            "betas": draw(st.sampled_from([(0.9, 0.999), (0.9, 0.95), (0.0, 0.99), (0.5, 0.5)])),
            "eps": draw(st.sampled_from([1e-8, 1e-6, 1e-3])),
            "weight_decay": draw(st.sampled_from([0.0, 0.01, 0.1])),
            "gradients": draw(st.sampled_from(ADAMW_GRADIENTS)),
            "seed": draw(st.integers(0, 2**16))}


def adamw_inputs(case) -> dict:
    """param, grads (steps, *shape), the state before `step`, and the hyperparameters."""
    generator, shape = _generator(case), _shape(case)
    scale = GRADIENT_SCALE[case["gradients"]]
    param = normal(shape, generator)
    grads = normal((case["steps"], *shape), generator) * scale
    late = case["step"] > 1  # at step 1 the state is AdamW's zeros; later a plausible history
    exp_avg = normal(shape, generator) * scale * 0.1 * late
    exp_avg_sq = (normal(shape, generator) * scale) ** 2 * late
    hyper = {name: case[name] for name in ("step", "lr", "betas", "eps", "weight_decay")}
    return {"param": param, "grads": grads, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, **hyper}


# ----------------------------------------------------------------------------- all contracts
def case_inputs(contract: str, case: dict, device="cpu") -> dict:
    """The inputs of `case` for `contract`, drawn on the CPU from its seed, then on `device`."""
    if contract == "nf4_quantize":
        inputs = {"w": nf4_weight(case), "blocksize": case["blocksize"],
                  "double_quant": case["double_quant"]}
    elif contract == "nf4_dequantize":
        inputs = {"q": nf4_weight_to_dequantize(case), "dtype": DTYPES[case["dtype"]]}
    elif contract == "adamw_step":
        inputs = adamw_inputs(case)
    else:
        inputs = adapter_inputs(contract, case)
    return {name: value.to(device) if hasattr(value, "to") and not isinstance(value, torch.dtype)
            else value for name, value in inputs.items()}


STRATEGIES = {"nf4_quantize": nf4_cases, "nf4_dequantize": nf4_dequantize_cases,
              "lora_forward": lambda: adapter_cases("lora_forward"),
              "dora_forward": lambda: adapter_cases("dora_forward"),
              "vera_forward": lambda: adapter_cases("vera_forward"), "adamw_step": adamw_cases}


def _nf4(values, blocksize, rows, cols, dtype="float32", double_quant=False, seed=0, **more):
    return {"rows": rows, "cols": cols, "blocksize": blocksize, "double_quant": double_quant,
            "dtype": dtype, "values": values, "seed": seed, **more}


def _adapter(contract, lead, n_in, n_out, r, bias, dtype, seed=0, **more):
    case = {"lead": lead, "in_features": n_in, "out_features": n_out, "r": r, "bias": bias,
            "dtype": dtype, "seed": seed, **more}
    if contract != "vera_forward":
        case.setdefault("scaling", 2.0)
    if contract == "dora_forward":
        case.setdefault("zero_row", False)
    return case


def _adamw(step, steps, gradients, weight_decay, eps=1e-8, lr=1e-3, rows=2, cols=5, seed=0):
    return {"rows": rows, "cols": cols, "step": step, "steps": steps, "lr": lr,
            "betas": (0.9, 0.999), "eps": eps, "weight_decay": weight_decay,
            "gradients": gradients, "seed": seed}


def _adapter_examples(contract):
    zero_row = {"zero_row": True} if contract == "dora_forward" else {}
    return [_adapter(contract, (), 1, 1, 1, False, "float32"),  # rank 1, one feature each way
            _adapter(contract, (2, 3), 7, 5, 3, True, "bfloat16", **zero_row),
            _adapter(contract, (3,), 9, 2, 4, True, "float16")]


# Cases every checker runs before the drawn ones, whatever the number of examples: the mistakes
# they catch are listed in docs/oracle.md.
EXAMPLES = {
    "nf4_quantize": [
        _nf4("nf4_ties", 32, 1, 49),  # a naive argmin |s - q| takes the upper code at 6 midpoints
        _nf4("dynamic_ties", 32, 1, 32 * 256, double_quant=True),  # ties of the 8-bit map
        _nf4("zero_blocks", 64, 3, 70, "bfloat16", True),  # zero full and partial blocks
        _nf4("heavy", 4096, 1, 2 * 4096 + 1, "float16", True),  # odd count, widest blocks
        _nf4("partial_ties", 64, 1, 64 + 40),  # the partial block divides by its absmax
        # 700 scales: three nested blocks, the last partial and dividing (ties), offset 1.0
        _nf4("nested_ties", 32, 1, 32 * 700 - 5, double_quant=True)],
    "nf4_dequantize": [
        {**_nf4("random_bytes", 32, 1, 1001, "bfloat16", True), "source_dtype": "float32"},
        # 601 scales: nested blocks 0, 1, 2 with different nested absmax (b // 256, not b % 3)
        {**_nf4("random_bytes", 32, 1, 32 * 600 + 17, "float32", True),
         "source_dtype": "bfloat16"},
        {**_nf4("nested_ties", 32, 1, 32 * 700 - 5, "float32", True), "source_dtype": "float32"},
        {**_nf4("zero_blocks", 64, 3, 70, "float32", False), "source_dtype": "float16"},
        {**_nf4("nf4_ties", 128, 1, 300, "float16", True), "source_dtype": "float32"}],
    "lora_forward": _adapter_examples("lora_forward"),
    "dora_forward": _adapter_examples("dora_forward"),
    "vera_forward": _adapter_examples("vera_forward"),
    "adamw_step": [_adamw(1, 3, "normal", 0.1), _adamw(10, 2, "tiny", 0.0),
                   _adamw(10**6, 1, "large", 0.01, eps=1e-6)]}

_NF4_DTYPES = ("float32", "float16", "bfloat16")
_NF4_KINDS = ("normal", "heavy", "nf4_ties", "zero_blocks")
GOLDEN = {
    # every blocksize twice, with each dtype, both settings of double_quant, odd partial blocks
    "nf4_quantize": [_nf4(_NF4_KINDS[i % 4], blocksize, rows=1 + i % 3,
                          cols=(2 * blocksize + 7) // (1 + i % 3), dtype=_NF4_DTYPES[i % 3],
                          double_quant=i % 2 == 1, seed=i)
                     for i, blocksize in enumerate(nf4.ALLOWED_BLOCKSIZES * 2)]
    + EXAMPLES["nf4_quantize"]
    + [_nf4("nf4_ties", 64, 1, 128), _nf4("dynamic_ties", 64, 1, 300 * 64, double_quant=True),
       _nf4("zero_blocks", 128, 1, 100, double_quant=True), _nf4("normal", 32, 1, 7, "bfloat16")],
    "nf4_dequantize": EXAMPLES["nf4_dequantize"]
    + [{**_nf4("heavy", 256, 3, 333, "float32", True), "source_dtype": "bfloat16"},
       {**_nf4("random_bytes", 4096, 1, 4097, "float16", False), "source_dtype": "float16"}],
    "lora_forward": EXAMPLES["lora_forward"],
    "dora_forward": EXAMPLES["dora_forward"],
    "vera_forward": EXAMPLES["vera_forward"],
    # every golden AdamW case has gradients and decay: each fails some planted mistake
    "adamw_step": [_adamw(1, 5, "normal", 0.01), _adamw(1000, 4, "tiny", 0.1, rows=3, cols=7),
                   _adamw(2, 3, "large", 0.1, eps=1e-6, lr=0.1)]}
