"""The measures the experiments compute on trained weights, each the paper's equation alone:

    φ(A1, A2, i, j) = ‖U_iᵀ U_j‖²_F / min(i, j)                     LoRA §7.2, eq. 4
    ΔM = mean_n |‖W_n‖ − ‖W0_n‖|,  ΔD = mean_n (1 − cos(W_n, W0_n))   DoRA §2.2, eqs. 3-4

and the line fitted through (ΔM, ΔD) points (DoRA Fig. 2). experiments.py re-exports the two
equations as `experiments.subspace_similarity` and `experiments.magnitude_direction_change`.
"""
from __future__ import annotations

import math
import statistics

import torch


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor, i: int, j: int) -> float:
    """φ(A1, A2, i, j) = ‖U_iᵀ U_j‖²_F / min(i, j)   (LoRA §7.2, eq. 4)

    U_i: the top-i right-singular vectors of A1 (r1, k), as columns (k, i); U_j: A2's top j.
    1 when one subspace holds the other, 0 when they are orthogonal; computed in float64.
    """
    U_i = torch.linalg.svd(A1.double(), full_matrices=False).Vh[:i].T  # (k, i)
    U_j = torch.linalg.svd(A2.double(), full_matrices=False).Vh[:j].T  # (k, j)
    return float((U_i.T @ U_j).square().sum() / min(i, j))  # ‖(i, j)‖²_F / min(i, j)


def magnitude_direction_change(W0: torch.Tensor, W: torch.Tensor) -> tuple[float, float]:
    """(ΔM, ΔD) of W against W0, both (out, in)   (DoRA §2.2, eqs. 3-4)

    DoRA writes y = x W with W (in, out) and takes norms over its columns, one per output; torch
    stores W (out, in), so here they are the rows' norms:
        ΔM = mean over outputs n of |‖W_n‖ − ‖W0_n‖|
        ΔD = mean over outputs n of 1 − cos(W_n, W0_n)
    computed in float64.
    """
    W0, W = W0.double(), W.double()
    m0 = torch.linalg.vector_norm(W0, dim=1)  # (out,)
    m = torch.linalg.vector_norm(W, dim=1)  # (out,)
    cosine = (W * W0).sum(dim=1) / (m * m0)  # (out,)
    return float((m - m0).abs().mean()), float((1 - cosine).mean())


def fitted_line(xs, ys) -> dict:
    """Pearson correlation and the least-squares slope of ys on xs (None when xs is constant)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    if sxx == 0:
        return dict(correlation=None, slope=None)
    correlation = sxy / math.sqrt(sxx * syy) if syy > 0 else None
    return dict(correlation=correlation, slope=sxy / sxx)


def phi_grid(A1, A2) -> list[list[float]]:
    """φ(A1, A2, i, j) for i = 1..rank(A1) (rows) and j = 1..rank(A2) (columns), from one SVD
    each: ‖U_iᵀ U_j‖²_F is the sum of the top-left i x j block of the squared overlaps, a 2-D
    cumulative sum (tests/test_experiments.py checks it against subspace_similarity)."""
    V1 = torch.linalg.svd(A1.double(), full_matrices=False).Vh  # (r1, k): rows by singular value
    V2 = torch.linalg.svd(A2.double(), full_matrices=False).Vh  # (r2, k)
    blocks = (V1 @ V2.T).square().cumsum(0).cumsum(1)  # (r1, r2): [i-1, j-1] = ‖U_iᵀ U_j‖²_F
    i = torch.arange(1, V1.shape[0] + 1, dtype=torch.float64)[:, None]  # (r1, 1)
    j = torch.arange(1, V2.shape[0] + 1, dtype=torch.float64)[None, :]  # (1, r2)
    return (blocks / torch.minimum(i, j)).tolist()


def fit_points(points, within_step: bool) -> dict:
    """The line of ΔD on ΔM through every (layer, checkpoint) point, as DoRA's Fig. 2 pools them;
    `within_step`: after subtracting each checkpoint's mean, so that the growth both share over
    training does not make the correlation (only how layers differ at one step remains)."""
    xs = [p["dM"] for p in points]
    ys = [p["dD"] for p in points]
    if within_step:
        steps = {p["step"] for p in points}
        mean_x = {t: statistics.fmean(p["dM"] for p in points if p["step"] == t) for t in steps}
        mean_y = {t: statistics.fmean(p["dD"] for p in points if p["step"] == t) for t in steps}
        xs = [x - mean_x[p["step"]] for x, p in zip(xs, points)]
        ys = [y - mean_y[p["step"]] for y, p in zip(ys, points)]
    return fitted_line(xs, ys)
