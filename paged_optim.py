"""Paged AdamW: AdamW whose state lives in fixed-size pages, kept on the device up to a byte budget.

AdamW (Loshchilov & Hutter, arXiv 1711.05101, Algorithm 2) as torch.optim.AdamW has it (eta_t = lr,
alpha = 1, so the decay is lr * lambda); t counts updates from 1:
    theta <- theta - lr * lambda * theta                                 (decoupled weight decay)
    m_t = beta1 m_{t-1} + (1 - beta1) g_t,  v_t = beta2 v_{t-1} + (1 - beta2) g_t^2  (lines 7, 8)
    theta <- theta - lr * m_hat / (sqrt(v_hat) + eps),  m_hat = m_t / (1 - beta1^t),
                                                        v_hat = v_t / (1 - beta2^t)  (lines 9-12)
Elementwise: a tensor cut into pages updates to the same bits. Paging as in QLoRA (Dettmers et al.,
arXiv 2305.14314, section 3) by copies that `PageTable` decides (bitsandbytes: CUDA unified memory).
No amsgrad, maximize, fused, tensor lr, complex parameters. Speed-ups live in fast_paths/ (foreach
update, runs and copies, CUDA side stream).
"""
import dataclasses
from collections import OrderedDict, defaultdict

import torch

from checks import check_int, check_number, check_tensor
from fast_paths.adamw_foreach import adamw_step_foreach, supported
from fast_paths.paging import copy_in, copy_out, cut_runs, gather, overlapped_runs
from fast_paths.side_stream import SideStreamPrefetch

# 1 MiB: bookkeeping small next to the copy, a budget of a few MiB followed closely (bitsandbytes
# pages state tensors of >= 1e5 elements only, `Optimizer8bit.get_state_buffer`)
DEFAULT_PAGE_BYTES = 1 << 20
RUN_BYTES = 1 << 22  # state paged in for one update at most: it is still in cache when used
STATE_NAMES = ("exp_avg", "exp_avg_sq")  # torch.optim.AdamW's keys: each loads the other's state


# ---------------------------------------------------------------------------- the AdamW update
def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    """One AdamW update of one tensor, in place on param, exp_avg (m) and exp_avg_sq (v); `step` is
    t counting this update. torch.optim.AdamW(foreach=False)'s operations in its order: its bits."""
    beta1, beta2 = betas
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)  # theta <- theta - lr * lambda * theta
    exp_avg.lerp_(grad, 1 - beta1)  # m_t = beta1 m_{t-1} + (1 - beta1) g_t
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v_t = beta2 v + (1-beta2) g^2
    bias_correction1 = 1 - beta1 ** step  # m_hat = m_t / (1 - beta1^t)
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5  # sqrt(v_hat) = sqrt(v_t) / sqrt(1-beta2^t)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)  # sqrt(v_hat) + eps
    param.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))  # theta -= lr m_hat / denom


# ------------------------------------------------------------------------------ the page table
@dataclasses.dataclass(eq=False)  # eq=False: hashed by identity, as keys of the LRU list
class Page:
    """Elements [start, stop) of one flattened state tensor, and where they are."""
    param_index: int  # the parameter's position across all param groups (as in state_dict)
    state_name: str  # "exp_avg" or "exp_avg_sq"
    start: int
    stop: int  # a tensor's last page is shorter; no padding, so the bytes are exact
    nbytes: int
    shape: tuple  # the parameter's shape if the page is the whole tensor, else (stop - start,)
    dtype: torch.dtype  # and device: the parameter's, as torch.zeros_like(param) in AdamW
    device: torch.device
    location: str = "unallocated"  # "device" or "host" once the table has placed it
    last_used: int = 0  # tick of the last update that needed this page: the LRU key
    device_data: torch.Tensor | None = None
    host_data: torch.Tensor | None = None  # kept from the first page-out on: the backing store


@dataclasses.dataclass
class PagingStats:
    page_ins: int = 0  # host -> device moves of one page (not the first allocation of zeros)
    page_outs: int = 0  # device -> host moves of one page
    bytes_in: int = 0
    bytes_out: int = 0
    resident_bytes: int = 0  # optimizer state on the device now
    peak_resident_bytes: int = 0  # the most ever at once


