"""Tests for paged_optim: adamw_step, its batched forms, the page table and PagedAdamW.

Oracles: torch.optim.AdamW(foreach=False) for the update, compared bit for bit (assert_same: the
tolerance first, then the bits): the paged update runs the same float operations in the same order,
so no tolerance is needed. For which pages move when: a twenty-line LRU model written here from the
rule in PageTable's docstring. Tests marked `exercise` check the functions a student rebuilds
(docs/exercises.md): adamw_step against AdamW directly, the page-out rule on a PageTable directly.
"""
import io
import math
from collections import OrderedDict

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import exercises  # noqa: F401 (loads tests/exercises*.py in their order)
import oracle
import paged_optim
from assertions import assert_same
from exercises_quantization import adamw_step_textbook_order
from fast_paths import adamw_foreach
from fast_paths.adamw_foreach import adamw_step_foreach
from paged_optim import DEFAULT_PAGE_BYTES, STATE_NAMES, PagedAdamW, adamw_step

shapes_st = st.lists(st.lists(st.integers(1, 7), min_size=0, max_size=3).map(tuple),
                     min_size=1, max_size=4)
page_bytes_st = st.one_of(st.integers(1, 64), st.just(DEFAULT_PAGE_BYTES))
dtype_st = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """The tensors here are tiny; on a shared 2-core runner an oversubscribed OpenMP team made one
    forward pass of the test MLP far slower than on one thread. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def state_bytes(shape, dtype=torch.float32):
    """Bytes of exp_avg plus exp_avg_sq for one parameter."""
    return 2 * torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def make_params(shapes, seed, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64)
                               .to(device, dtype)) for shape in shapes]


def set_grads(params, gen, has_grad=None):
    """Fill .grad from `gen`; params with has_grad[i] False get None, like unused parameters."""
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device, p.dtype)
        p.grad = g if has_grad is None or has_grad[i] else None


def train(optimizer, params, steps, seed, masks=None):
    gen = torch.Generator().manual_seed(seed)
    for s in range(steps):
        set_grads(params, gen, None if masks is None else masks[s])
        optimizer.step()


def assert_same_params(actual, expected):
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_same(a.detach(), e.detach(), f"param {i}")


def assert_same_state(actual_sd, expected_sd):
    assert actual_sd["state"].keys() == expected_sd["state"].keys()
    for i, expected in expected_sd["state"].items():
        assert float(actual_sd["state"][i]["step"]) == float(expected["step"])
        for name in STATE_NAMES:
            assert_same(actual_sd["state"][i][name].cpu(), expected[name].cpu(),
                        f"state[{i}][{name}]")


# --- adamw_step and its batched forms ------------------------------------------------------------

@pytest.mark.exercise("paged_optim.adamw_step")
@given(shape=st.lists(st.integers(0, 9), max_size=3).map(tuple),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16),
       lr=st.floats(1e-6, 1.0), betas=st.tuples(st.floats(0.0, 0.999), st.floats(0.0, 0.9999)),
       eps=st.sampled_from([1e-12, 1e-8, 1e-4]), weight_decay=st.sampled_from([0.0, 1e-2, 0.3]),
       grad_scale=st.sampled_from([1.0, 1e-4, 1e-8]), first_step=st.sampled_from([1, 2, 1000]),
       steps=st.integers(1, 4))
def test_adamw_step_is_torch_adamw_bit_for_bit(shape, dtype, seed, lr, betas, eps, weight_decay,
                                               grad_scale, first_step, steps):
    """Over shapes (0-d, empty), float32/float64, hyperparameters, gradients so small that
    sqrt(v_hat) is near eps, the first step or a late one, several steps in a row."""
    gen = torch.Generator().manual_seed(seed)
    draw = lambda: torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    param, exp_avg, exp_avg_sq = draw(), grad_scale * draw(), (grad_scale * draw()) ** 2
    if first_step == 1:  # AdamW's m_0 = v_0 = 0
        exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    ref_param = torch.nn.Parameter(param.clone())
    ref = torch.optim.AdamW([ref_param], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                            foreach=False)
    if first_step > 1:  # a late step: AdamW's state as after first_step - 1 updates
        ref.state[ref_param] = {"step": torch.tensor(float(first_step - 1)),
                                "exp_avg": exp_avg.clone(), "exp_avg_sq": exp_avg_sq.clone()}
    for step in range(first_step, first_step + steps):
        grad = grad_scale * draw()
        ref_param.grad = grad.clone()
        ref.step()
        adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay)
        assert_same(param, ref_param.detach(), f"param after step {step}")
        assert_same(exp_avg, ref.state[ref_param]["exp_avg"], "exp_avg")
        assert_same(exp_avg_sq, ref.state[ref_param]["exp_avg_sq"], "exp_avg_sq")


def test_textbook_adamw_is_right_math_other_rounding():
    """The same formula in another order lands within float32's tolerance of torch's AdamW but
    not on its bits; assert_same says so in those words (what a student who writes the textbook
    form of adamw_step reads)."""
    gen = torch.Generator().manual_seed(0)
    param, grad = torch.randn(1000, generator=gen), torch.randn(1000, generator=gen)
    ours = [param.clone(), torch.zeros(1000), torch.zeros(1000)]
    textbook = [param.clone(), torch.zeros(1000), torch.zeros(1000)]
    for step in (1, 2, 3):
        adamw_step(ours[0], grad, ours[1], ours[2], step, 1e-3, (0.9, 0.999), 1e-8, 1e-2)
        adamw_step_textbook_order(textbook[0], grad, textbook[1], textbook[2], step, 1e-3,
                            (0.9, 0.999), 1e-8, 1e-2)
    assert_same(textbook[0], ours[0], "textbook param", exact=False)  # the tolerance holds
    with pytest.raises(AssertionError, match=r"(?s)textbook param: right math, other rounding.*"
                                             r"ulps apart"):
        assert_same(textbook[0], ours[0], "textbook param")


@given(shapes=st.lists(st.lists(st.integers(0, 30), max_size=2).map(tuple), min_size=1,
                       max_size=6),
       dtypes=st.lists(st.sampled_from([torch.float32, torch.float64]), min_size=6, max_size=6),
       steps=st.lists(st.integers(1, 50), min_size=6, max_size=6), seed=st.integers(0, 2**16),
       weight_decay=st.sampled_from([0.0, 0.1]), batch=st.sampled_from([1, 7, 64, 1 << 18]))
def test_adamw_step_foreach_equals_adamw_step_bit_for_bit(shapes, dtypes, steps, seed,
                                                          weight_decay, batch):
    """The batched kernel gives adamw_step's bits for every piece, each with its own step t, in
    batches of any size, float32 and float64 mixed (the dtypes it supports, tested below)."""
    default_batch = adamw_foreach.BATCH_ELEMENTS
    adamw_foreach.BATCH_ELEMENTS = batch
    try:
        gen = torch.Generator().manual_seed(seed)
        tensors = [[torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
                    for _ in range(4)] for shape, dtype in zip(shapes, dtypes)]
        for tensor in tensors:
            tensor[3] = tensor[3] ** 2  # a second moment is >= 0
        hyper = 0.01, (0.9, 0.99), 1e-8, weight_decay
        plain = [[t.clone() for t in tensor] for tensor in tensors]
        for (p, g, m, v), step in zip(plain, steps):
            adamw_step(p, g, m, v, step, *hyper)
        batched = [[t.clone() for t in tensor] for tensor in tensors]
        adamw_step_foreach([(*tensor, step) for tensor, step in zip(batched, steps)], *hyper)
    finally:
        adamw_foreach.BATCH_ELEMENTS = default_batch
    for i, expected in enumerate(plain):
        for k, name in enumerate(("param", "grad", "exp_avg", "exp_avg_sq")):
            assert_same(batched[i][k], expected[k], f"tensor {i} {name}")


def test_adamw_step_foreach_passes_the_oracle():
    """The project's fast path is the oracle's first client: one piece a call, torch's bits."""
    def one_piece(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
        adamw_step_foreach([(param, grad, exp_avg, exp_avg_sq, step)], lr, betas, eps,
                           weight_decay)
    oracle.check_adamw_step(one_piece, examples=10)


def test_adamw_step_foreach_takes_cpu_float32_and_float64_only():
    """CUDA's _foreach_ kernels round differently, and _foreach_mul_ rounds a scalar to 16 bits:
    PagedAdamW sends every other tensor to adamw_step (both kinds are compared with AdamW here)."""
    assert adamw_foreach.supported(torch.zeros(2))
    assert adamw_foreach.supported(torch.zeros(2, dtype=torch.float64))
    for dtype in (torch.bfloat16, torch.float16):
        assert not adamw_foreach.supported(torch.zeros(2, dtype=dtype))
    assert not adamw_foreach.supported(torch.zeros(2, device="meta"))


# --- PagedAdamW against torch.optim.AdamW --------------------------------------------------------

@given(shapes=shapes_st, page_bytes=page_bytes_st,
       budget_fraction=st.one_of(st.none(), st.floats(0, 1.2)), steps=st.integers(1, 6),
       seed=st.integers(0, 2**16), dtype=dtype_st, lr=st.sampled_from([1e-3, 0.1]),
       weight_decay=st.sampled_from([0.0, 0.1]))
def test_matches_torch_adamw_bit_for_bit(shapes, page_bytes, budget_fraction, steps, seed, dtype,
                                         lr, weight_decay):
    total = sum(state_bytes(s, dtype) for s in shapes)
    budget = None if budget_fraction is None else int(budget_fraction * total)
    paged_params, ref_params = make_params(shapes, seed, dtype), make_params(shapes, seed, dtype)
    paged = PagedAdamW(paged_params, lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay,
                       page_bytes=page_bytes, device_budget_bytes=budget)
    ref = torch.optim.AdamW(ref_params, lr=lr, betas=(0.9, 0.99), eps=1e-8,
                            weight_decay=weight_decay, foreach=False)
    train(paged, paged_params, steps, seed)
    train(ref, ref_params, steps, seed)
    assert_same_params(paged_params, ref_params)
    assert_same_state(paged.state_dict(), ref.state_dict())


def assert_paged_out(victims, expected, why):
    """The pages paged out, as (param_index, state_name, start), against the rule's."""
    got = [(page.param_index, page.state_name, page.start) for page in victims]
    assert got == expected, f"{why}: paged out {got}, expected {expected}"


@pytest.mark.exercise("paged_optim.PageTable.over_budget")
def test_over_budget_pages_out_the_least_recently_used_pages_of_other_parameters():
    """Pages of 8 bytes (two float32), a budget of 32: A (4 elements, 4 pages), B (2 elements,
    2 pages), C (6 elements, 6 pages, more than the budget)."""
    table = paged_optim.PageTable(page_bytes=8, budget_bytes=32, stats=paged_optim.PagingStats())
    a, b, c = (table.cut(torch.zeros(n), i) for i, n in enumerate((4, 2, 6)))
    assert_paged_out(table.make_resident(a)[0], [], "A alone fills the budget")
    assert_paged_out(table.make_resident(b)[0], [(0, "exp_avg", 0), (0, "exp_avg_sq", 0)],
                     "B needs 16 bytes: A's first range is the least recently used")
    assert_paged_out(table.make_resident(a)[0], [(1, "exp_avg", 0), (1, "exp_avg_sq", 0)],
                     "A's first range comes back: B goes, not A's second range (A is in `keep`)")
    assert_paged_out(table.over_budget(), [], "at the budget between updates")
    assert_paged_out(table.make_resident(c)[0], [(0, name, start) for start in (0, 2)
                                                 for name in STATE_NAMES],
                     "C alone is 48 bytes: every page of A goes, C is resident whole")
    assert table.stats.resident_bytes == 48
    assert_paged_out(table.over_budget(), [(2, "exp_avg", 0), (2, "exp_avg_sq", 0)],
                     "C trimmed to the budget after its update, its least recently used first")
    stats = table.stats
    assert (stats.resident_bytes, stats.page_outs, stats.bytes_out) == (32, 10, 80)
    assert [page.location for page in c] == ["host"] * 2 + ["device"] * 4


def reference_lru(numels, itemsize, page_bytes, budget, masks):
    """The documented rule, independently: returns (pages paged out in order, final LRU order)."""
    per_page = max(1, page_bytes // itemsize)
    resident, paged_out = OrderedDict(), []  # key -> bytes, least recently used first

    def evict_until(limit, keep=()):
        for key in list(resident):
            if sum(resident.values()) <= limit:
                return
            if key not in keep:
                del resident[key]
                paged_out.append(key)

    for step, mask in enumerate(masks, 1):
        order = list(enumerate(numels))
        for i, n in order if step % 2 else order[::-1]:  # every other step backwards
            if not mask[i]:
                continue
            pages = [((i, name, s), min(per_page, n - s) * itemsize)
                     for s in range(0, n, per_page) for name in STATE_NAMES]  # update order
            incoming = sum(nbytes for key, nbytes in pages if key not in resident)
            evict_until(budget - incoming, keep={key for key, _ in pages})
            for key, nbytes in pages:
                resident[key] = nbytes
                resident.move_to_end(key)
            evict_until(budget)
    return paged_out, list(resident)


@pytest.mark.exercise("paged_optim.PageTable.over_budget")
@given(shapes=shapes_st, page_bytes=st.integers(1, 40), budget_fraction=st.floats(0, 1.1),
       steps=st.integers(1, 5), seed=st.integers(0, 2**16), data=st.data())
def test_pages_paged_out_are_the_least_recently_used(shapes, page_bytes, budget_fraction, steps,
                                                     seed, data):
    masks = data.draw(st.lists(st.lists(st.booleans(), min_size=len(shapes), max_size=len(shapes)),
                               min_size=steps, max_size=steps))
    budget = int(budget_fraction * sum(state_bytes(s) for s in shapes))
    params = make_params(shapes, seed)
    opt = PagedAdamW(params, page_bytes=page_bytes, device_budget_bytes=budget)
    paged_out = []
    real_page_out = opt.page_out

    def recorded_page_out(pages):  # returns the freed device memory, as page_out does
        paged_out.extend((p.param_index, p.state_name, p.start) for p in pages)
        return real_page_out(pages)
    opt.page_out = recorded_page_out
    train(opt, params, steps, seed, masks)
    expected_out, expected_lru = reference_lru([torch.Size(s).numel() for s in shapes], 4,
                                               page_bytes, budget, masks)
    assert paged_out == expected_out
    assert opt.lru_order() == expected_lru
    assert opt.stats.page_outs == len(expected_out)


@pytest.mark.parametrize("count", [2, 4, 7])
def test_alternating_order_moves_half_the_pages_of_a_half_budget(count):
    """count equal parameters, a budget of half their state, one page per state tensor: after the
    first step, each step pages in only the half that LRU paged out (a fixed order would page in
    all of them every step: LRU's worst case). The values are AdamW's either way (tested above)."""
    shapes = [(16,)] * count
    budget = sum(state_bytes(s) for s in shapes) // 2
    params = make_params(shapes, 0)
    opt = PagedAdamW(params, page_bytes=64, device_budget_bytes=budget)
    train(opt, params, 1, 0)
    resident_pages = budget // 64  # 64-byte pages: m and v of one parameter are two pages
    for steps in range(2, 6):
        before = opt.stats.page_ins
        train(opt, params, 1, steps)
        assert opt.stats.page_ins - before == 2 * count - resident_pages, steps


@given(shapes=shapes_st, page_bytes=st.integers(1, 40), budget_fraction=st.floats(0, 1.1),
       steps=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_resident_bytes_never_exceed_the_budget(shapes, page_bytes, budget_fraction, steps, seed):
    """Rule: after every decision to make a parameter resident, resident <= max(budget, state bytes
    of that parameter); after step(), resident <= budget. The counters conserve bytes."""
    budget = int(budget_fraction * sum(state_bytes(s) for s in shapes))
    params = make_params(shapes, seed)
    opt = PagedAdamW(params, page_bytes=page_bytes, device_budget_bytes=budget)
    real_make_resident, real_page_in, seen = opt.table.make_resident, opt.page_in, []

    def checked_make_resident(pages):
        moves = real_make_resident(pages)
        assert opt.stats.resident_bytes <= max(budget, state_bytes(shapes[pages[0].param_index]))
        return moves

    def counted_page_in(pages, spare=None):
        seen.extend(pages)
        real_page_in(pages, spare)

    opt.table.make_resident, opt.page_in = checked_make_resident, counted_page_in
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        set_grads(params, gen)
        opt.step()
        table = opt.page_table()
        on_device = sum((stop - start) * 4 for _, _, start, stop, where, _ in table
                        if where == "device")
        assert opt.stats.resident_bytes == on_device <= budget
        created = sum(state_bytes(s) for s in shapes)  # every parameter had a gradient
        assert opt.stats.resident_bytes == created + opt.stats.bytes_in - opt.stats.bytes_out
    assert opt.stats.peak_resident_bytes <= max(budget, max(state_bytes(s) for s in shapes))
    # the first page-in of each page allocates its zeros (AdamW's m_0 = v_0 = 0): not a move
    assert opt.stats.page_ins == len(seen) - len(table)
    assert opt.stats.bytes_in == sum(page.nbytes for page in seen) - sum(map(state_bytes, shapes))


@given(shapes=shapes_st, page_bytes=page_bytes_st, steps=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_budget_none_never_pages(shapes, page_bytes, steps, seed):
    params = make_params(shapes, seed)
    opt = PagedAdamW(params, page_bytes=page_bytes, device_budget_bytes=None)
    train(opt, params, steps, seed)
    stats, total = opt.stats, sum(state_bytes(s) for s in shapes)
    assert (stats.page_ins, stats.page_outs, stats.bytes_in, stats.bytes_out) == (0, 0, 0, 0)
    assert stats.resident_bytes == stats.peak_resident_bytes == total
    table = opt.page_table()
    assert all(where == "device" for *_, where, _ in table)
    assert len(table) == 2 * len(shapes)  # nothing to page: one page per state tensor


def test_budget_zero_leaves_nothing_on_the_device_between_steps():
    params = make_params([(5, 3), (7,)], seed=0)
    opt = PagedAdamW(params, page_bytes=8, device_budget_bytes=0)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        set_grads(params, gen)
        opt.step()
        assert opt.stats.resident_bytes == 0 and opt.lru_order() == []
        assert {where for *_, where, _ in opt.page_table()} == {"host"}
        assert opt.stats.bytes_out == (step + 1) * (state_bytes((5, 3)) + state_bytes((7,)))
        assert opt.stats.bytes_in == step * (state_bytes((5, 3)) + state_bytes((7,)))


@given(shapes=shapes_st, page_bytes=page_bytes_st,
       budgets=st.tuples(*[st.one_of(st.none(), st.floats(0, 1))] * 2),
       steps=st.tuples(st.integers(1, 4), st.integers(1, 4)), seed=st.integers(0, 2**16))
def test_state_dict_round_trip_mid_training_continues_identically(shapes, page_bytes, budgets,
                                                                  steps, seed):
    """Save after steps[0] (through torch.save and weights_only=True), load into an optimizer with a
    possibly different budget, continue steps[1]: the same as never stopping."""
    total = sum(state_bytes(s) for s in shapes)
    first, second = [None if f is None else int(f * total) for f in budgets]
    params = make_params(shapes, seed)
    opt = PagedAdamW(params, lr=0.05, page_bytes=page_bytes, device_budget_bytes=first)
    train(opt, params, steps[0], seed)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed_params = [torch.nn.Parameter(t) for t in checkpoint["params"]]
    resumed = PagedAdamW(resumed_params, lr=0.05, page_bytes=page_bytes,
                         device_budget_bytes=second)
    resumed.load_state_dict(checkpoint["optim"])
    train(opt, params, steps[1], seed + 1)
    train(resumed, resumed_params, steps[1], seed + 1)
    assert_same_params(resumed_params, params)
    assert_same_state(resumed.state_dict(), opt.state_dict())


@pytest.mark.parametrize("budget", [None, 0, 40])
def test_state_dict_interoperates_with_torch_adamw_both_ways(budget):
    shapes, seed = [(6, 4), (4,), (3, 2, 2)], 3
    # PagedAdamW -> AdamW
    params, ref_params = make_params(shapes, seed), make_params(shapes, seed)
    paged = PagedAdamW(params, lr=0.05, weight_decay=0.1, page_bytes=12,
                       device_budget_bytes=budget)
    ref = torch.optim.AdamW(ref_params, lr=0.05, weight_decay=0.1, foreach=False)
    train(paged, params, 3, seed)
    train(ref, ref_params, 3, seed)
    adamw = torch.optim.AdamW(params, lr=1.0)  # the loaded groups override lr and weight_decay
    adamw.load_state_dict(paged.state_dict())
    train(adamw, params, 3, seed + 1)
    train(ref, ref_params, 3, seed + 1)
    assert_same_params(params, ref_params)
    assert_same_state(adamw.state_dict(), ref.state_dict())
    # AdamW -> PagedAdamW
    paged_again = PagedAdamW(params, lr=1.0, page_bytes=12, device_budget_bytes=budget)
    paged_again.load_state_dict(adamw.state_dict())
    train(paged_again, params, 3, seed + 2)
    train(ref, ref_params, 3, seed + 2)
    assert_same_params(params, ref_params)
    assert_same_state(paged_again.state_dict(), ref.state_dict())
    assert paged_again.param_groups[0]["lr"] == 0.05
    assert paged_again.state_dict()["param_groups"][0]["foreach"] is False


@given(shapes=shapes_st, page_bytes=st.integers(1, 40), budget_fraction=st.floats(0, 1),
       steps=st.integers(1, 5), seed=st.integers(0, 2**16), data=st.data())
def test_parameters_without_gradients_are_skipped_like_adamw(shapes, page_bytes, budget_fraction,
                                                             steps, seed, data):
    masks = data.draw(st.lists(st.lists(st.booleans(), min_size=len(shapes), max_size=len(shapes)),
                               min_size=steps, max_size=steps))
    paged_params, ref_params = make_params(shapes, seed), make_params(shapes, seed)
    budget = int(budget_fraction * sum(state_bytes(s) for s in shapes))
    paged = PagedAdamW(paged_params, lr=0.05, page_bytes=page_bytes, device_budget_bytes=budget)
    ref = torch.optim.AdamW(ref_params, lr=0.05, foreach=False)
    train(paged, paged_params, steps, seed, masks)
    train(ref, ref_params, steps, seed, masks)
    assert_same_params(paged_params, ref_params)
    assert_same_state(paged.state_dict(), ref.state_dict())  # no state for never-updated params
    updated = {i for i in range(len(shapes)) if any(mask[i] for mask in masks)}
    assert {param_index for param_index, *_ in paged.page_table()} == updated


def test_half_budget_trains_a_module_to_the_same_bits_as_no_budget():
    """The acceptance check in small: budget = half the state, real forward/backward, two groups."""
    def run(budget):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.LayerNorm(32),
                                    torch.nn.GELU(), torch.nn.Linear(32, 32), torch.nn.GELU(),
                                    torch.nn.Linear(32, 5))
        groups = [{"params": list(model[:3].parameters())},
                  {"params": list(model[3:].parameters()), "lr": 1e-3, "weight_decay": 0.0}]
        opt = PagedAdamW(groups, lr=3e-3, weight_decay=0.01, page_bytes=512,
                         device_budget_bytes=budget)
        gen = torch.Generator().manual_seed(1)
        for _ in range(25):
            x, y = torch.randn(16, 12, generator=gen), torch.randint(0, 5, (16,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return list(model.parameters()), opt.stats

    full_params, full_stats = run(None)
    half = sum(2 * p.numel() * 4 for p in full_params) // 2
    half_params, half_stats = run(half)
    assert_same_params(half_params, full_params)
    assert full_stats.page_ins == full_stats.page_outs == 0
    assert half_stats.page_ins > 0 and half_stats.page_outs > 0 and half_stats.bytes_in > 0
    assert half_stats.peak_resident_bytes <= max(half, max(2 * p.numel() * 4 for p in full_params))
    assert half_stats.resident_bytes <= half


def test_large_tensors_split_at_odd_offsets_match_adamw_with_threads():
    """Pages and chunks that start off any SIMD boundary, in tensors big enough for torch to split
    each op across threads (its grain is 32768 elements): still AdamW's bits."""
    shapes, seed = [(300_007,), (257, 301), (5,)], 7
    torch.set_num_threads(2)  # the module fixture restores one thread afterwards
    try:
        for budget in (None, sum(state_bytes(s) for s in shapes) // 2):
            paged_params, ref_params = make_params(shapes, seed), make_params(shapes, seed)
            paged = PagedAdamW(paged_params, lr=0.01, weight_decay=0.1, page_bytes=4 * 30_001 + 4,
                               device_budget_bytes=budget)
            ref = torch.optim.AdamW(ref_params, lr=0.01, weight_decay=0.1, foreach=False)
            train(paged, paged_params, 3, seed)
            train(ref, ref_params, 3, seed)
            assert_same_params(paged_params, ref_params)
            assert_same_state(paged.state_dict(), ref.state_dict())
            assert (paged.stats.page_outs > 0) == (budget is not None)
    finally:
        torch.set_num_threads(1)


def test_non_contiguous_and_empty_parameters_match_adamw():
    def params():
        gen = torch.Generator().manual_seed(5)
        return [torch.nn.Parameter(torch.randn(6, 4, generator=gen).t()),
                torch.nn.Parameter(torch.zeros(0, 3)),
                torch.nn.Parameter(torch.randn((), generator=gen))]
    for budget in (None, 24):
        paged_params, ref_params = params(), params()
        assert not paged_params[0].is_contiguous()
        paged = PagedAdamW(paged_params, lr=0.1, page_bytes=20, device_budget_bytes=budget)
        ref = torch.optim.AdamW(ref_params, lr=0.1, foreach=False)
        train(paged, paged_params, 4, 0)
        train(ref, ref_params, 4, 0)
        assert_same_params(paged_params, ref_params)
        assert_same_state(paged.state_dict(), ref.state_dict())


# --- bad input -----------------------------------------------------------------------------------

NON_FINITE = [math.inf, -math.inf, math.nan, 1e400]  # 1e400 is a float: inf


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1e-3), "lr"), (dict(betas=(1.0, 0.9)), r"betas\[0\]"),
    (dict(betas=(0.9, -0.1)), r"betas\[1\]"), (dict(betas=(0.9,)), "betas"),
    (dict(eps=-1.0), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(lr=torch.tensor(0.1)), "lr"), (dict(page_bytes=0), "page_bytes"),
    (dict(page_bytes=-4), "page_bytes"), (dict(page_bytes=2.5), "page_bytes"),
    (dict(page_bytes=True), "page_bytes"), (dict(device_budget_bytes=-1), "device_budget_bytes"),
    (dict(device_budget_bytes=1.5), "device_budget_bytes"),
] + [(dict(lr=x), "lr") for x in NON_FINITE] + [(dict(eps=x), "eps") for x in NON_FINITE]
  + [(dict(weight_decay=x), "weight_decay") for x in NON_FINITE]
  + [(dict(betas=(x, 0.9)), r"betas\[0\]") for x in NON_FINITE]
  + [(dict(betas=(0.9, x)), r"betas\[1\]") for x in NON_FINITE])
def test_bad_arguments_raise_clear_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PagedAdamW([torch.nn.Parameter(torch.zeros(3))], **kwargs)


@pytest.mark.parametrize("key", ["lr", "eps", "weight_decay"])
@pytest.mark.parametrize("bad", NON_FINITE)
def test_param_groups_refuse_non_finite_hyperparameters(key, bad):
    with pytest.raises(ValueError, match=key):
        PagedAdamW([{"params": [torch.nn.Parameter(torch.zeros(3))], key: bad}])
    opt = PagedAdamW([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match=key):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], key: bad})
    assert len(opt.param_groups) == 1


