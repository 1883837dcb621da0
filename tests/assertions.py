"""Comparisons that teach: on a mismatch, say where, by how much, and what kind of wrong it is.

`assert_same(actual, expected)` is the one helper the tests use to compare tensors. It checks, in
this order, and stops at the first failure:
1. type, shape and dtype;
2. a tolerance for the dtype (float32: rtol 1e-5, atol 1e-6): failing it means *wrong math*;
3. bit equality (unless `exact=False`): failing only this means *right math, other rounding*, e.g.
   a different order of operations, which the message says in so many words.
Each failure names the first differing index, both values (bytes in hex too), the largest
difference and, for right math with other rounding, the distance in ulps (units in the last place,
explained in the message). `blocksize` (elements
of the compared tensor a block: B for NF4 values, B / 2 for their packed bytes) adds the block the
first difference is in.
"""
from __future__ import annotations

import torch
from torch.autograd.gradcheck import GradcheckError

# Tolerances of step 2: a correct formula computed in another order lands well inside them.
TOLERANCES = {  # dtype: (rtol, atol)
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-2, 1e-3),   # 10 mantissa bits: one rounding is 4.9e-4 relative
    torch.bfloat16: (2e-2, 1e-2),  # 7 mantissa bits: one rounding is 3.9e-3 relative
}
_SAME_WIDTH_INT = {torch.float64: torch.int64, torch.float32: torch.int32,
                   torch.float16: torch.int16, torch.bfloat16: torch.int16}


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable floats lie between a and b (elementwise, as int64)."""
    int_dtype = _SAME_WIDTH_INT[a.dtype]
    bits = torch.finfo(a.dtype).bits

    def ordered(x):  # the float's bit pattern as an integer that grows with the float's value
        i = x.contiguous().view(int_dtype).to(torch.int64)
        magnitude = i & ((1 << (bits - 1)) - 1)
        return torch.where(i < 0, -magnitude, magnitude)
    return (ordered(a) - ordered(b)).abs()


def _index(flat_index: int, shape) -> tuple:
    index = []
    for size in reversed(tuple(shape)):
        index.append(flat_index % size)
        flat_index //= size
    return tuple(reversed(index))


def _report(actual, expected, differs, name, kind, blocksize=None) -> str:
    first = int(torch.nonzero(differs.reshape(-1))[0])
    a, e = actual.reshape(-1)[first].item(), expected.reshape(-1)[first].item()
    if actual.dtype == torch.uint8:  # packed nibbles read best in hex: 0x21 against 0x12
        a, e = f"{a} (0x{a:02x})", f"{e} (0x{e:02x})"
    else:
        a, e = repr(a), repr(e)
    lines = [f"{name}: {kind}",
             f"  {int(differs.sum())} of {differs.numel()} elements differ; the first at index "
             f"{_index(first, actual.shape)}: got {a}, expected {e}"]
    if blocksize is not None:
        lines[-1] += f" (block {first // blocksize} of {blocksize} elements)"
    if actual.is_floating_point():
        both = ~(torch.isnan(actual) & torch.isnan(expected))
        diff = (actual.double() - expected.double()).abs()[both & differs]
        if diff.numel():
            lines.append(f"  largest difference {diff.max().item():.6g}")
            if kind.startswith("right math"):  # ulps say how small the difference is
                lines[-1] += (f"; {int(ulps(actual, expected)[differs].max())} ulps apart at most "
                              "(ulp: the gap between neighbouring floats of this dtype; a few ulps "
                              "is rounding, not a formula error)")
    else:
        diff = (actual.long() - expected.long()).abs()
        lines.append(f"  largest difference {int(diff.max())}")
    return "\n".join(lines)


def assert_same(actual, expected, name: str = "tensor", *, exact: bool = True,
                rtol: float | None = None, atol: float | None = None,
                blocksize: int | None = None) -> None:
    """Tolerance first, then (with `exact`) bit equality; NaNs in the same places count as equal."""
    for label, t in (("actual", actual), ("expected", expected)):
        if not isinstance(t, torch.Tensor):
            raise AssertionError(f"{name}: {label} is a {type(t).__name__}, not a torch.Tensor")
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)}, expected "
                             f"{tuple(expected.shape)}")
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{name}: dtype {actual.dtype}, expected {expected.dtype}")
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    if actual.is_floating_point():
        default_rtol, default_atol = TOLERANCES[actual.dtype]
        rtol = default_rtol if rtol is None else rtol
        atol = default_atol if atol is None else atol
        close = torch.isclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True)
        if not bool(close.all()):
            raise AssertionError(_report(actual, expected, ~close, name,
                                         f"wrong: outside rtol={rtol:g}, atol={atol:g}", blocksize))
        if not exact:
            return
        same_bits = actual.view(_SAME_WIDTH_INT[actual.dtype]) == \
            expected.view(_SAME_WIDTH_INT[actual.dtype])
        same = same_bits | (torch.isnan(actual) & torch.isnan(expected))
        if not bool(same.all()):
            raise AssertionError(_report(
                actual, expected, ~same, name,
                "right math, other rounding: within tolerance but not bit-exact (the reference "
                "computes the same formula in another order of operations or precision)",
                blocksize))
        return
    same = actual == expected
    if not bool(same.all()):
        raise AssertionError(_report(actual, expected, ~same, name, "values differ", blocksize))


def assert_gradcheck(function, inputs, name: str = "the hand-written backward") -> None:
    """torch.autograd.gradcheck, failing in one short message instead of its Jacobian dumps."""
    try:
        torch.autograd.gradcheck(function, inputs)
    except GradcheckError as error:
        first = str(error).splitlines()[0].rstrip(",")
        raise AssertionError(
            f"{name} disagrees with central finite differences of the forward: {first} (the "
            "direct comparison's message above shows the values)") from None


def gradients_and_term_sizes(f, inputs, wrt, grad_out):
    """The gradients of f(*inputs), weighted by grad_out, with respect to inputs[i] for i in `wrt`,
    by autograd in float64, and the size of each gradient's terms: the largest entry of the same
    gradients of f on the absolute values of the inputs and of grad_out (every product of the chain
    rule then counts as its magnitude, so each entry is the sum of its terms' magnitudes). A sum of
    k terms computed in another order differs by at most about k·eps times that size. `f` must be a
    polynomial in its inputs with nonnegative coefficients."""
    def grads(values, weights):
        leaves = [t.detach().double().clone().requires_grad_(i in wrt)
                  for i, t in enumerate(values)]
        return torch.autograd.grad(f(*leaves), [leaves[i] for i in wrt], weights.detach().double())
    exact = grads(inputs, grad_out)
    sizes = grads([t.abs() for t in inputs], grad_out.abs())
    return exact, [size.max().item() for size in sizes]
