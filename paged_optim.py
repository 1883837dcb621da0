"""Paged AdamW: AdamW whose state lives in fixed-size pages, kept on the device up to a byte budget.

AdamW (Loshchilov & Hutter, arXiv 1711.05101, Algorithm 2) as torch.optim.AdamW has it (eta_t = lr,
alpha = 1, so the decay is lr * lambda); t counts updates from 1:
    theta <- theta - lr * lambda * theta                                 (decoupled weight decay)
    m_t = beta1 m_{t-1} + (1 - beta1) g_t,  v_t = beta2 v_{t-1} + (1 - beta2) g_t^2  (lines 7, 8)
    theta <- theta - lr * m_hat / (sqrt(v_hat) + eps),  m_hat = m_t / (1 - beta1^t),
                                                        v_hat = v_t / (1 - beta2^t)  (lines 9-12)
Elementwise: a tensor cut into pages updates to the same bits. Paging as in QLoRA (Dettmers et al.,
arXiv 2305.14314, section 3) by copies that `PageTable` decides (bitsandbytes: CUDA unified memory).
No amsgrad, maximize, fused, tensor lr, complex parameters."""
import contextlib
import dataclasses
from collections import OrderedDict, defaultdict

import torch

from checks import check_int, check_number, check_tensor

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

# ---------------------------------------------- speed: many tensors a call, in cache-sized batches
BATCH_ELEMENTS = 1 << 18  # a batch's tensors (5 x 1 MiB in float32) stay in cache between lines

