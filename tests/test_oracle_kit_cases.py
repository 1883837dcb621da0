"""Tests for oracle_kit/cases.py: the fixed cases really sit where the mistakes they catch show.

The NF4 ties put scaled values exactly on the code's midpoints (where a naive argmin |s - q| is
wrong), the dynamic-map ties put centred scales on the 8-bit map's midpoints, and the partial ties
put values where dividing by the block's absmax and multiplying by its reciprocal disagree.
"""
import torch

import nf4
from assertions import assert_same
from oracle_kit import cases
from test_oracle import nearest_by_argmin, nearest_by_midpoints


def test_naive_argmin_takes_the_upper_code_at_6_of_15_nf4_midpoints():
    code = nf4.nf4_code()
    midpoints = (code[:-1] + code[1:]) / 2
    assert_same(nearest_by_midpoints(midpoints, code), torch.arange(15),
                "NF4 code picked at each midpoint (the lower one)")
    assert int((nearest_by_argmin(midpoints, code) != torch.arange(15)).sum()) == 6
    dynamic = nf4.dynamic_code()
    midpoints = (dynamic[:-1] + dynamic[1:]) / 2
    assert int((nearest_by_argmin(midpoints, dynamic) != torch.arange(255)).sum()) == 53


def test_tie_cases_put_scaled_values_exactly_on_the_midpoints():
    code = nf4.nf4_code()
    w = cases.nf4_weight(cases.EXAMPLES["nf4_quantize"][0]).reshape(-1)
    scales = nf4.quantize_nf4(w, 32, False).absmax.repeat_interleave(32)[: w.numel()]
    assert set(((code[:-1] + code[1:]) / 2).tolist()) <= set((w / scales).tolist())
    case = cases.EXAMPLES["nf4_quantize"][1]  # 256 blocks: all reachable dynamic ties
    q = nf4.quantize_nf4(cases.nf4_weight(case), 32, True)
    assert q.offset.item() == 1.0 and q.nested_absmax.tolist() == [1.0]  # no rounding in s
    centred = nf4.quantize_nf4(cases.nf4_weight(case), 32, False).absmax - 1.0
    dynamic = nf4.dynamic_code()
    ties = torch.isin(centred, (dynamic[:-1] + dynamic[1:]) / 2)
    assert int(ties.sum()) == 84  # every midpoint m with 1 + m - 1 == m in float32
    naive_wrong = nearest_by_argmin(centred, dynamic) != nearest_by_midpoints(centred, dynamic)
    assert int((naive_wrong & ties).sum()) == 21
    assert_same(q.absmax.long(), nearest_by_midpoints(centred, dynamic),
                "8-bit absmax codes at the dynamic-map ties", blocksize=nf4.NESTED_BLOCKSIZE)


def test_partial_ties_split_division_and_reciprocal_across_a_midpoint():
    case = next(c for c in cases.EXAMPLES["nf4_quantize"] if c["values"] == "partial_ties")
    w = cases.nf4_weight(case).reshape(-1)
    full = w.numel() - w.numel() % case["blocksize"]
    last = w[full:]  # the partial block: its absmax first, then the straddling values
    c = last.abs().max()
    assert last[0] == c and last.numel() == 40
    code = nf4.nf4_code()
    by_division = nearest_by_midpoints(last / c, code)
    by_reciprocal = nearest_by_midpoints(last * c.reciprocal(), code)
    assert int((by_division != by_reciprocal).sum()) == last.numel() - 1  # all but the absmax
    assert_same(nf4.quantize_nf4(w, case["blocksize"], False).absmax[-1], c, "its absmax")


def test_nested_ties_have_an_exact_mean_in_any_order_and_split_the_partial_nested_block():
    case = next(c for c in cases.EXAMPLES["nf4_quantize"] if c["values"] == "nested_ties")
    w = cases.nf4_weight(case)
    scales = nf4.quantize_nf4(w, case["blocksize"], False).absmax  # (700,)
    assert scales.numel() > 2 * nf4.NESTED_BLOCKSIZE and scales.numel() % nf4.NESTED_BLOCKSIZE
    for order in (scales, scales.flip(0), scales[torch.randperm(scales.numel())]):
        running = torch.zeros((), dtype=torch.float32)
        for value in order:  # a naive float32 running sum: every partial sum exact
            running = running + value
        assert running.item() == scales.numel() and order.mean().item() == 1.0
    q = nf4.quantize_nf4(w, case["blocksize"], True)
    assert q.offset.item() == 1.0 and len(set(q.nested_absmax.tolist())) == 3
    tail = scales[2 * nf4.NESTED_BLOCKSIZE:] - 1  # the partial nested block, centred
    dynamic = nf4.dynamic_code()
    by_division = nearest_by_midpoints(tail / q.nested_absmax[-1], dynamic)
    by_reciprocal = nearest_by_midpoints(tail * q.nested_absmax[-1].reciprocal(), dynamic)
    assert int((by_division != by_reciprocal).sum()) >= tail.numel() // 2
