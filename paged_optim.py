"""Paged AdamW: optimizer state in fixed-size pages, kept on the device up to a byte budget.

QLoRA (Dettmers et al., arXiv 2305.14314, section 3, "Paged Optimizers"): the optimizer state is
evicted to CPU RAM when the GPU runs out of memory and paged back when the update step needs it, so a
memory spike does not end training. bitsandbytes allocates the state in CUDA unified (managed) memory
and lets the driver migrate its pages; here every move is an explicit copy between the parameter's
device and host memory (pinned when the device is CUDA), chosen by a page table and a
least-recently-used rule that one can read and test.

The update is AdamW (Loshchilov & Hutter, arXiv 1711.05101, Algorithm 2) in torch.optim.AdamW's form,
where the weight decay is scaled by the learning rate (lr * lambda) and the schedule multiplier is lr:
    theta <- theta - lr * lambda * theta                                  (decoupled weight decay)
    m_t   = beta1 * m_{t-1} + (1 - beta1) * g_t                           (first moment)
    v_t   = beta2 * v_{t-1} + (1 - beta2) * g_t^2                         (second moment)
    theta <- theta - lr / (1 - beta1^t) * m_t / (sqrt(v_t) / sqrt(1 - beta2^t) + eps)
with the same floating-point operations, in the same order, as torch's single-tensor path
(`torch.optim.adam._single_tensor_adam`), so the parameters equal `AdamW(foreach=False)`'s bit for bit.
AdamW is elementwise, so updating page by page with the matching slice of the parameter is exact.

Paging rule (checked by the tests): before parameter i's update all of its pages are made resident;
if the resident bytes would exceed the budget, the least recently used pages of other parameters are
paged out first. A parameter whose state alone exceeds the budget is still made resident, and paged
out down to the budget right after its update. So at every moment
    resident state bytes <= max(device_budget_bytes, state bytes of the parameter being updated),
and after step() resident <= device_budget_bytes (0: nothing stays on the device between steps;
None: no limit, nothing is ever paged: plain AdamW).

Deviations and limitations: amsgrad, maximize, capturable/fused/foreach and tensor-valued lr or betas
are not supported; sparse gradients raise like AdamW. The budget counts optimizer state only (not
parameters, gradients or the update's temporaries) summed over all devices. Without a budget each
state tensor is a single page (nothing is ever paged, so page_bytes is not used).
"""
import contextlib
import dataclasses
from collections import OrderedDict, defaultdict

import torch

# 1 MiB pages: large enough that the per-page Python work is small next to the copy it describes
# (262,144 float32 elements), small enough to follow a budget of a few MiB closely. For scale,
# bitsandbytes pages only state tensors of at least 1e5 elements (`p.numel() < 1e5` in its
# `Optimizer8bit.get_state_buffer` keeps smaller ones as ordinary device tensors).
DEFAULT_PAGE_BYTES = 1 << 20
# torch.optim.AdamW's state keys; state_dict() uses them so that the two optimizers load each other.
STATE_NAMES = ("exp_avg", "exp_avg_sq")


@dataclasses.dataclass(eq=False)  # eq=False: pages are hashed by identity, as keys of the LRU list
class Page:
    """One page of one state tensor: elements [start, stop) of the flattened tensor, and where it is."""
    param_index: int  # the parameter's position across all param groups (as in state_dict)
    state_name: str  # "exp_avg" or "exp_avg_sq"
    start: int
    stop: int  # the last page of a tensor is shorter; no padding, so the bytes are exact
    device: torch.device  # the device tier: the parameter's device
    dtype: torch.dtype  # the parameter's dtype, like torch.zeros_like(param) in AdamW
    shape: tuple  # the parameter's shape if the page is the whole tensor (no views to make), else (n,)
    nbytes: int
    on_device: bool = False  # False before the first update (unallocated) or after a page-out
    device_data: torch.Tensor | None = None  # the page on the device; present iff on_device
    host_data: torch.Tensor | None = None  # backing copy in host memory, allocated at the first page-out
    last_used: int = 0  # tick of the last update that read this page: the LRU key
    ready: "torch.cuda.Event | None" = None  # CUDA: when the last copy into or out of this page is done

    @property
    def key(self):
        return (self.param_index, self.state_name, self.start)

    @property
    def location(self):
        return "device" if self.on_device else "host" if self.host_data is not None else "unallocated"


@dataclasses.dataclass
class PagingStats:
    page_ins: int = 0  # host -> device copies of one page
    page_outs: int = 0  # device -> host copies of one page
    bytes_in: int = 0
    bytes_out: int = 0
    resident_bytes: int = 0  # optimizer state on the device now
    peak_resident_bytes: int = 0  # the most state ever on the device at once

    def as_dict(self):
        return dataclasses.asdict(self)


def _require(ok, name, expected, got):
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {got!r}")


