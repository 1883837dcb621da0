"""Exercises of LoRA, rsLoRA, DoRA and VeRA (lora.py, dora.py, vera.py), and their wrong answers.

Each wrong answer has the real function's signature and computes a mistake a reader of the paper
could plausibly make; the exercise's marked tests must reject it (tests/test_exercises.py checks).
A wrong answer never calls the function it stands in for (that call would reach itself).
"""
import math

import torch
import torch.nn.functional as F

from exercises import Exercise


# lora: the scaling, ΔW, the forward (eq. 3), the gradients by hand

def scaling_alpha_over_r_even_with_rslora(r, alpha, rslora=False):
    return alpha / r  # rsLoRA's flag ignored: the update shrinks with r again


def scaling_alpha_over_sqrt_r_always(r, alpha, rslora=False):
    return alpha / math.sqrt(r)  # rsLoRA's rule where the paper's alpha / r is asked for


def delta_transposed(A, B, scaling):
    return scaling * (A.t() @ B.t())  # (in, out): the layout of x A^T B^T, not of W0


def delta_without_scaling(A, B, scaling):
    return B @ A  # ΔW = B A: alpha / r forgotten


def forward_with_dropout_on_the_frozen_path(x, weight, bias, A, B, scaling, dropout=None):
    dropped = x if dropout is None else dropout(x)
    frozen = F.linear(dropped, weight, bias)  # W0 d(x): the frozen path should see x itself
    update = (dropped.to(A.dtype) @ A.t()) @ B.t()
    return (frozen.to(A.dtype) + scaling * update).to(x.dtype)


def forward_without_scaling(x, weight, bias, A, B, scaling, dropout=None):
    dropped = x if dropout is None else dropout(x)
    update = (dropped.to(A.dtype) @ A.t()) @ B.t()  # B A x, never times alpha / r
    return (F.linear(x, weight, bias).to(A.dtype) + update).to(x.dtype)


def grads_without_the_frozen_path(x, weight, A, B, scaling, grad_out):
    X, G = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
    GB = G @ B
    grad_x = scaling * GB @ A  # only the adapter's share: G W0 forgotten
    return grad_x.view(x.shape), scaling * GB.t() @ X, scaling * G.t() @ (X @ A.t())


def grads_without_scaling_on_A_and_B(x, weight, A, B, scaling, grad_out):
    X, G = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
    GB = G @ B
    grad_x = G @ weight + scaling * GB @ A
    return grad_x.view(x.shape), GB.t() @ X, G.t() @ (X @ A.t())  # s left out of dA and dB


LORA_EXERCISES = [
    Exercise("lora.lora_scaling", "LoRA (arXiv 2106.09685) sec. 4.1; rsLoRA (arXiv 2312.03732)",
             {"alpha/r under rsLoRA too": scaling_alpha_over_r_even_with_rslora,
              "alpha/sqrt(r) without rsLoRA": scaling_alpha_over_sqrt_r_always}),
    Exercise("lora.lora_forward", "LoRA (arXiv 2106.09685) sec. 4.1, eq. 3",
             {"dropout on the frozen path too": forward_with_dropout_on_the_frozen_path,
              "scaling left out": forward_without_scaling}),
    Exercise("lora.lora_delta", "LoRA (arXiv 2106.09685) sec. 4.1 (merging, 'no additional "
             "inference latency')",
             {"B A transposed": delta_transposed, "scaling left out": delta_without_scaling}),
    Exercise("lora.lora_grads", "LoRA (arXiv 2106.09685) eq. 3 and the chain rule",
             {"dx without the frozen path": grads_without_the_frozen_path,
              "dA and dB without the scaling": grads_without_scaling_on_A_and_B}),
]

ADAPTER_EXERCISES = LORA_EXERCISES