class PageTable:
    """Fixed-size pages, which of them are on the device, and the rule that decides which move.

    Rule: before a parameter's update all its pages are made resident; if the resident bytes would
    exceed the budget, the least recently used pages of other parameters are paged out first. A
    parameter whose state alone exceeds the budget is still made resident, and paged out down to
    the budget after its update. So at every moment
        resident bytes <= max(budget_bytes, state bytes of the parameter being updated),
    and between steps resident <= budget_bytes (0: nothing stays; None: no limit, nothing moves,
    one page per state tensor). The table decides and counts; PagedAdamW copies."""

    def __init__(self, page_bytes, budget_bytes, stats):
        self.page_bytes = page_bytes
        self.budget_bytes = budget_bytes
        self.stats = stats
        self.limit = float("inf") if budget_bytes is None else budget_bytes
        self.lru = OrderedDict()  # resident pages, least recently used first
        self.tick = 0

    def cut(self, param, param_index):
        """A parameter's pages in update order, m's and v's of each range (one without a budget)."""
        numel = param.numel()
        itemsize = param.element_size()
        whole = self.budget_bytes is None or not param.is_contiguous()  # views would be copies
        per_page = max(1, numel if whole else self.page_bytes // itemsize)
        bounds = [(a, min(a + per_page, numel)) for a in range(0, numel, per_page)] or [(0, 0)]
        return [Page(param_index, name, start, stop, (stop - start) * itemsize,
                     tuple(param.shape) if len(bounds) == 1 else (stop - start,), param.dtype,
                     param.device) for start, stop in bounds for name in STATE_NAMES]

    def make_resident(self, pages):
        """Mark one parameter's pages resident and most recently used: (victims, incoming)."""
        incoming = [page for page in pages if page.location != "device"]
        victims = self.over_budget(sum(page.nbytes for page in incoming), keep=set(pages))
        for page in incoming:
            if page.location == "host" and self.budget_bytes is not None:  # None: a loaded page
                self.stats.page_ins += 1
                self.stats.bytes_in += page.nbytes
            page.location = "device"
            self.stats.resident_bytes += page.nbytes
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes,
                                             self.stats.resident_bytes)
        for page in pages:
            self.tick += 1
            page.last_used = self.tick
            self.lru[page] = None
            self.lru.move_to_end(page)
        return victims, incoming

    def over_budget(self, incoming_bytes=0, keep=()):
        """Least recently used pages not in `keep` to page out for `incoming_bytes` more."""
        excess = self.stats.resident_bytes + incoming_bytes - self.limit
        victims = []
        for page in self.lru:  # least recently used first; stops at the first it need not move
            if excess <= 0:
                break
            if page not in keep:
                victims.append(page)
                excess -= page.nbytes
        for page in victims:
            del self.lru[page]
            page.location = "host"
            self.stats.page_outs += 1
            self.stats.bytes_out += page.nbytes
            self.stats.resident_bytes -= page.nbytes
        return victims


# ------------------------------------------------------------------------------- the optimizer
def _check_hyperparameters(group, prefix=""):
    for key in ("lr", "eps", "weight_decay"):
        check_number(group[key], prefix + key, low=0, high=1e30)  # x / (1 - beta1) fits float32
    if not isinstance(group["betas"], (tuple, list)) or len(group["betas"]) != 2:
        raise ValueError(f"{prefix}betas must be a pair (beta1, beta2), got {group['betas']!r}")
    for i, beta in enumerate(group["betas"]):
        check_number(beta, f"{prefix}betas[{i}]", low=0, high=1, high_open=True)
    flags = [group.get(k, k[0] == "d") for k in ("amsgrad", "maximize", "decoupled_weight_decay")]
    if flags != [False, False, True]:
        raise ValueError(f"{prefix}(amsgrad, maximize, decoupled_weight_decay) must be [False, "
                         f"False, True] (the others are not supported), got {flags}")