def test_a_huge_finite_learning_rate_is_accepted_up_to_1e30():
    """lr=1e30 is finite: stopping on the non-finite loss it leads to is the training loop's job.
    Beyond 1e30, lr / (1 - beta1) and the like leave float32's range: refused, not a crash."""
    param = torch.nn.Parameter(torch.ones(3))
    PagedAdamW([param], lr=1e30)
    for key in ("lr", "eps", "weight_decay"):
        with pytest.raises(ValueError, match=rf"{key} must be a finite number in \[0, 1e\+30\]"):
            PagedAdamW([param], **{key: 1e300})


@pytest.mark.parametrize("key, bad", [("lr", math.inf), ("weight_decay", math.nan),
                                      ("eps", -1.0), ("lr", 1e300), ("betas", (0.9, 1.0))])
def test_a_group_edited_after_construction_is_checked_at_the_next_step(key, bad):
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    opt = PagedAdamW([param])
    opt.param_groups[0][key] = bad
    with pytest.raises(ValueError, match=rf"param_groups: {key}"):
        opt.step()
    assert_same(param.detach(), torch.ones(3), "the parameter after the refused step")
    assert not opt.state[param]  # nothing counted, nothing allocated


def test_unsupported_options_and_parameters_raise():
    param = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="amsgrad"):
        PagedAdamW([{"params": [param], "amsgrad": True}])
    with pytest.raises(ValueError, match="real floating-point"):
        PagedAdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))])
    param.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        PagedAdamW([param]).step()


