"""Paging speed-ups for paged_optim.PagedAdamW: parameters in runs, a run's copies overlapping the
last run's update.

The plain loop these replace, and whose page moves and bits they keep (tests/test_paged_optim.py
pins the moves and compares PagedAdamW with torch.optim.AdamW bit for bit):
    for each parameter: bring its pages in (LRU victims out), update it, trim to the budget.
Runs batch the AdamW call (fast_paths/adamw_foreach.py) and the copies; with a side stream
(fast_paths/side_stream.py) the next run's page-ins run during this run's update. The copies are
asynchronous into pinned host memory, and page-ins reuse the device memory of the pages paged out.
"""
from collections import defaultdict

import torch


def cut_runs(todo, limit):
    """Split `todo`, (group, param, state) triples, into runs of one group's consecutive
    parameters whose state (m and v: twice the parameter's bytes) is at most `limit` bytes
    together (a larger one alone): (runs, their state bytes). Moves decided run by run are those
    of one parameter at a time: none is the LRU."""
    runs = []
    sizes = []
    for item in todo:
        size = 2 * item[1].numel() * item[1].element_size()
        if not runs or sizes[-1] + size > limit or item[0] is not runs[-1][0][0]:
            runs.append([])
            sizes.append(0)
        runs[-1].append(item)
        sizes[-1] += size
    return runs, sizes


def overlapped_runs(runs, sizes, budget, bring_in, update, trim, prefetcher):
    """for run in runs: bring_in(run); update(run); trim(), with the next run's bring_in issued
    before this run's update where both runs fit in `budget` bytes (None: no limit)."""
    early = False
    for n, run in enumerate(runs):
        if not early:  # else brought in during the last run's update
            bring_in(run)
        prefetcher.wait()
        early = n + 1 < len(runs) and budget is not None and sizes[n] + sizes[n + 1] <= budget
        if early:  # both runs fit: the next one's copies overlap this one's update
            bring_in(runs[n + 1])
        update(run)
        trim()


def copy_out(pages) -> dict:
    """Copy pages device -> host into their host buffers (pinned for CUDA, so asynchronous; made
    at the first page-out and kept); returns their device memory, {(numel, dtype): [tensors]},
    for copy_in to reuse. Pages: paged_optim.Page."""
    for page in (page for page in pages if page.host_data is None):
        page.host_data = torch.empty(page.shape, dtype=page.dtype,
                                     pin_memory=page.device.type == "cuda")
    if pages:
        torch._foreach_copy_([p.host_data for p in pages], [p.device_data for p in pages],
                             non_blocking=True)
    spare = defaultdict(list)
    for page in pages:
        spare[page.stop - page.start, page.dtype].append(page.device_data)
        page.device_data = None
    return spare


def copy_in(pages, spare, prefetcher):
    """Give pages device memory, reusing `spare` ({(numel, dtype): [freed tensors]}: fresh memory
    costs page faults), then zeros if new (m_0 = v_0 = 0), else their host copy, issued on the
    prefetcher's side stream."""
    for page in pages:
        reuse = (spare or {}).get((page.stop - page.start, page.dtype))
        if reuse:
            page.device_data = reuse.pop().view(page.shape)
        else:
            page.device_data = torch.empty(page.shape, dtype=page.dtype, device=page.device)
        if page.host_data is None:
            page.device_data.zero_()
    if moved := [page for page in pages if page.host_data is not None]:
        with prefetcher.stream(moved[0].device):
            torch._foreach_copy_([p.device_data for p in moved], [p.host_data for p in moved],
                                 non_blocking=True)


def gather(pages) -> torch.Tensor:
    """The pages' elements in order, wherever each lies, as one new flat CPU tensor; waits for
    the asynchronous page-outs first."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return torch.cat([(page.device_data if page.location == "device" else page.host_data)
                      .reshape(-1).cpu() for page in pages])
