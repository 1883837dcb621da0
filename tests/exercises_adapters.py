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
              "alpha/sqrt(r) without rsLoRA": scaling_alpha_over_sqrt_r_always},
             answers=("alpha / r", "alpha / sqrt(r)"),  # its docstring's formula has no `=`
             breaks=("lora.lora_delta",)),  # its tests build a LoRALinear, which takes s from it
    Exercise("lora.lora_forward", "LoRA (arXiv 2106.09685) sec. 4.1, eq. 3",
             {"dropout on the frozen path too": forward_with_dropout_on_the_frozen_path,
              "scaling left out": forward_without_scaling}),
    Exercise("lora.lora_delta", "LoRA (arXiv 2106.09685) sec. 4.1 (merging, 'no additional "
             "inference latency')",
             {"B A transposed": delta_transposed, "scaling left out": delta_without_scaling}),
    Exercise("lora.lora_grads", "LoRA (arXiv 2106.09685) eq. 3 and the chain rule",
             {"dx without the frozen path": grads_without_the_frozen_path,
              "dA and dB without the scaling": grads_without_scaling_on_A_and_B},
             answers=("G W0", "(G B)", "G^T (X A^T)", "Gᵀ (X Aᵀ)", "(X A^T)", "(X Aᵀ)")),
]


# dora: the weight (magnitude times direction, eq. 5) and its gradients (eq. 6 and 7, sec. 4.3)

def weight_normalised_by_W0(weight, A, B, magnitude, scaling, detach_norm=True):
    import dora
    V = dora.dora_direction(weight, A, B, scaling)
    norm = dora.row_norm(weight.to(A.dtype))  # ||W0||, m's initial value, instead of ||V||
    return (magnitude / (norm.detach() if detach_norm else norm)).unsqueeze(1) * V


def weight_normalised_per_column(weight, A, B, magnitude, scaling, detach_norm=True):
    import dora
    V = dora.dora_direction(weight, A, B, scaling)
    # the paper's column norm ||.||_c read on this project's (out, in) layout: one per input
    norm = torch.linalg.vector_norm(V, dim=0, keepdim=True).clamp_min(dora.DORA_NORM_EPS)
    return magnitude.unsqueeze(1) * V / (norm.detach() if detach_norm else norm)


def weight_with_the_norm_always_in_the_graph(weight, A, B, magnitude, scaling, detach_norm=True):
    import dora
    V = dora.dora_direction(weight, A, B, scaling)
    return (magnitude / dora.row_norm(V)).unsqueeze(1) * V  # detach_norm ignored (section 4.3)


def weight_without_the_norm_floor(weight, A, B, magnitude, scaling, detach_norm=True):
    import dora
    V = dora.dora_direction(weight, A, B, scaling)
    norm = torch.linalg.vector_norm(V, dim=1)  # no DORA_NORM_EPS: a zero row of V gives 0 / 0
    return (magnitude / (norm.detach() if detach_norm else norm)).unsqueeze(1) * V


def grads_without_the_projection(V, magnitude, grad_weight, detach_norm=True):
    import dora
    norm = dora.row_norm(V)
    c = (grad_weight * V).sum(dim=1)
    return c / norm, (magnitude / norm).unsqueeze(1) * grad_weight  # section 4.3's form, always


def grads_projecting_without_the_squared_norm(V, magnitude, grad_weight, detach_norm=True):
    import dora
    norm = dora.row_norm(V)
    c = (grad_weight * V).sum(dim=1)
    g = (magnitude / norm).unsqueeze(1)
    if detach_norm:
        return c / norm, g * grad_weight
    return c / norm, g * (grad_weight - c.unsqueeze(1) * V)  # I - V V^T: the 1/||V||^2 forgotten


def grads_with_magnitude_gradient_undivided(V, magnitude, grad_weight, detach_norm=True):
    import dora
    norm = dora.row_norm(V)
    c = (grad_weight * V).sum(dim=1)
    g = (magnitude / norm).unsqueeze(1)
    along_V = 0.0 if detach_norm else (c / norm**2).unsqueeze(1)
    return c, g * (grad_weight - along_V * V)  # ∇m = <G, V>: V taken for the unit V / ||V||


DORA_EXERCISES = [
    Exercise("dora.dora_weight", "DoRA (arXiv 2402.09353) sec. 3.2 eq. 2, sec. 4.1 eq. 5, sec. 4.3",
             {"the norm of W0, not of V": weight_normalised_by_W0,
              "norm per column of the (out, in) matrix": weight_normalised_per_column,
              "norm never detached": weight_with_the_norm_always_in_the_graph,
              "no floor under the norm": weight_without_the_norm_floor}),
    Exercise("dora.dora_grads", "DoRA (arXiv 2402.09353) sec. 4.2 eq. 6 and 7, sec. 4.3",
             {"no projection": grads_without_the_projection,
              "projection without 1/||V||^2": grads_projecting_without_the_squared_norm,
              "grad of m not divided by ||V||": grads_with_magnitude_gradient_undivided},
             answers=("c / n", "(c / n", "G − (c", "G - (c", "c/n²", "c / n²")),
]


