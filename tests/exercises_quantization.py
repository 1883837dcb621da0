"""Exercises of NF4 (nf4.py) and of the AdamW update and paging (paged_optim.py), and their wrong
answers: each has the signature of the function it stands in for and makes a plausible mistake."""
import torch

from exercises import Exercise

# --------------------------------------------------------------------------- nf4.nf4_code


def _normal_quantiles(probabilities: torch.Tensor) -> torch.Tensor:
    from scipy.stats import norm
    return torch.from_numpy(norm.ppf(probabilities.double().numpy()))  # float64


def nf4_code_in_float64():
    """The right quantiles, but in float64 throughout and rounded to float32 only at the end;
    bitsandbytes rounds the probabilities to float32 first: up to 6 ulps apart."""
    import nf4

    def quantiles(count):
        return _normal_quantiles(torch.linspace(nf4.NF4_OFFSET, 0.5, count + 1,
                                                dtype=torch.float64)[:-1])
    values = torch.cat([-quantiles(7), torch.zeros(1, dtype=torch.float64), quantiles(8)])
    values = values.sort().values
    return (values / values.max()).float()


def nf4_code_without_exact_zero():
    """16 evenly spaced quantiles across (1 - offset, offset): symmetric, but no exact 0."""
    import nf4
    values = _normal_quantiles(torch.linspace(1 - nf4.NF4_OFFSET, nf4.NF4_OFFSET, 16))
    return (values / values.max()).float()


def nf4_code_not_normalised():
    """The quantiles themselves, not divided by the largest: they span about [-1.85, 1.85]."""
    import nf4

    def quantiles(count):
        return _normal_quantiles(torch.linspace(nf4.NF4_OFFSET, 0.5, count + 1)[:-1]).float()
    return torch.cat([-quantiles(7), torch.zeros(1), quantiles(8)]).sort().values


# --------------------------------------------------------------------------- nf4.nearest_code_index

def nearest_by_argmin(scaled, code):
    """argmin_k |s - q_k|: the nearest code, but on a midpoint the two float32 distances differ in
    the last bit, and at 6 of the 15 NF4 midpoints the smaller one is the upper code's."""
    return (scaled.unsqueeze(-1) - code).abs().argmin(dim=-1).to(torch.uint8)


def nearest_ties_take_the_upper_code(scaled, code):
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints, right=True).to(torch.uint8)  # counts m <= s


# --------------------------------------------------------------------------- nf4.blockwise_absmax

def absmax_of_the_whole_tensor(x, blocksize):
    nblocks = -(-x.numel() // blocksize)
    return x.reshape(-1).abs().amax().float().expand(nblocks).clone()  # one scale for every block


def absmax_without_the_partial_block(x, blocksize):
    flat = x.reshape(-1)
    full = flat.numel() - flat.numel() % blocksize
    return flat[:full].view(-1, blocksize).abs().amax(dim=1).float()  # the last n % B values lost


def absmax_without_abs(x, blocksize):
    flat = x.reshape(-1).float()
    pad = -flat.numel() % blocksize
    padded = torch.cat([flat, flat.new_full((pad,), -torch.inf)])
    return padded.view(-1, blocksize).amax(dim=1)  # max x_i: a block led by a negative is wrong


# --------------------------------------------------------------------------- nf4.pack_nibbles

def pack_odd_element_high(indices, pad_index=7):
    flat = indices.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_full((1,), pad_index)])
    pairs = flat.view(-1, 2)
    return (pairs[:, 1] << 4) | pairs[:, 0]  # swapped: the odd element in the high nibble


def pack_padding_with_index_zero(indices, pad_index=7):
    flat = indices.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])  # index 0 is the code -1.0, not 0.0
    pairs = flat.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


# --------------------------------------------------------------------------- nf4.double_quantize

def double_quantize_without_the_mean(absmax):
    import nf4
    codes, nested_absmax = nf4.quantize_blockwise(absmax, nf4.dynamic_code(), nf4.NESTED_BLOCKSIZE)
    return codes, nested_absmax, absmax.new_zeros(())  # the positive scales use half the map


def double_quantize_in_blocks_of_64(absmax):
    import nf4
    offset = absmax.mean() if absmax.numel() else absmax.new_zeros(())
    # W's blocksize, not 256
    codes, nested_absmax = nf4.quantize_blockwise(absmax - offset, nf4.dynamic_code(), 64)
    return codes, nested_absmax, offset


# --------------------------------------------------------------------------- paged_optim.adamw_step

def adamw_step_textbook_order(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps,
                              weight_decay):
    """Right math, other rounding: m_hat and v_hat as tensors, then lr m_hat / (sqrt(v_hat) + eps),
    where torch divides sqrt(v) by sqrt(1 - beta2^t) and folds 1 / (1 - beta1^t) into the step."""
    beta1, beta2 = betas
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)  # m and v as torch computes them
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    m_hat, v_hat = exp_avg / (1 - beta1**step), exp_avg_sq / (1 - beta2**step)
    param.sub_(lr * m_hat / (v_hat.sqrt() + eps))


