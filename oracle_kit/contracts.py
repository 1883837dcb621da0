"""The port contracts: what a correct implementation in another language, order or device may
differ in, and by how much. docs/oracle.md states and derives each rule; this module computes them.

- NF4 double quantization: the offset is the mean of the block scales, a sum whose float32 value
  depends on the order of its additions. A candidate's offset is accepted within
  offset_tolerance_ulps(n) ulps of the correctly rounded mean (any order of n float32 additions of
  positive terms, then the division), and its nested codes and nested absmax are checked exactly
  against what the reference makes of its own offset (nested_given_offset).
- AdamW (check_adamw_step(exact=False), and `compare`): the exact values in float64, and a
  tolerance per output from a first-order error bound of any float32 implementation
  (adamw_exact_calls): float32 hyperparameters (1.0f - 0.999f), the decay folded into the update,
  fused multiply-adds, a correctly rounded or a 1-ulp sqrt, bias corrections on the moments.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch

import nf4

U = 2.0**-24  # unit roundoff of float32
# Roundings a float32 AdamW implementation may spend on one update of one element, counted on the
# absolute terms of each line (products, sums, the hyperparameters' own float32 rounding): torch's
# lerp is 2-3, the textbook's beta1 m + (1 - beta1) g 3, a folded decay 3-4; 4 covers each.
ADAMW_ROUNDINGS = 4
# The bound is first-order (it ignores products of two errors and the float64 values' own 1e-16):
# twice it leaves room for both, while a bfloat16 state (2^-9) or a missing bias correction is far.
ADAMW_SAFETY = 2.0


# ----------------------------------------------------------------------------- float32 facts
def round_float32(x: Fraction) -> float:
    """x correctly rounded to float32 (to nearest, ties to even; subnormals as IEEE 754)."""
    if x == 0:
        return 0.0
    sign, x = (-1 if x < 0 else 1), abs(x)
    exponent = x.numerator.bit_length() - x.denominator.bit_length()  # 2^e <= x < 2^(e+2)
    if Fraction(2) ** exponent > x:
        exponent -= 1
    elif Fraction(2) ** (exponent + 1) <= x:
        exponent += 1
    quantum = Fraction(2) ** (max(exponent, -126) - 23)  # the float32 spacing at x
    return sign * float(round(x / quantum) * quantum)


def ulp_float32(x: float) -> float:
    """The spacing of float32 values at |x| (2^-149 at and below the subnormals)."""
    x = abs(x)
    if x < 2.0**-126:
        return 2.0**-149
    return 2.0 ** (math.frexp(x)[1] - 1 - 23)


def correctly_rounded_mean(values: torch.Tensor) -> float:
    """The mean of float32 `values`, computed exactly (as fractions) and rounded once to float32."""
    total = sum((Fraction(v) for v in values.double().reshape(-1).tolist()), Fraction(0))
    return round_float32(total / max(values.numel(), 1))


def offset_tolerance_ulps(n: int) -> int:
    """Ulps (of the correctly rounded mean) by which a float32 mean of n >= 1 positive values may
    err, summed in any order: |s^ - s| <= gamma_(n-1) s for the sum, one or two roundings more
    for the division (or a product with 1/n): gamma_(n+1) of the mean, gamma_k = k u / (1 - k u),
    which is at most (n + 1) / (1 - (n + 1) u) ulps, plus half an ulp for the correct rounding."""
    k = max(n, 1) + 1
    return math.ceil(k / (1 - k * U) + 0.5)


# ----------------------------------------------------------------------------- NF4
def nested_given_offset(w: torch.Tensor, blocksize: int, offset: torch.Tensor) -> dict:
    """The reference's nested codes ("absmax", uint8) and nested_absmax for the block scales of w
    centred on a candidate's `offset` (float32 scalar): c - offset rounded to float32, then the
    dynamic map's blockwise quantization (blocks of 256, the partial last one divided)."""
    scales = nf4.quantize_nf4(w.cpu(), blocksize, double_quant=False).absmax  # (nblocks,)
    offset = offset.detach().cpu().reshape(()).float()
    codes, nested_absmax = nf4.quantize_blockwise(scales - offset, nf4.dynamic_code(),
                                                  nf4.NESTED_BLOCKSIZE)
    return {"absmax": codes, "nested_absmax": nested_absmax}