# vera: the shared pair's draw, the forward (eq. 2) and the gradients of the two vectors by hand

def _uniform_pair(r, max_in, max_out, seed, bound_of, b_first=False):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(r, max_in), (max_out, r)]
    drawn = {}
    for shape in reversed(shapes) if b_first else shapes:
        bound = bound_of(shape)
        drawn[shape] = torch.empty(shape).uniform_(-bound, bound, generator=generator)
    return drawn[shapes[0]], drawn[shapes[1]]


def projections_with_loras_gain(r, max_in, max_out, seed):
    # nn.init.kaiming_uniform_(a=sqrt(5)), LoRA's A: gain sqrt(1/3), bound 1 / sqrt(fan_in)
    return _uniform_pair(r, max_in, max_out, seed, lambda shape: 1 / math.sqrt(shape[1]))


def projections_with_fan_in_from_the_rows(r, max_in, max_out, seed):
    # the right gain, but fan_in read from the first dimension (the fan_out of this layout)
    return _uniform_pair(r, max_in, max_out, seed, lambda shape: math.sqrt(6 / shape[0]))


def projections_b_first(r, max_in, max_out, seed):
    # the right distribution, but B takes the generator's first numbers: not PEFT's matrices
    return _uniform_pair(r, max_in, max_out, seed, lambda shape: math.sqrt(6 / shape[1]),
                         b_first=True)


def vera_forward_with_dropout_on_the_frozen_path(x, weight, bias, A, B, lambda_d, lambda_b,
                                                 dropout=None):
    dropped = (x if dropout is None else dropout(x)).to(A.dtype)
    frozen = F.linear(dropped, weight, bias)  # W0 d(x): the frozen path should see x itself
    return (frozen + ((dropped @ A.t()) * lambda_d @ B.t()) * lambda_b).to(x.dtype)


def vera_forward_without_lambda_d(x, weight, bias, A, B, lambda_d, lambda_b, dropout=None):
    dropped = (x if dropout is None else dropout(x)).to(A.dtype)
    frozen = F.linear(x, weight, bias).to(A.dtype)
    return (frozen + ((dropped @ A.t()) @ B.t()) * lambda_b).to(x.dtype)  # Λ_b B A x: no Λ_d


def vera_grads_swapping_the_vectors_inside(x, weight, A, B, lambda_d, lambda_b, grad_out):
    X, G = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
    P = X @ A.t()
    back = (G * lambda_b) @ B
    # each vector's gradient scaled by itself, where the chain rule brings in the other one
    grad_b = (G * lambda_b * (P @ B.t())).sum(dim=0)
    grad_d = (P * lambda_d * (G @ B)).sum(dim=0)
    return grad_d, grad_b, (G @ weight + (back * lambda_d) @ A).view(x.shape)


def vera_grads_without_the_frozen_path(x, weight, A, B, lambda_d, lambda_b, grad_out):
    X, G = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
    P = X @ A.t()
    back = (G * lambda_b) @ B
    grad_b = (G * ((P * lambda_d) @ B.t())).sum(dim=0)
    grad_x = (back * lambda_d) @ A  # only the adapter's share: G W0 forgotten
    return (P * back).sum(dim=0), grad_b, grad_x.view(x.shape)


VERA_EXERCISES = [
    Exercise("vera.vera_projections", "VeRA (arXiv 2310.11454) sec. 3, 'Initialization "
             "strategies'; PEFT's vera `_kaiming_init`; docs/vera.md",
             {"LoRA's Kaiming gain (a = sqrt(5))": projections_with_loras_gain,
              "fan_in from the first dimension": projections_with_fan_in_from_the_rows,
              "B drawn before A": projections_b_first},
             answers=("gain / sqrt(fan_in)", "sqrt(3) · std", "sqrt(6 / fan_in)"),
             breaks=("vera.vera_forward",)),  # its tests build VeRA layers, which draw the pair
    Exercise("vera.vera_forward", "VeRA (arXiv 2310.11454) sec. 3, eq. 2",
             {"dropout on the frozen path too": vera_forward_with_dropout_on_the_frozen_path,
              "Λ_d left out": vera_forward_without_lambda_d}),
    Exercise("vera.vera_grads", "VeRA (arXiv 2310.11454) sec. 3, eq. 2 and the chain rule",
             {"λ_d and λ_b swapped in the vectors' gradients":
                  vera_grads_swapping_the_vectors_inside,
              "dx without the frozen path": vera_grads_without_the_frozen_path},
             answers=("G W0", "(G ⊙ λ_b) B", "(P ⊙ λ_d) B", "Σ_N G ⊙", "Σ_N P ⊙")),
]

ADAPTER_EXERCISES = LORA_EXERCISES + DORA_EXERCISES + VERA_EXERCISES
