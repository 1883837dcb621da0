"""In-place low-rank adds: the adapter's term added into the base layer's fresh output.

Both take y (N, out), holding W0 x + b, and add the update into y's memory in one BLAS call or
one elementwise pass, allocating no new (N, out) tensor. So y must be a tensor nothing else holds,
such as a base layer's fresh output (autograd raises if a backward needs it). If y's dtype is not
the adapter's (a bfloat16 base beside float32 adapters), the sum is taken in a copy in the
adapter's dtype and rounded back once. Imports torch only (the ground floor).
"""
from __future__ import annotations

import torch


def add_low_rank_(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                  scaling: float) -> torch.Tensor:
    """y += scaling · x A^T B^T for y (N, out), x (N, in), A (r, in), B (out, r); returns y.

    Equals lora.lora_forward (LoRA eq. 3) up to the rounding of the last multiply-add, proved by
    tests/test_lora.py::test_forward_equals_formula.
    """
    if y.dtype != A.dtype:
        return add_low_rank_(y.to(A.dtype), x, A, B, scaling).to(y.dtype)
    projected = x.to(A.dtype) @ A.t()  # (N, in) @ (in, r) -> (N, r): A x
    # h = W0 x + s B A x   (LoRA, eq. 3), with W0 x + b already in y
    return y.addmm_(projected, B.t(), alpha=scaling)  # (N, out) += s (N, r) @ (r, out)


def add_vera_(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
              lambda_d: torch.Tensor, lambda_b: torch.Tensor) -> torch.Tensor:
    """y += Λ_b B Λ_d A x for y (N, out), x (N, in), A (r, in), B (out, r); returns y.

    Equals vera.vera_forward (VeRA eq. 2) up to rounding, proved by
    tests/test_vera.py::test_forward_equals_the_equation.
    Right to left as eq. 2 reads (and PEFT computes): Λ_d scales the r columns of A x, B maps them
    to (N, out), and λ_b scales that while it is added into y, in one pass (addcmul_). Folding Λ_b
    into B instead (Λ_b B, (out, r)) saves that pass, but its gradient is a matmul over the
    tokens, which costs more at VeRA's ranks (docs/vera.md#the-forward).
    """
    if y.dtype != A.dtype:
        return add_vera_(y.to(A.dtype), x, A, B, lambda_d, lambda_b).to(y.dtype)
    scaled = (x.to(A.dtype) @ A.t()) * lambda_d  # (N, in) @ (in, r) -> (N, r): Λ_d A x
    # h = W0 x + b + Λ_b B Λ_d A x   (VeRA, eq. 2), with W0 x + b in y
    return y.addcmul_(scaled @ B.t(), lambda_b)  # (N, out) += ((N, r) @ (r, out)) ⊙ (out,)