# ----------------------------------------------------------------------------- AdamW
def _hyper_error(beta: float) -> float:
    """Relative error of 1 - beta in float32 however computed: fl(1 - beta), or 1.0f - fl(beta)
    (exact by Sterbenz, so all of fl(beta)'s error lands on the difference: 1.3e-5 for 0.999)."""
    if beta >= 1.0 or beta <= 0.0:
        return U
    as_float32 = float(torch.tensor(beta, dtype=torch.float32))
    return max(U, abs(as_float32 - beta) / (1 - beta)) + U


def _correction_error(beta: float, t: int) -> float:
    """Relative error of 1 - beta^t in float32: beta^t off by (t + 2) u of itself (fl(beta) to the
    t-th power, pow's own ulp or two), and the subtraction's rounding."""
    power = beta**t
    return ((t + 2) * U * power + U) / (1 - power)


def adamw_exact_calls(inputs: dict) -> list:
    """For each call of an AdamW case: {name: (exact float64 value, error bound)} of param_after,
    exp_avg_after and exp_avg_sq_after on the CPU. The values follow paged_optim.adamw_step's
    formulas in float64 with the float64 hyperparameters; the bound is the first-order error of
    any float32 implementation (docs/oracle.md derives it line by line), carried from call to call.
    """
    lr, eps, wd, (beta1, beta2) = inputs["lr"], inputs["eps"], inputs["weight_decay"], \
        inputs["betas"]
    p, m, v = (inputs[k].detach().cpu().double() for k in ("param", "exp_avg", "exp_avg_sq"))
    error_p, error_m, error_v = (torch.zeros_like(p) for _ in range(3))
    rounding = ADAMW_ROUNDINGS * U
    rho1, rho2 = _hyper_error(beta1), _hyper_error(beta2)
    calls = []
    for i, grad in enumerate(inputs["grads"]):
        t, g = inputs["step"] + i, grad.detach().cpu().double()
        if wd != 0:  # theta (1 - lr wd), or folded: theta - lr (wd theta + update)
            error_p = error_p + rounding * p.abs()
            p = p * (1 - lr * wd)
        # m = beta1 m + (1 - beta1) g: its terms' roundings, (1 - beta1)'s float32 error on g's
        error_m = error_m + rounding * (beta1 * m.abs() + (1 - beta1) * g.abs()) \
            + rho1 * (1 - beta1) * g.abs()
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g  # a sum of non-negative terms: relative errors
        error_v = error_v + (rounding + rho2) * v
        correction1, correction2 = 1 - beta1**t, 1 - beta2**t
        sigma1, sigma2 = _correction_error(beta1, t), _correction_error(beta2, t)
        root = (v / correction2).sqrt()  # sqrt(v_hat)
        denominator = root + eps
        # sqrt(v) (half v's relative error, 2u for a 1-ulp sqrt), / sqrt(1 - beta2^t), + eps
        relative_v = torch.where(v > 0, error_v / v.clamp_min(1e-300), torch.zeros_like(v))
        relative_d = (relative_v / 2 + sigma2 / 2 + 4 * U) * root / denominator + 2 * U
        update = lr / correction1 * m / denominator
        error_update = lr / correction1 * error_m / denominator \
            + update.abs() * (relative_d + sigma1 + 4 * U)
        error_p = error_p + error_update + rounding * (p.abs() + update.abs())
        p = p - update
        calls.append({"param_after": (p, ADAMW_SAFETY * error_p),
                      "exp_avg_after": (m, ADAMW_SAFETY * error_m),
                      "exp_avg_sq_after": (v, ADAMW_SAFETY * error_v)})
    return calls


def raw_bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of t, flattened, as int64: equal only where the bits are (-0.0 != 0.0)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    integer = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()]
    return t.view(integer).long()
