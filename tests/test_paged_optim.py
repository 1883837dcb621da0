"""Tests for paged_optim.PagedAdamW.

Oracles: torch.optim.AdamW(foreach=False) for the update (compared with torch.equal: the paged update
runs the same float operations in the same order, so no tolerance is needed), and a twenty-line LRU
model written here from the documented rule for which pages move when.
"""
import io
from collections import OrderedDict

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from paged_optim import DEFAULT_PAGE_BYTES, STATE_NAMES, PagedAdamW

shapes_st = st.lists(st.lists(st.integers(1, 7), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4)
page_bytes_st = st.one_of(st.integers(1, 64), st.just(DEFAULT_PAGE_BYTES))
dtype_st = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """The tensors here are tiny; on a shared 2-core runner an oversubscribed OpenMP team made one
    forward pass of the test MLP take ~100 ms instead of 0.2 ms. Restored afterwards for other modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def state_bytes(shape, dtype=torch.float32):
    """Bytes of exp_avg plus exp_avg_sq for one parameter."""
    return 2 * torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def make_params(shapes, seed, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype))
            for shape in shapes]


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
    for a, e in zip(actual, expected):
        assert torch.equal(a, e), (a, e)


def assert_same_state(actual_sd, expected_sd):
    assert actual_sd["state"].keys() == expected_sd["state"].keys()
    for i, expected in expected_sd["state"].items():
        assert float(actual_sd["state"][i]["step"]) == float(expected["step"])
        for name in STATE_NAMES:
            assert torch.equal(actual_sd["state"][i][name].cpu(), expected[name].cpu()), (i, name)


@given(shapes=shapes_st, page_bytes=page_bytes_st, budget_fraction=st.one_of(st.none(), st.floats(0, 1.2)),
       steps=st.integers(1, 6), seed=st.integers(0, 2**16), dtype=dtype_st,
       lr=st.sampled_from([1e-3, 0.1]), weight_decay=st.sampled_from([0.0, 0.1]))
def test_matches_torch_adamw_bit_for_bit(shapes, page_bytes, budget_fraction, steps, seed, dtype, lr, weight_decay):
    total = sum(state_bytes(s, dtype) for s in shapes)
    budget = None if budget_fraction is None else int(budget_fraction * total)
    paged_params, ref_params = make_params(shapes, seed, dtype), make_params(shapes, seed, dtype)
    paged = PagedAdamW(paged_params, lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay,
                       page_bytes=page_bytes, device_budget_bytes=budget)
    ref = torch.optim.AdamW(ref_params, lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay, foreach=False)
    train(paged, paged_params, steps, seed)
    train(ref, ref_params, steps, seed)
    assert_same_params(paged_params, ref_params)
    assert_same_state(paged.state_dict(), ref.state_dict())


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

    for mask in masks:
        for i, n in enumerate(numels):
            if not mask[i]:
                continue
            pages = [((i, name, s), min(per_page, n - s) * itemsize)
                     for s in range(0, n, per_page) for name in STATE_NAMES]  # the update's order
            incoming = sum(nbytes for key, nbytes in pages if key not in resident)
            evict_until(budget - incoming, keep={key for key, _ in pages})
            for key, nbytes in pages:
                resident[key] = nbytes
                resident.move_to_end(key)
            evict_until(budget)
    return paged_out, list(resident)


@given(shapes=shapes_st, page_bytes=st.integers(1, 40), budget_fraction=st.floats(0, 1.1), steps=st.integers(1, 5),
       seed=st.integers(0, 2**16), prefetch=st.booleans(), data=st.data())
def test_pages_paged_out_are_the_least_recently_used(shapes, page_bytes, budget_fraction, steps, seed, prefetch, data):
    masks = data.draw(st.lists(st.lists(st.booleans(), min_size=len(shapes), max_size=len(shapes)),
                               min_size=steps, max_size=steps))
    budget = int(budget_fraction * sum(state_bytes(s) for s in shapes))
    params = make_params(shapes, seed)
    opt = PagedAdamW(params, page_bytes=page_bytes, device_budget_bytes=budget, prefetch=prefetch)
    paged_out = []
    real_page_out = opt.page_out
    opt.page_out = lambda page: (paged_out.append(page.key), real_page_out(page))
    train(opt, params, steps, seed, masks)
    expected_out, expected_lru = reference_lru([torch.Size(s).numel() for s in shapes], 4, page_bytes, budget, masks)
    assert paged_out == expected_out
    assert opt.lru_order() == expected_lru
    assert opt.stats.page_outs == len(expected_out)


@given(shapes=shapes_st, page_bytes=st.integers(1, 40), budget_fraction=st.floats(0, 1.1), steps=st.integers(1, 5),
       seed=st.integers(0, 2**16), prefetch=st.booleans())
def test_resident_bytes_never_exceed_the_budget(shapes, page_bytes, budget_fraction, steps, seed, prefetch):
    """Rule: at every page-in, resident <= max(budget, state bytes of that page's parameter);
    after step(), resident <= budget. The counters also obey conservation of bytes."""
    budget = int(budget_fraction * sum(state_bytes(s) for s in shapes))
    params = make_params(shapes, seed)
    opt = PagedAdamW(params, page_bytes=page_bytes, device_budget_bytes=budget, prefetch=prefetch)
    real_page_in, seen = opt.page_in, []

    def checked_page_in(page, stream=None):
        real_page_in(page, stream)
        seen.append(page)
        assert opt.stats.resident_bytes <= max(budget, state_bytes(shapes[page.param_index]))

    opt.page_in = checked_page_in
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        set_grads(params, gen)
        opt.step()
        table = opt.page_table()
        on_device = sum((stop - start) * 4 for _, _, start, stop, where, _ in table if where == "device")
        assert opt.stats.resident_bytes == on_device <= budget
        created = sum(state_bytes(s) for s in shapes)  # every parameter had a gradient
        assert opt.stats.resident_bytes == created + opt.stats.bytes_in - opt.stats.bytes_out
    assert opt.stats.peak_resident_bytes <= max(budget, max(state_bytes(s) for s in shapes))
    # the first page_in of each page allocates its zeros (AdamW's m_0 = v_0 = 0): not a move, not counted
    assert opt.stats.page_ins == len(seen) - len(table)
    assert opt.stats.bytes_in == sum(page.nbytes for page in seen) - sum(state_bytes(s) for s in shapes)


@given(shapes=shapes_st, page_bytes=page_bytes_st, steps=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_budget_none_never_pages(shapes, page_bytes, steps, seed):
    params = make_params(shapes, seed)
    opt = PagedAdamW(params, page_bytes=page_bytes, device_budget_bytes=None)
    train(opt, params, steps, seed)
    stats, total = opt.stats, sum(state_bytes(s) for s in shapes)
    assert (stats.page_ins, stats.page_outs, stats.bytes_in, stats.bytes_out) == (0, 0, 0, 0)
    assert stats.resident_bytes == stats.peak_resident_bytes == total
    table = opt.page_table()
    assert all(where == "device" for *_, where, _ in table)
    assert len(table) == 2 * len(shapes)  # nothing to page, so one page per state tensor (no per-page work)


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


@given(shapes=shapes_st, page_bytes=page_bytes_st, budgets=st.tuples(*[st.one_of(st.none(), st.floats(0, 1))] * 2),
       steps=st.tuples(st.integers(1, 4), st.integers(1, 4)), seed=st.integers(0, 2**16))
def test_state_dict_round_trip_mid_training_continues_identically(shapes, page_bytes, budgets, steps, seed):
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
    resumed = PagedAdamW(resumed_params, lr=0.05, page_bytes=page_bytes, device_budget_bytes=second)
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
    paged = PagedAdamW(params, lr=0.05, weight_decay=0.1, page_bytes=12, device_budget_bytes=budget)
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
    assert paged_again.param_groups[0]["lr"] == 0.05 and paged_again.state_dict()["param_groups"][0]["foreach"] is False


@given(shapes=shapes_st, page_bytes=st.integers(1, 40), budget_fraction=st.floats(0, 1), steps=st.integers(1, 5),
       seed=st.integers(0, 2**16), data=st.data())
def test_parameters_without_gradients_are_skipped_like_adamw(shapes, page_bytes, budget_fraction, steps, seed, data):
    masks = data.draw(st.lists(st.lists(st.booleans(), min_size=len(shapes), max_size=len(shapes)),
                               min_size=steps, max_size=steps))
    paged_params, ref_params = make_params(shapes, seed), make_params(shapes, seed)
    budget = int(budget_fraction * sum(state_bytes(s) for s in shapes))
    paged = PagedAdamW(paged_params, lr=0.05, page_bytes=page_bytes, device_budget_bytes=budget)
    ref = torch.optim.AdamW(ref_params, lr=0.05, foreach=False)
    train(paged, paged_params, steps, seed, masks)
    train(ref, ref_params, steps, seed, masks)
    assert_same_params(paged_params, ref_params)
    assert_same_state(paged.state_dict(), ref.state_dict())  # same keys: no state for never-updated params
    updated = {i for i in range(len(shapes)) if any(mask[i] for mask in masks)}
    assert {param_index for param_index, *_ in paged.page_table()} == updated


def test_half_budget_trains_a_module_to_the_same_bits_as_no_budget():
    """The issue's acceptance check in small: budget = half the state, real forward/backward."""
    def run(budget):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.LayerNorm(32), torch.nn.GELU(),
                                    torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 5))
        opt = PagedAdamW(model.parameters(), lr=3e-3, weight_decay=0.01, page_bytes=512, device_budget_bytes=budget)
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
    """Pages that start off any SIMD boundary, in tensors big enough for torch to split each op across
    threads (its grain is 32768 elements): still AdamW's bits."""
    shapes, seed = [(100_003,), (257, 301)], 7
    torch.set_num_threads(2)  # the module fixture restores one thread afterwards
    try:
        paged_params, ref_params = make_params(shapes, seed), make_params(shapes, seed)
        budget = sum(state_bytes(s) for s in shapes) // 2
        paged = PagedAdamW(paged_params, lr=0.01, weight_decay=0.1, page_bytes=4 * 30_001 + 4,
                           device_budget_bytes=budget)
        ref = torch.optim.AdamW(ref_params, lr=0.01, weight_decay=0.1, foreach=False)
        train(paged, paged_params, 3, seed)
        train(ref, ref_params, 3, seed)
    finally:
        torch.set_num_threads(1)
    assert_same_params(paged_params, ref_params)
    assert_same_state(paged.state_dict(), ref.state_dict())
    assert paged.stats.page_outs > 0


