"""AdamW on many tensors a call: paged_optim.adamw_step's bits with fewer Python calls.

Equal bit for bit to paged_optim.adamw_step (the reference) on every tensor it takes, proved by
tests/test_paged_optim.py::test_adamw_step_foreach_passes_the_oracle (oracle.check_adamw_step) and
::test_adamw_step_foreach_equals_adamw_step_bit_for_bit. On the CPU, torch's _foreach_ ops run the
single-tensor kernel on each tensor (the same bits); CUDA's _foreach_ kernels differ, and for
16-bit floats _foreach_mul_ rounds its scalar, so only CPU float32 and float64 tensors qualify.
"""
import torch

BATCH_ELEMENTS = 1 << 18  # a batch's tensors (5 x 1 MiB in float32) stay in cache between lines


def supported(param: torch.Tensor) -> bool:
    """Whether adamw_step_foreach gives adamw_step's bits for this parameter."""
    return param.device.type == "cpu" and param.dtype in (torch.float32, torch.float64)


def adamw_step_foreach(pieces, lr, betas, eps, weight_decay):
    """adamw_step on each (param, grad, exp_avg, exp_avg_sq, step) of `pieces` (all supported), a
    _foreach_ call a line per batch of about BATCH_ELEMENTS elements; each piece has its own t."""
    beta1, beta2 = betas
    batches = [[]]
    size = 0
    for piece in pieces:
        batches[-1].append(piece)
        size += piece[0].numel()
        if size >= BATCH_ELEMENTS:
            batches.append([])
            size = 0
    for batch in (b for b in batches if b):
        params, grads, exp_avgs, exp_avg_sqs, steps = map(list, zip(*batch))
        if weight_decay != 0:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, [(1 - beta2 ** step) ** 0.5 for step in steps])
        torch._foreach_add_(denoms, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denoms, [-lr / (1 - beta1**t) for t in steps])