def adamw_state_dict(shape=(3,), steps=2):
    param = torch.nn.Parameter(torch.zeros(shape))
    adamw = torch.optim.AdamW([param], foreach=False)
    for _ in range(steps):
        param.grad = torch.ones(shape)
        adamw.step()
    return adamw.state_dict()


def corrupt(**changes):
    state_dict = adamw_state_dict()
    state = state_dict["state"][0]
    for key, change in changes.items():
        state[key] = change(state[key])
    return state_dict


def set_first(value):
    return lambda t: torch.cat([torch.tensor([value]), t[1:]])


@pytest.mark.parametrize("state_dict, message", [
    (corrupt(exp_avg=set_first(math.nan)), r"state\[0\]\['exp_avg'\] contains NaN or Inf"),
    (corrupt(exp_avg=set_first(math.inf)), r"state\[0\]\['exp_avg'\] contains NaN or Inf"),
    (corrupt(exp_avg_sq=set_first(math.nan)), r"state\[0\]\['exp_avg_sq'\] contains NaN or Inf"),
    (corrupt(exp_avg_sq=set_first(-math.inf)), r"state\[0\]\['exp_avg_sq'\] contains NaN or Inf"),
    (corrupt(exp_avg_sq=set_first(-1e-30)), r"state\[0\]\['exp_avg_sq'\] has negative values"),
    (corrupt(step=lambda s: torch.tensor(0.0)), r"state\[0\]\['step'\] must be"),
    (corrupt(step=lambda s: torch.tensor(-3.0)), r"state\[0\]\['step'\] must be"),
    (corrupt(step=lambda s: torch.tensor(2.5)), r"state\[0\]\['step'\] must be a whole number"),
    (corrupt(step=lambda s: torch.tensor(math.nan)), r"state\[0\]\['step'\] must be"),
    (corrupt(step=lambda s: "two"), r"state\[0\]\['step'\] must be"),
    (corrupt(exp_avg=lambda t: t[:2]), r"state\[0\]\['exp_avg'\] has shape \(2,\)"),
    (corrupt(exp_avg_sq=lambda t: t.view(1, 3)), r"state\[0\]\['exp_avg_sq'\] has shape"),
    (adamw_state_dict(shape=(4,)), r"state\[0\]\['exp_avg'\] has shape \(4,\)"),
])
@pytest.mark.parametrize("budget", [None, 0])
def test_load_state_dict_refuses_bad_state_and_changes_nothing(state_dict, message, budget):
    param = torch.nn.Parameter(torch.zeros(3))
    opt = PagedAdamW([param], device_budget_bytes=budget)
    param.grad = torch.full((3,), 0.5)
    opt.step()
    before = opt.state_dict()
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(state_dict)
    assert_same_state(opt.state_dict(), before)