def test_non_contiguous_and_empty_parameters_match_adamw():
    def params():
        gen = torch.Generator().manual_seed(5)
        return [torch.nn.Parameter(torch.randn(6, 4, generator=gen).t()), torch.nn.Parameter(torch.zeros(0, 3)),
                torch.nn.Parameter(torch.randn((), generator=gen))]
    paged_params, ref_params = params(), params()
    assert not paged_params[0].is_contiguous()
    paged = PagedAdamW(paged_params, lr=0.1, page_bytes=20, device_budget_bytes=24)
    ref = torch.optim.AdamW(ref_params, lr=0.1, foreach=False)
    train(paged, paged_params, 4, 0)
    train(ref, ref_params, 4, 0)
    assert_same_params(paged_params, ref_params)
    assert_same_state(paged.state_dict(), ref.state_dict())


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1e-3), "lr"), (dict(lr=float("nan")), "lr"), (dict(betas=(1.0, 0.9)), r"betas\[0\]"),
    (dict(betas=(0.9, -0.1)), r"betas\[1\]"), (dict(betas=(0.9,)), "betas"), (dict(eps=-1.0), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(page_bytes=0), "page_bytes"),
    (dict(page_bytes=-4), "page_bytes"), (dict(page_bytes=2.5), "page_bytes"), (dict(page_bytes=True), "page_bytes"),
    (dict(device_budget_bytes=-1), "device_budget_bytes"), (dict(device_budget_bytes=1.5), "device_budget_bytes"),
])
def test_bad_arguments_raise_clear_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PagedAdamW([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_unsupported_options_and_mismatched_state_raise():
    param = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="amsgrad"):
        PagedAdamW([{"params": [param], "amsgrad": True}])
    adam = torch.optim.Adam([param])  # coupled weight decay: not AdamW
    param.grad = torch.ones(3)
    adam.step()
    with pytest.raises(ValueError, match="decoupled_weight_decay"):
        PagedAdamW([param]).load_state_dict(adam.state_dict())
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4))])
    other.param_groups[0]["params"][0].grad = torch.ones(4)
    other.step()
    with pytest.raises(ValueError, match="shape"):
        PagedAdamW([param]).load_state_dict(other.state_dict())
    param.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        PagedAdamW([param]).step()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@requires_cuda