def adamw_step_foreach(pieces, lr, betas, eps, weight_decay):
    """adamw_step on (param, grad, exp_avg, exp_avg_sq, step) pieces, a _foreach_ call a line per
    batch: on CPU, the single-tensor kernel on each tensor (same bits, fewer Python calls). Else
    adamw_step: CUDA's _foreach_ kernels differ; for 16-bit floats _foreach_mul_ rounds scalars."""
    (beta1, beta2), batches, size = betas, [[]], 0
    for piece in pieces:
        if piece[0].device.type != "cpu" or piece[0].dtype not in (torch.float32, torch.float64):
            adamw_step(*piece, lr, betas, eps, weight_decay)
            continue
        batches[-1].append(piece)
        size += piece[0].numel()
        if size >= BATCH_ELEMENTS:
            batches, size = batches + [[]], 0
    for params, grads, exp_avgs, exp_avg_sqs, steps in (map(list, zip(*b)) for b in batches if b):
        if weight_decay != 0:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, [(1 - beta2 ** step) ** 0.5 for step in steps])
        torch._foreach_add_(denoms, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denoms, [-lr / (1 - beta1**t) for t in steps])

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
        self.page_bytes, self.budget_bytes, self.stats = page_bytes, budget_bytes, stats
        self.limit = float("inf") if budget_bytes is None else budget_bytes
        self.lru, self.tick = OrderedDict(), 0  # resident pages, least recently used first

    def cut(self, param, param_index):
        """A parameter's pages in update order, m's and v's of each range (one without a budget)."""
        numel, itemsize = param.numel(), param.element_size()
        whole = self.budget_bytes is None or not param.is_contiguous()  # views would be copies
        per_page = max(1, numel if whole else self.page_bytes // itemsize)
        bounds = [(a, min(a + per_page, numel)) for a in range(0, numel, per_page)] or [(0, 0)]
        return [Page(param_index, name, start, stop, (stop - start) * itemsize,
                     tuple(param.shape) if len(bounds) == 1 else (stop - start,), param.dtype,
                     param.device) for start, stop in bounds for name in STATE_NAMES]

    def make_resident(self, pages):
        """Mark one parameter's pages resident and most recently used: (victims, incoming)."""
        incoming, stats = [page for page in pages if page.location != "device"], self.stats
        victims = self.over_budget(sum(page.nbytes for page in incoming), keep=set(pages))
        for page in incoming:
            if page.location == "host" and self.budget_bytes is not None:  # None: a loaded page
                stats.page_ins, stats.bytes_in = stats.page_ins + 1, stats.bytes_in + page.nbytes
            page.location, stats.resident_bytes = "device", stats.resident_bytes + page.nbytes
        stats.peak_resident_bytes = max(stats.peak_resident_bytes, stats.resident_bytes)
        for page in pages:
            self.tick, page.last_used, self.lru[page] = self.tick + 1, self.tick + 1, None
            self.lru.move_to_end(page)
        return victims, incoming

    def over_budget(self, incoming_bytes=0, keep=()):
        """Least recently used pages not in `keep` to page out for `incoming_bytes` more."""
        excess, victims = self.stats.resident_bytes + incoming_bytes - self.limit, []
        for page in self.lru:  # least recently used first; stops at the first it need not move
            if excess <= 0:
                break
            if page not in keep:
                victims, excess = victims + [page], excess - page.nbytes
        for page in victims:
            del self.lru[page]
            page.location, self.stats.page_outs = "host", self.stats.page_outs + 1
            self.stats.bytes_out += page.nbytes
            self.stats.resident_bytes -= page.nbytes
        return victims

# ------------------------------------------------------------ CUDA: prefetch on a side stream
@dataclasses.dataclass
class SideStreamPrefetch:
    """Page-ins of the next run of parameters on a second CUDA stream, overlapping this run's
    update on the current stream. Off CUDA copies are synchronous: these do nothing."""
    streams: dict = dataclasses.field(default_factory=dict)  # CUDA device -> its side stream

    def stream(self, device):
        """Copies on the side stream, after the current stream's page-outs and allocations."""
        if device.type != "cuda":
            return contextlib.nullcontext()
        side = self.streams[device] = self.streams.get(device) or torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        return torch.cuda.stream(side)

    def wait(self):
        """Before an update: the current streams wait for the copies issued so far."""
        for device, side in self.streams.items():
            torch.cuda.current_stream(device).wait_stream(side)

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
        self.device_budget_bytes, self.stats = device_budget_bytes, PagingStats()
        self.table = PageTable(page_bytes, device_budget_bytes, self.stats)
        self.prefetcher, self.steps_taken = SideStreamPrefetch(), 0
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

    def page_out(self, pages):
        """Copy pages device -> host (pinned for CUDA: asynchronous); free their device memory."""
        for page in (page for page in pages if page.host_data is None):
            page.host_data = torch.empty(page.shape, dtype=page.dtype,
                                         pin_memory=page.device.type == "cuda")
        if pages:
            torch._foreach_copy_([p.host_data for p in pages], [p.device_data for p in pages],
                                 non_blocking=True)
        for page in pages:
            page.device_data = None

    def page_in(self, pages, spare=None):
        """Give pages device memory (reusing `spare`, {(numel, dtype): [freed tensors]}: fresh
        memory costs page faults), then zeros if new (m_0 = v_0 = 0), else the host copy."""
        for page in pages:
            reuse = (spare or {}).get((page.stop - page.start, page.dtype))
            page.device_data = reuse.pop().view(page.shape) if reuse else torch.empty(
                page.shape, dtype=page.dtype, device=page.device)
            if page.host_data is None:
                page.device_data.zero_()
        if moved := [page for page in pages if page.host_data is not None]:
            with self.prefetcher.stream(moved[0].device):
                torch._foreach_copy_([p.device_data for p in moved], [p.host_data for p in moved],
                                     non_blocking=True)

    def _runs(self, todo):
        """Runs of a group's consecutive parameters within half the budget and RUN_BYTES, and their
        bytes. Moves decided run by run are those of one parameter at a time: none is the LRU."""
        runs, sizes, limit = [], [], min(self.table.limit / 2, RUN_BYTES)
        for group, param, state in todo:
            nbytes = 2 * param.numel() * param.element_size()
            if not runs or sizes[-1] + nbytes > limit or group is not runs[-1][0][0]:
                runs, sizes = runs + [[]], sizes + [0]
            runs[-1].append((group, param, state))
            sizes[-1] += nbytes
        return runs, sizes

    def _bring_in(self, run):
        """Decide a run's moves, page out the victims, page in the rest."""
        moves = [self.table.make_resident(state["pages"]) for _, _, state in run]
        victims, spare = [page for out, _ in moves for page in out], defaultdict(list)
        for page in victims:  # their device memory goes to the incoming pages
            spare[page.stop - page.start, page.dtype].append(page.device_data)
        self.page_out(victims)
        self.page_in([page for _, pages in moves for page in pages], spare)

    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            loss = None if closure is None else closure()
        params = [(group, param) for group in self.param_groups for param in group["params"]]
        if any(param.grad is not None and param.grad.is_sparse for _, param in params):
            raise RuntimeError("PagedAdamW does not support sparse gradients")
        for group in self.param_groups:  # again: a group's values may have been edited since
            _check_hyperparameters(group, "param_groups: ")
        todo = [(group, param, self._state_of(param, i)) for i, (group, param)
                in enumerate(params) if param.grad is not None]  # as AdamW
        self.steps_taken += 1  # even steps backwards (see the class doc)
        runs, sizes = self._runs(todo[:: 1 if self.steps_taken % 2 else -1])
        budget, early = self.device_budget_bytes, False
        for n, run in enumerate(runs):
            if not early:  # else paged in during the last run's update
                self._bring_in(run)
            self.prefetcher.wait()
            early = n + 1 < len(runs) and budget is not None and sizes[n] + sizes[n + 1] <= budget
            if early:  # both runs fit: the next one's copies overlap this one's update
                self._bring_in(runs[n + 1])
            self._update(run)
            self.page_out(self.table.over_budget())  # trim a parameter larger than the budget
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
            m_pages, v_pages = state["pages"][0::2], state["pages"][1::2]
            params, grads = [param], [param.grad]  # one page: the whole tensor, shaped like it
            if len(m_pages) > 1:  # (n,) views at the pages' bounds
                sizes = [page.stop - page.start for page in m_pages]
                params, grads = param.view(-1).split(sizes), param.grad.reshape(-1).split(sizes)
            pieces += [(p, g, m.device_data, v.device_data, state["step"])
                       for p, g, m, v in zip(params, grads, m_pages, v_pages)]
        adamw_step_foreach(pieces, *(run[0][0][k] for k in ("lr", "betas", "eps", "weight_decay")))

    def state_dict(self):
        """AdamW's layout ({"state": {i: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups"})."""
        torch.cuda.synchronize() if torch.cuda.is_available() else None  # async page-outs
        params, state = [param for group in self.param_groups for param in group["params"]], {}
        for i, param in enumerate(params):
            if saved := self.state.get(param):
                state[i] = {"step": torch.tensor(float(saved["step"]), dtype=torch.float32)}
                for k, name in enumerate(STATE_NAMES):  # (N,) from its pages, a new tensor
                    state[i][name] = torch.cat([(page.device_data if page.location == "device"
                                                 else page.host_data).reshape(-1).cpu()
                                                for page in saved["pages"][k::2]]).view(param.shape)
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
            step, name = saved.get("step"), f"state[{i}]"
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
        self.stats.resident_bytes, self.state = 0, defaultdict(dict)
        self.table = PageTable(self.page_bytes, self.device_budget_bytes, self.stats)
        for i, (step, flats) in checked.items():
            self._state_of(params[i], i)["step"] = step
            for k, page in enumerate(self.state[params[i]]["pages"]):
                page.location = "host"
                page.host_data = flats[k % 2][page.start:page.stop].view(page.shape)
        for group, saved in zip(self.param_groups, groups):  # foreach stays False
            group.update({k: v for k, v in saved.items() if k not in ("params", "foreach")})