class PagedAdamW(torch.optim.Optimizer):
    """AdamW with exp_avg and exp_avg_sq in pages: at most `device_budget_bytes` of them on the
    device between steps (None: no limit), the rest in host memory. Every other step goes through
    the parameters backwards, first to the pages LRU kept (a fixed cycle moves every page)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 page_bytes=DEFAULT_PAGE_BYTES, device_budget_bytes=None):
        self.page_bytes = check_int(page_bytes, "page_bytes", low=1)
        if device_budget_bytes is not None:
            check_int(device_budget_bytes, "device_budget_bytes (None: no limit)", low=0)
        self.device_budget_bytes = device_budget_bytes
        self.stats = PagingStats()
        self.table = PageTable(page_bytes, device_budget_bytes, self.stats)
        self.prefetcher = SideStreamPrefetch()  # fast_paths/side_stream.py: no-op off CUDA
        self.steps_taken = 0
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      amsgrad=False, maximize=False, foreach=False))  # as AdamW's

    def add_param_group(self, param_group):
        _check_hyperparameters({**self.defaults, **param_group})  # before anything is added
        super().add_param_group(param_group)
        params = [param for group in self.param_groups for param in group["params"]]
        if not all(p.is_floating_point() for p in params) or len({p.device for p in params}) > 1:
            self.param_groups.pop()
            raise ValueError("params must be real floating-point tensors, all on one device")

    def page_table(self):
        """Every page as (param_index, state_name, start, stop, location, last_used)."""
        return [(page.param_index, page.state_name, page.start, page.stop, page.location,
                 page.last_used) for state in self.state.values() for page in state["pages"]]

    def lru_order(self):
        """(param_index, state_name, start) of the resident pages, least recently used first."""
        return [(page.param_index, page.state_name, page.start) for page in self.table.lru]

    def page_out(self, pages) -> dict:
        """Copy pages device -> host and free their device memory, returned for page_in to reuse
        (fast_paths/paging.py)."""
        return copy_out(pages)

    def page_in(self, pages, spare=None):
        """Give pages device memory, then zeros if new (m_0 = v_0 = 0), else the host copy
        (fast_paths/paging.py: reusing `spare` memory, on the side stream)."""
        copy_in(pages, spare, self.prefetcher)

    def _bring_in(self, run):
        """Decide a run's moves, page out the victims, page in the rest into their memory."""
        moves = [self.table.make_resident(state["pages"]) for _, _, state in run]
        spare = self.page_out([page for victims, _ in moves for page in victims])
        self.page_in([page for _, pages in moves for page in pages], spare)

    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            loss = None if closure is None else closure()
        params = [(group, param) for group in self.param_groups for param in group["params"]]
        if any(param.grad is not None and param.grad.is_sparse for _, param in params):
            raise RuntimeError("PagedAdamW does not support sparse gradients")
        # Checked again each step because param_groups are public and change between steps
        # (learning-rate schedulers write group["lr"]); five numbers a group, no tensor touched.
        for group in self.param_groups:
            _check_hyperparameters(group, "param_groups: ")
        todo = [(group, param, self._state_of(param, i)) for i, (group, param)
                in enumerate(params) if param.grad is not None]  # as AdamW
        self.steps_taken += 1  # even steps backwards (see the class doc)
        order = todo[:: 1 if self.steps_taken % 2 else -1]
        runs, sizes = cut_runs(order, min(self.table.limit / 2, RUN_BYTES))
        # for run in runs: self._bring_in(run); self._update(run); trim to the budget (a parameter
        # larger than the budget), with copies overlapping updates: fast_paths/paging.py
        overlapped_runs(runs, sizes, self.device_budget_bytes, self._bring_in, self._update,
                        lambda: self.page_out(self.table.over_budget()), self.prefetcher)
        return loss

    def _state_of(self, param, index):
        if not self.state[param]:  # AdamW's step count, an int; pages get memory when first needed
            self.state[param].update(step=0, pages=self.table.cut(param, index))
        return self.state[param]

    def _update(self, run):
        """AdamW on every page of a run: pages cut the parameter and gradient at the same bounds."""
        pieces = []
        for _, param, state in run:
            state["step"] += 1
            m_pages = state["pages"][0::2]
            v_pages = state["pages"][1::2]
            sizes = [page.stop - page.start for page in m_pages]
            # one page: the whole tensor, shaped like it; else (n,) views at the pages' bounds
            params = [param] if len(sizes) == 1 else param.view(-1).split(sizes)
            grads = [param.grad] if len(sizes) == 1 else param.grad.reshape(-1).split(sizes)
            pieces += [(p, g, m.device_data, v.device_data, state["step"])
                       for p, g, m, v in zip(params, grads, m_pages, v_pages)]
        hyper = [run[0][0][key] for key in ("lr", "betas", "eps", "weight_decay")]
        # equals adamw_step: tests/test_paged_optim.py::test_adamw_step_foreach_passes_the_oracle
        batched = []
        for piece in pieces:
            if supported(piece[0]):
                batched.append(piece)
            else:
                adamw_step(*piece, *hyper)  # CUDA and 16-bit tensors: one at a time
        adamw_step_foreach(batched, *hyper)

    def state_dict(self):
        """AdamW's layout ({"state": {i: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups"})."""
        params = [param for group in self.param_groups for param in group["params"]]
        state = {}
        for i, param in enumerate(params):
            if saved := self.state.get(param):
                state[i] = {"step": torch.tensor(float(saved["step"]), dtype=torch.float32)}
                for k, name in enumerate(STATE_NAMES):  # (N,) from its pages, a new tensor
                    state[i][name] = gather(saved["pages"][k::2]).view(param.shape)
        return {"state": state, "param_groups": super().state_dict()["param_groups"]}

    def load_state_dict(self, state_dict):
        """Load ours or AdamW's, checked first (a bad value changes nothing), into host memory."""
        groups = state_dict["param_groups"]
        params = [param for group in self.param_groups for param in group["params"]]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("state_dict['param_groups'] must match this optimizer's group sizes")
        for k, saved in enumerate(groups):
            _check_hyperparameters(saved, f"state_dict['param_groups'][{k}]: ")
        if bad := [i for i in state_dict["state"] if i not in range(len(params))]:
            raise ValueError(f"state_dict['state'] has keys {bad}, not parameter indices")
        checked = {}  # i -> (step, [exp_avg, exp_avg_sq] as flat CPU copies in the param's dtype)
        for i, saved in state_dict["state"].items():
            step = saved.get("step")
            name = f"state[{i}]"
            step = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 else step
            if check_number(step, name + "['step']", low=1) != int(step):
                raise ValueError(f"{name}['step'] must be a whole number >= 1, got {step!r}")
            tensors = [check_tensor(saved.get(key), f"{name}[{key!r}]", finite=True)
                       for key in STATE_NAMES]
            if bad := [(k, t) for k, t in zip(STATE_NAMES, tensors) if t.shape != params[i].shape]:
                raise ValueError(f"{name}[{bad[0][0]!r}] has shape {tuple(bad[0][1].shape)}, not "
                                 f"the parameter's {tuple(params[i].shape)}")
            if bool((tensors[1] < 0).any()):
                raise ValueError(f"{name}['exp_avg_sq'] has negative values (a second moment)")
            flats = [t.detach().to("cpu", params[i].dtype, copy=True).reshape(-1) for t in tensors]
            checked[i] = int(step), [f.pin_memory() if params[i].is_cuda else f for f in flats]
        self.stats.resident_bytes = 0
        self.state = defaultdict(dict)
        self.table = PageTable(self.page_bytes, self.device_budget_bytes, self.stats)
        for i, (step, flats) in checked.items():
            self._state_of(params[i], i)["step"] = step
            for k, page in enumerate(self.state[params[i]]["pages"]):
                page.location = "host"
                page.host_data = flats[k % 2][page.start:page.stop].view(page.shape)
        for group, saved in zip(self.param_groups, groups):  # foreach stays False
            group.update({k: v for k, v in saved.items() if k not in ("params", "foreach")})