@pytest.mark.parametrize("budget_fraction", [0.0, 0.5])
def test_cuda_matches_adamw_with_pinned_host_pages(budget_fraction):
    shapes, seed = [(256, 64), (64,), (64, 256), (300,)], 0
    budget = int(budget_fraction * sum(state_bytes(s) for s in shapes))
    paged_params, ref_params = make_params(shapes, seed, device="cuda"), make_params(shapes, seed, device="cuda")
    paged = PagedAdamW(paged_params, lr=0.01, page_bytes=4096, device_budget_bytes=budget)
    ref = torch.optim.AdamW(ref_params, lr=0.01, foreach=False)
    train(paged, paged_params, 6, seed)
    train(ref, ref_params, 6, seed)
    torch.cuda.synchronize()
    assert_same_params(paged_params, ref_params)
    assert_same_state(paged.state_dict(), ref.state_dict())
    host_pages = [page for s in paged.state.values() for name in STATE_NAMES for page in s[name + "_pages"]
                  if page.location == "host"]
    assert host_pages and all(page.host_data.is_pinned() and page.device_data is None for page in host_pages)
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
        # resident state <= max(budget, the state of the parameter being updated); plus the update's two
        # page-sized temporaries (sqrt, then the division); plus the allocator's 512-byte rounding per block
        pages = total // page_bytes + 2 * len(shapes)
        allowed = max(budget, max(state_bytes(s) for s in shapes)) + 2 * page_bytes + 512 * pages
        assert torch.cuda.max_memory_allocated() - baseline <= allowed
    assert opt.stats.page_outs > 0 and opt.stats.peak_resident_bytes <= budget