@pytest.mark.parametrize("key, bad, name", [
    ("lr", math.inf, "lr"), ("weight_decay", math.nan, "weight_decay"), ("eps", math.inf, "eps"),
    ("betas", (0.9, math.nan), r"betas\[1\]"), ("decoupled_weight_decay", False,
                                                "decoupled_weight_decay"),
])
def test_load_state_dict_refuses_bad_param_groups(key, bad, name):
    state_dict = adamw_state_dict()
    state_dict["param_groups"][0][key] = bad
    with pytest.raises(ValueError, match=name):
        PagedAdamW([torch.nn.Parameter(torch.zeros(3))]).load_state_dict(state_dict)


def test_load_state_dict_refuses_coupled_weight_decay():
    param = torch.nn.Parameter(torch.zeros(3))
    adam = torch.optim.Adam([param])  # coupled weight decay: not AdamW
    param.grad = torch.ones(3)
    adam.step()
    with pytest.raises(ValueError, match="decoupled_weight_decay"):
        PagedAdamW([param]).load_state_dict(adam.state_dict())


# --- CUDA ----------------------------------------------------------------------------------------

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@requires_cuda
@pytest.mark.parametrize("budget_fraction", [0.0, 0.5])
def test_cuda_matches_adamw_with_pinned_host_pages(budget_fraction):
    shapes, seed = [(256, 64), (64,), (64, 256), (300,)], 0
    budget = int(budget_fraction * sum(state_bytes(s) for s in shapes))
    paged_params = make_params(shapes, seed, device="cuda")
    ref_params = make_params(shapes, seed, device="cuda")
    paged = PagedAdamW(paged_params, lr=0.01, page_bytes=4096, device_budget_bytes=budget)
    ref = torch.optim.AdamW(ref_params, lr=0.01, foreach=False)
    train(paged, paged_params, 6, seed)
    train(ref, ref_params, 6, seed)
    torch.cuda.synchronize()
    assert_same_params(paged_params, ref_params)
    assert_same_state(paged.state_dict(), ref.state_dict())
    host_pages = [page for s in paged.state.values() for page in s["pages"]
                  if page.location == "host"]
    assert host_pages and all(page.host_data.is_pinned() and page.device_data is None
                              for page in host_pages)
    assert paged.stats.resident_bytes <= budget


@requires_cuda
def test_cuda_peak_memory_stays_under_budget_plus_working_set():
    shapes, page_bytes = [(512, 512)] * 4 + [(512,)] * 4, 64 * 1024
    total = sum(state_bytes(s) for s in shapes)
    budget = total // 4
    params = make_params(shapes, 0, device="cuda")
    opt = PagedAdamW(params, lr=0.01, page_bytes=page_bytes, device_budget_bytes=budget)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        set_grads(params, gen)
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()  # parameters and gradients
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        torch.cuda.synchronize()
        # resident state <= max(budget, the state of the parameter being updated); plus the
        # update's two page-sized temporaries (sqrt, then the division); plus the allocator's
        # 512-byte rounding per block
        pages = total // page_bytes + 2 * len(shapes)
        allowed = max(budget, max(state_bytes(s) for s in shapes)) + 2 * page_bytes + 512 * pages
        assert torch.cuda.max_memory_allocated() - baseline <= allowed
    assert opt.stats.page_outs > 0 and opt.stats.peak_resident_bytes <= budget