def adamw_step_without_bias_correction(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps,
                                       weight_decay):
    beta1, beta2 = betas
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    param.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps), value=-lr)  # m_t, v_t: biased to 0


def adam_with_l2_weight_decay(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps,
                              weight_decay):
    """Adam + L2: lambda theta added to the gradient, so the decay goes through m and v."""
    beta1, beta2 = betas
    grad = grad + weight_decay * param
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-(lr / (1 - beta1**step)))


# --------------------------------------------------------------------------- PageTable.over_budget

def _page_out(table, victims):
    for page in victims:
        del table.lru[page]
        page.location, table.stats.page_outs = "host", table.stats.page_outs + 1
        table.stats.bytes_out += page.nbytes
        table.stats.resident_bytes -= page.nbytes
    return victims


def over_budget_most_recently_used(self, incoming_bytes=0, keep=()):
    excess, victims = self.stats.resident_bytes + incoming_bytes - self.limit, []
    for page in reversed(self.lru):  # most recently used first
        if excess <= 0:
            break
        if page not in keep:
            victims, excess = victims + [page], excess - page.nbytes
    return _page_out(self, victims)


def over_budget_ignoring_keep(self, incoming_bytes=0, keep=()):
    excess, victims = self.stats.resident_bytes + incoming_bytes - self.limit, []
    for page in self.lru:  # may page out the parameter about to be updated
        if excess <= 0:
            break
        victims, excess = victims + [page], excess - page.nbytes
    return _page_out(self, victims)


# --------------------------------------------------------------------------- the exercises
QLORA_PAPER = "QLoRA (arXiv 2305.14314)"

# Teaching order: the code table, the nearest code, the scales, the bytes, the scales' scales.
NF4_EXERCISES = [
    Exercise("nf4.nf4_code", f"{QLORA_PAPER} sec. 3, '4-bit NormalFloat'; docs/nf4.md",
             {"float64 throughout (other rounding)": nf4_code_in_float64,
              "16 quantiles, no exact zero": nf4_code_without_exact_zero,
              "not normalised to [-1, 1]": nf4_code_not_normalised},
             answers=("Φ⁻¹(p", "(½ − δ)", "j/8")),
    Exercise("nf4.nearest_code_index",
             f"{QLORA_PAPER} sec. 2, eq. 1 (rounding to the grid) with sec. 3's NF4; docs/nf4.md",
             {"argmin |s - q|": nearest_by_argmin,
              "ties take the upper code": nearest_ties_take_the_upper_code},
             breaks=("nf4.double_quantize", "qlora.nf4_linear_input_grad")),
    Exercise("nf4.blockwise_absmax",
             f"{QLORA_PAPER} sec. 2, 'Block-wise k-bit Quantization', eq. 1; docs/nf4.md",
             {"one absmax for the whole tensor": absmax_of_the_whole_tensor,
              "partial last block dropped": absmax_without_the_partial_block,
              "max x, not max |x|": absmax_without_abs},
             breaks=("nf4.double_quantize", "qlora.nf4_linear_input_grad")),
    Exercise("nf4.pack_nibbles", f"{QLORA_PAPER} sec. 3; docs/nf4.md (bitsandbytes' layout)",
             {"odd element in the high nibble": pack_odd_element_high,
              "odd count padded with index 0": pack_padding_with_index_zero},
             breaks=("qlora.nf4_linear_input_grad",)),
    Exercise("nf4.double_quantize", f"{QLORA_PAPER} sec. 3, 'Double Quantization'; docs/nf4.md",
             {"mean not subtracted": double_quantize_without_the_mean,
              "blocks of 64, not 256": double_quantize_in_blocks_of_64},
             answers=("mean(c₂)", "c₂ − offset", "subtract the mean"),
             breaks=("qlora.nf4_linear_input_grad",)),
]

OPTIMIZER_EXERCISES = [
    Exercise("paged_optim.adamw_step",
             "Loshchilov & Hutter (arXiv 1711.05101) Algorithm 2; torch.optim.AdamW's docs",
             {"textbook order (other rounding)": adamw_step_textbook_order,
              "no bias correction": adamw_step_without_bias_correction,
              "Adam + L2 (coupled decay)": adam_with_l2_weight_decay},
             answers=("1 − β₁ᵗ", "(1 − β₁) g", "√v̂ + ε", "θ − lr·λ·θ")),
    Exercise("paged_optim.PageTable.over_budget",
             f"{QLORA_PAPER} sec. 3, 'Paged Optimizers'; docs/paged_optim.md",
             {"pages out the most recently used": over_budget_most_recently_used,
              "pages out the parameter being updated": over_budget_ignoring_keep}),
]
