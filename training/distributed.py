"""Data-parallel training on torch's own engine: what train.py needs to run under torchrun.

    torchrun --nproc_per_node 2 train.py --method lora      # two processes, one machine

Each process (rank) holds a whole copy of the model. Every step, each rank draws the same global
batch from the seeded stream and keeps its share of the rows (`shard`), so the ranks together see
exactly the batch of the single-process run. DistributedDataParallel averages the gradients of
the parameters that require them across ranks during the backward (an all-reduce per bucket of
gradients); a frozen weight has no gradient, so it never crosses the wire: only the adapters do.

Buffers: by default DDP broadcasts every buffer from rank 0 before each forward, for modules whose
buffers change as they run (batch norm's running statistics). Ours never change while training
(QLoRA's NF4 codes and scales, VeRA's shared pair, the adapters' merge flags), so `wrap` passes
forward_sync_buffers=False (torch 2.13's new name for broadcast_buffers) unless
--broadcast-buffers asks for DDP's default, to measure it; DDP still copies
rank 0's parameters and buffers to every rank once, when it wraps the model.
`Traffic.buffer_bytes` says what each step's broadcast would have sent.

The all-reduced bytes are measured, not computed: `wrap` registers a communication hook (torch's
own allreduce_hook, behind a counter) that sees every bucket DDP reduces. Under plain python
`allreduce_bytes` measures the same thing with one backward through DDP on a process group of one.

Only rank 0 writes files and prints (`quiet` silences the others, except for their tracebacks).
docs/distributed.md has the commands, the figures and the tolerances.
"""
from __future__ import annotations

import copy
import gc
import os
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Traffic:
    """What DDP sent for one model: the all-reduced gradient bytes of each step (counted bucket by
    bucket as the hook sees them), and what broadcasting the buffers at each forward would send."""
    process_group: object = None
    per_step: list = field(default_factory=list)  # bytes all-reduced in each backward
    pending: int = 0                              # bytes of this backward's buckets so far
    buckets: int = 0                              # buckets in the last backward
    buffer_bytes: int = 0                         # bytes of the buffers DDP would broadcast
    broadcast_buffers: bool = False               # whether DDP broadcasts them at each forward
    pre_forward: list = field(default_factory=list)  # seconds from DDP's forward to the model's
    entered: float | None = None                  # when the running DDP forward began


@dataclass
class World:
    """This process's place among the ranks; the single-process run is World()."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launched: bool = False                        # started by torchrun (or its env variables)
    broadcast_buffers: bool = False               # DDP defaults to True; on only to measure it
    traffic: dict = field(default_factory=dict)   # label -> Traffic of the models trained

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Started by torchrun: the env:// variables torch.distributed reads are set."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def start(device: torch.device, broadcast_buffers: bool = False) -> tuple[World, torch.device]:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); under plain python,
    the single-process World. Returns the world and this rank's device."""
    if not launched():
        return World(), device
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    world = World(rank=rank, size=dist.get_world_size(), local_rank=local_rank, launched=True,
                  broadcast_buffers=broadcast_buffers)
    return world, device


def finish(world: World) -> None:
    if world.launched and dist.is_initialized():
        gc.collect()  # every DDP freed while the group lives (see allreduce_bytes)
        dist.destroy_process_group()


def quiet(world: World) -> None:
    """Silence every rank but rank 0; an uncaught exception still prints, marked with its rank."""
    if world.is_main:
        return
    stderr = sys.stderr

    def excepthook(kind, value, trace):
        lines = traceback.format_exception(kind, value, trace)
        stderr.write("".join(f"[rank {world.rank}] {line}" for line in lines))
    sys.excepthook = excepthook
    sys.stdout = sys.stderr = open(os.devnull, "w")


def barrier(world: World) -> None:
    if world.launched:
        dist.barrier()


def check_batch(batch_size: int, world: World) -> None:
    if batch_size % world.size:
        raise ValueError(f"the batch size {batch_size} does not split evenly over "
                         f"{world.size} ranks; choose a world size that divides it")


def shard(x: torch.Tensor, y: torch.Tensor, world: World):
    """This rank's rows of the global batch: rank k of N keeps rows [k B/N, (k+1) B/N)."""
    if world.size == 1:
        return x, y
    rows = x.shape[0] // world.size
    mine = slice(world.rank * rows, (world.rank + 1) * rows)
    return x[mine], y[mine]  # (B/N, T) each


def counting_allreduce(traffic: Traffic, bucket):
    """torch's allreduce_hook (divide by the world size, all-reduce, hand back the mean), after
    counting the bytes of the bucket (a dist.GradBucket) it reduces. (DDP inspects the hook's
    annotations, which `from __future__ import annotations` turns into strings: none here.)"""
    flat = bucket.buffer()  # (numel,) the bucket's gradients, flattened
    traffic.pending += flat.numel() * flat.element_size()
    traffic.buckets = bucket.index() + 1
    if bucket.is_last():
        traffic.per_step.append(traffic.pending)
        traffic.pending = 0
    return allreduce_hook(traffic.process_group, bucket)


def wrap(model: torch.nn.Module, world: World, label: str,
         process_group=None) -> DistributedDataParallel:
    """`model` inside DDP with the counting hook; its Traffic goes to world.traffic[label]."""
    device = next(model.parameters()).device
    ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                  forward_sync_buffers=world.broadcast_buffers,
                                  process_group=process_group)
    # modules_buffers: the list DDP broadcasts before each forward when forward_sync_buffers is on
    buffer_bytes = sum(b.numel() * b.element_size() for b in ddp.modules_buffers)
    traffic = Traffic(process_group=process_group, buffer_bytes=buffer_bytes,
                      broadcast_buffers=world.broadcast_buffers)
    ddp.register_comm_hook(traffic, counting_allreduce)
    # DDP's own work before the model runs (the buffer broadcast, when on): from the wrapper's
    # forward pre-hook to the model's (a forward of the model alone, as in evaluation, is not one)
    ddp.register_forward_pre_hook(lambda *_: setattr(traffic, "entered", time.perf_counter()))
    model.register_forward_pre_hook(lambda *_: model_entered(traffic))
    world.traffic[label] = traffic
    return ddp


def model_entered(traffic: Traffic) -> None:
    if traffic.entered is not None:
        traffic.pre_forward.append(time.perf_counter() - traffic.entered)
        traffic.entered = None


def gather_random_states(world: World) -> list | None:
    """Every rank's torch (and CUDA) random state, for rank 0's checkpoint; None when alone."""
    if not world.launched:
        return None
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    states = [None] * world.size
    dist.all_gather_object(states, dict(torch=torch.get_rng_state(), cuda=cuda))
    return states


def allreduce_bytes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int | None:
    """Bytes DDP all-reduces in one backward of `model` on (x, y), measured by the hook on a copy
    in a process group of one (under plain python); None where torch has no distributed support.
    The model, its gradients and every random state are left as they were."""
    if not dist.is_available() or dist.is_initialized():
        return None
    probe = copy.deepcopy(model).train()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        world = World()
        cuda = [x.device.index or 0] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            ddp = wrap(probe, world, "probe")  # kept: its reducer must outlive the backward
            _, loss = ddp(x, y)
            loss.backward()
        # Free DDP while the registry still holds the group. Freed after destroy_process_group,
        # the reducer would drop the group's last reference and join gloo's worker thread while
        # holding the GIL, as the worker frees the hook's Python callback and waits for the GIL:
        # a deadlock, about once in 300 probes before this order.
        del ddp, loss
        gc.collect()
        return world.traffic["probe"].per_step[0]
    finally:
        dist.destroy_process_group()
