"""Page-ins on a second CUDA stream, overlapping the update on the current one.

A speed-up of paged_optim.PagedAdamW's copies, not of its arithmetic: the bits are the same with
or without it (tests/test_paged_optim.py runs the CUDA cases where a GPU exists). Off CUDA copies
are synchronous, and these do nothing.
"""
import contextlib
import dataclasses

import torch


@dataclasses.dataclass
class SideStreamPrefetch:
    """Copies issued inside `stream(device)` run on a side stream; `wait()` joins them."""
    streams: dict = dataclasses.field(default_factory=dict)  # CUDA device -> its side stream

    def stream(self, device):
        """Copies on the side stream, after the current stream's page-outs and allocations."""
        if device.type != "cuda":
            return contextlib.nullcontext()
        side = self.streams.get(device) or torch.cuda.Stream(device)
        self.streams[device] = side
        side.wait_stream(torch.cuda.current_stream(device))
        return torch.cuda.stream(side)

    def wait(self):
        """Before an update: the current streams wait for the copies issued so far."""
        for device, side in self.streams.items():
            torch.cuda.current_stream(device).wait_stream(side)