def _is_number(x, kinds=(int, float)):
    return isinstance(x, kinds) and not isinstance(x, bool)


def _check_hyperparameters(lr, betas, eps, weight_decay):
    # `not x >= 0` also rejects NaN
    _require(_is_number(lr) and lr >= 0, "lr", "a number >= 0", lr)
    _require(isinstance(betas, (tuple, list)) and len(betas) == 2, "betas", "a pair (beta1, beta2)", betas)
    for i, beta in enumerate(betas):
        _require(_is_number(beta) and 0 <= beta < 1, f"betas[{i}]", "a number in [0, 1)", beta)
    _require(_is_number(eps) and eps >= 0, "eps", "a number >= 0", eps)
    _require(_is_number(weight_decay) and weight_decay >= 0, "weight_decay", "a number >= 0", weight_decay)


def _record_event(device):
    """An event on the current stream of `device` if it is a CUDA device; elsewhere copies are synchronous."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


class PagedAdamW(torch.optim.Optimizer):
    """AdamW whose exp_avg and exp_avg_sq live in pages, paged to host memory beyond a device budget."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 page_bytes=DEFAULT_PAGE_BYTES, device_budget_bytes=None, *, prefetch=True):
        _check_hyperparameters(lr, betas, eps, weight_decay)
        _require(_is_number(page_bytes, int) and page_bytes > 0, "page_bytes", "a positive int", page_bytes)
        _require(device_budget_bytes is None or _is_number(device_budget_bytes, int) and device_budget_bytes >= 0,
                 "device_budget_bytes", "None (no limit) or an int >= 0", device_budget_bytes)
        # amsgrad/maximize/foreach are written out so that torch.optim.AdamW, loading our state_dict,
        # runs the same single-tensor update rather than its defaults' choice.
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=False, maximize=False, foreach=False)
        super().__init__(params, defaults)
        self.page_bytes = page_bytes
        self.device_budget_bytes = device_budget_bytes
        self.prefetch = prefetch  # page in the next parameter during this one's update (a side stream on CUDA)
        self.stats = PagingStats()
        self._resident = OrderedDict()  # resident pages, least recently used first: the LRU list
        self._tick = 0
        self._side_streams = {}  # CUDA device -> the stream that prefetch copies run on

    def add_param_group(self, param_group):
        group = {**self.defaults, **param_group}  # what the group will hold; checked before it is added
        _check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        _require(not group["amsgrad"] and not group["maximize"], "amsgrad and maximize", "False (not supported)",
                 (group["amsgrad"], group["maximize"]))
        super().add_param_group(param_group)

    # --- the page table -------------------------------------------------------------------------------
    def _all_params(self):
        return [p for group in self.param_groups for p in group["params"]]

    def _pages(self, state):
        return state["exp_avg_pages"] + state["exp_avg_sq_pages"]

    def _new_state(self, param, param_index):
        """Cut exp_avg and exp_avg_sq into pages; they are allocated (zeros) when first made resident."""
        numel, itemsize = param.numel(), param.element_size()
        # no budget, nothing to page: one page per tensor, so no per-page Python work (plain AdamW speed)
        elements_per_page = max(1, numel if self.device_budget_bytes is None else self.page_bytes // itemsize)
        bounds = [(start, min(start + elements_per_page, numel)) for start in range(0, numel, elements_per_page)]
        state = {"step": torch.tensor(0.0)}  # a float32 CPU scalar, as AdamW keeps it (not capturable)
        for name in STATE_NAMES:
            state[name + "_pages"] = [
                Page(param_index, name, start, stop, param.device, param.dtype,
                     tuple(param.shape) if len(bounds) == 1 else (stop - start,), (stop - start) * itemsize)
                for start, stop in bounds]
        return state

    def page_table(self):
        """Every page as (param_index, state_name, start, stop, location, last_used)."""
        return [(pg.param_index, pg.state_name, pg.start, pg.stop, pg.location, pg.last_used)
                for state in self.state.values() if "step" in state for pg in self._pages(state)]

    def lru_order(self):
        """Keys (param_index, state_name, start) of the resident pages, least recently used first."""
        return [page.key for page in self._resident]

    # --- moves ----------------------------------------------------------------------------------------
    def _wait_ready(self, page):
        """Order the use of a page after its last copy: the current stream waits (device), the CPU (host)."""
        if page.ready is None:
            return
        if page.on_device:
            stream = torch.cuda.current_stream(page.device)
            stream.wait_event(page.ready)
            # allocated on the side stream, used on this one: the allocator must not reuse its memory
            # until this stream's work on it is done
            page.device_data.record_stream(stream)
        else:
            page.ready.synchronize()
        page.ready = None

    def page_in(self, page, stream=None):
        """Make one page resident: copy host -> device (on `stream` when given), or allocate zeros if new."""
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if page.host_data is None:  # first use: AdamW's zero initial moments, not a move
                page.device_data = torch.zeros(page.shape, dtype=page.dtype, device=page.device)
            else:
                if page.ready is not None:  # the page-out that filled host_data must have landed
                    torch.cuda.current_stream(page.device).wait_event(page.ready)
                page.device_data = torch.empty_like(page.host_data, device=page.device)
                page.device_data.copy_(page.host_data, non_blocking=page.host_data.is_pinned())
                self.stats.page_ins += 1
                self.stats.bytes_in += page.nbytes
            page.ready = _record_event(page.device)
        self._mark_resident(page)

    def _mark_resident(self, page):
        page.on_device = True
        self._resident[page] = None  # newest in the LRU list
        self.stats.resident_bytes += page.nbytes
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, self.stats.resident_bytes)

    def page_out(self, page):
        """Evict one page: copy device -> host on the current stream, then free its device memory."""
        self._wait_ready(page)
        pinned = page.device.type == "cuda"  # pinned memory makes the copy asynchronous (DMA)
        if page.host_data is None:  # kept afterwards: pinned allocations are slow, and it is the backing
            page.host_data = torch.empty(page.shape, dtype=page.dtype, pin_memory=pinned)
        page.host_data.copy_(page.device_data, non_blocking=pinned)
        page.ready = _record_event(page.device)
        # freed at once, yet safe: the caching allocator reuses the block only after this stream's copy
        page.device_data = None
        page.on_device = False
        del self._resident[page]
        self.stats.page_outs += 1
        self.stats.bytes_out += page.nbytes
        self.stats.resident_bytes -= page.nbytes

    def _make_room(self, incoming_bytes, keep):
        """Page out least recently used pages not in `keep` until `incoming_bytes` more fit the budget."""
        excess, victims = self.stats.resident_bytes + incoming_bytes - self.device_budget_bytes, []
        for page in self._resident:  # least recently used first; stops at the first page it need not touch
            if excess <= 0:
                break
            if page not in keep:
                victims.append(page)
                excess -= page.nbytes
        for page in victims:
            self.page_out(page)

    def _make_resident(self, state):
        pages = self._pages(state)
        missing = [page for page in pages if not page.on_device]
        if missing and self.device_budget_bytes is not None:
            self._make_room(sum(page.nbytes for page in missing), keep=set(pages))
        for page in missing:
            self.page_in(page)
        for page in pages:
            self._wait_ready(page)

    def _prefetch(self, state, current_state):
        """Page in the next parameter while this one updates, only if both fit the budget together.

        All or nothing, and evicting only pages older than both: so it pages out exactly what the
        next parameter's own page-in would have, and the schedule (and statistics) do not change."""
        pages, current = self._pages(state), self._pages(current_state)
        missing = [page for page in pages if not page.on_device]
        incoming = sum(page.nbytes for page in missing)
        kept = sum(page.nbytes for page in pages + current if page.on_device)
        if not missing or kept + incoming > self.device_budget_bytes:
            return
        self._make_room(incoming, keep=set(pages + current))
        device, stream = missing[0].device, None
        if device.type == "cuda":  # a side stream, so that the copies overlap the current update's kernels
            if device not in self._side_streams:
                self._side_streams[device] = torch.cuda.Stream(device)
            stream = self._side_streams[device]
        for page in missing:
            self.page_in(page, stream)

    # --- the update -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        for k, (group, param) in enumerate(todo):  # parameters without a gradient are skipped, as in AdamW
            if param.grad.is_sparse:
                raise RuntimeError("PagedAdamW does not support sparse gradients")
            state = self.state[param]
            if "step" not in state:
                index = next(i for i, p in enumerate(self._all_params()) if p is param)
                state = self.state[param] = self._new_state(param, index)
            self._make_resident(state)
            if (self.prefetch and self.device_budget_bytes is not None and k + 1 < len(todo)
                    and "step" in self.state[todo[k + 1][1]]):
                self._prefetch(self.state[todo[k + 1][1]], state)
            self._adamw_update(param, param.grad, state, group)
            if self.device_budget_bytes is not None:  # only a parameter larger than the budget is over it
                self._make_room(0, keep=())
        return loss

    def _touch(self, page):
        self._tick += 1
        page.last_used = self._tick
        self._resident.move_to_end(page)

    def _adamw_update(self, param, grad, state, group):
        """One AdamW step for one parameter, page by page; op for op torch's `_single_tensor_adam`."""
        lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state["step"] += 1
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)  # theta <- theta - lr * lambda * theta
        step = state["step"].item()
        bias_correction1 = 1 - beta1 ** step  # 1 - beta1^t
        bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5  # sqrt(1 - beta2^t)
        step_size = lr / bias_correction1
        work = param if param.is_contiguous() else param.contiguous()  # the update writes into `work`
        # one page per tensor (any tensor under page_bytes): pages are shaped like the parameter, and
        # the update runs on param and grad themselves; the views cost more than small updates
        whole = len(state["exp_avg_pages"]) == 1
        flat_param, flat_grad = (work, grad) if whole else (work.view(-1), grad.reshape(-1))  # (N,)
        for m_page, v_page in zip(state["exp_avg_pages"], state["exp_avg_sq_pages"]):
            self._touch(m_page)
            self._touch(v_page)
            m, v = m_page.device_data, v_page.device_data  # (n,) with n = stop - start; param's shape if whole
            g = flat_grad if whole else flat_grad[m_page.start:m_page.stop]  # (n,)
            theta = flat_param if whole else flat_param[m_page.start:m_page.stop]  # (n,): a view of work
            m.lerp_(g, 1 - beta1)  # m_t = beta1 m_{t-1} + (1 - beta1) g_t
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)  # sqrt(v_t / (1 - beta2^t)) + eps
            theta.addcdiv_(m, denom, value=-step_size)  # theta -= lr / (1 - beta1^t) * m_t / denom
        if work is not param:
            param.copy_(work)

    # --- checkpoints ----------------------------------------------------------------------------------
    def _gather(self, pages, param):
        """One state tensor, assembled from its pages wherever they are, as a new CPU tensor."""
        out = torch.zeros(param.numel(), dtype=param.dtype)  # (N,); unallocated pages are AdamW's zeros
        for page in pages:
            self._wait_ready(page)
            if page.location != "unallocated":
                out[page.start:page.stop].copy_((page.device_data if page.on_device else page.host_data).view(-1))
        return out.view(param.shape)

    def state_dict(self):
        """torch.optim.AdamW's layout: {"state": {i: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups"}.

        i counts parameters across groups; exp_avg and exp_avg_sq are new contiguous CPU tensors shaped
        like the parameter (a copy, so that saving never brings the paged-out state back to the device)."""
        params = self._all_params()
        index = {param: i for i, param in enumerate(params)}
        state = {index[param]: {"step": s["step"].clone(),
                                "exp_avg": self._gather(s["exp_avg_pages"], param),
                                "exp_avg_sq": self._gather(s["exp_avg_sq_pages"], param)}
                 for param, s in self.state.items() if "step" in s}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[p] for p in g["params"]]}
                  for g in self.param_groups]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Load our state_dict or torch.optim.AdamW's. With a budget the state starts in host memory and
        is paged in by the next step (no page-in counted until then); without one it goes to the device."""
        saved_groups = state_dict["param_groups"]
        _require([len(g["params"]) for g in saved_groups] == [len(g["params"]) for g in self.param_groups],
                 "state_dict['param_groups']", "groups as large as this optimizer's",
                 [len(g["params"]) for g in saved_groups])
        for saved in saved_groups:
            _check_hyperparameters(saved["lr"], saved["betas"], saved["eps"], saved["weight_decay"])
            flags = tuple(saved.get(k, default) for k, default in
                          (("amsgrad", False), ("maximize", False), ("decoupled_weight_decay", True)))
            _require(flags == (False, False, True), "saved (amsgrad, maximize, decoupled_weight_decay)",
                     "(False, False, True): AdamW without the unsupported options", flags)
        params = self._all_params()
        our_index = dict(zip((i for saved in saved_groups for i in saved["params"]), range(len(params))))
        new_state = defaultdict(dict)
        for i, saved_state in state_dict["state"].items():
            param = params[our_index[i]]
            state = new_state[param] = self._new_state(param, our_index[i])
            state["step"] = torch.tensor(float(saved_state["step"]))  # float32 CPU, as in AdamW
            for name in STATE_NAMES:
                _require(tuple(saved_state[name].shape) == tuple(param.shape), f"state[{i}][{name!r}].shape",
                         f"the parameter's shape {tuple(param.shape)}", tuple(saved_state[name].shape))
                flat = saved_state[name].detach().reshape(-1)  # (N,)
                for page in state[name + "_pages"]:  # where page_out puts pages: pinned if the device is CUDA
                    page.host_data = flat[page.start:page.stop].view(page.shape).to("cpu", page.dtype, copy=True)
                    if page.device.type == "cuda":
                        page.host_data = page.host_data.pin_memory()
        self.state, self._resident, self.stats.resident_bytes = new_state, OrderedDict(), 0
        for page in (pg for state in new_state.values() for pg in self._pages(state)):
            if self.device_budget_bytes is None:  # no budget, no paging: on the device, as in AdamW
                page.device_data, page.host_data = page.host_data.to(page.device), None
                self._mark_resident(page)
        for group, saved in zip(self.param_groups, saved_groups):  # foreach stays False: what step() runs
            group.update({k: v for k, v in saved.items() if k not in ("params", "foreach")})
