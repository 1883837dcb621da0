"""Tests for oracle.py (and docs/oracle.md); its plain implementations serve
test_oracle_kit_cases.py and test_oracle_kit_golden.py too.

Every checker must accept this project's functions and an independent plain implementation of the
same contract written here, and reject known mistakes with the minimal case in its message.
docs/oracle.md's example is run as written.
"""
import os
import re

import pytest
import torch
import torch.nn.functional as F

import dora
import lora
import nf4
import oracle
import paged_optim
import vera
from oracle_kit import cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = 3  # drawn cases beyond the explicit ones; those alone catch every mistake below


# ------------------------------------------------------------------------ plain implementations
def nearest_by_midpoints(scaled, code):
    """Index of the nearest code; on a midpoint the lower one (the contract)."""
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2)


def nearest_by_argmin(scaled, code):
    """The naive rule: argmin |s - q| in float32, wrong where a midpoint rounds (see the tests)."""
    return (scaled[:, None] - code).abs().argmin(dim=1)


def blockwise(x, code, blocksize, nearest, divide_partial=True):
    """(indices, absmax) of float32 x: s = x * (1/absmax), x / absmax in a partial last block."""
    n, full = x.numel(), x.numel() - x.numel() % blocksize
    padded = torch.cat([x, x.new_zeros(-n % blocksize)]).view(-1, blocksize)  # (nblocks, B)
    absmax = padded.abs().amax(dim=1)  # (nblocks,)
    safe = absmax.clamp(min=nf4.ABSMAX_FLOOR)
    reciprocal = safe[: full // blocksize, None].reciprocal()  # (nblocks_full, 1)
    last = safe[full // blocksize:]  # (0 or 1,)
    scaled = torch.cat([(x[:full].view(-1, blocksize) * reciprocal).view(-1),
                        x[full:] / last if divide_partial else x[full:] * last.reciprocal()])
    return nearest(scaled, code.to(x.device)), absmax


def plain_quantize(w, blocksize=64, double_quant=True, nearest=nearest_by_midpoints,
                   nested_nearest=nearest_by_midpoints, high_first=True, absmax_dtype=None,
                   divide_partial=True, nested_blocksize=256, nested_divide_partial=True,
                   offset=None):
    indices, absmax = blockwise(w.reshape(-1).float(), nf4.nf4_code(), blocksize, nearest,
                                divide_partial)
    if w.numel() % blocksize:
        absmax[-1:] = absmax[-1:].clamp(min=nf4.ABSMAX_FLOOR)  # stored as the reference does
    if absmax_dtype is not None:
        absmax = absmax.to(absmax_dtype).float()
    pairs = torch.cat([indices, indices.new_full((w.numel() % 2,), 7)]).view(-1, 2)  # (n/2, 2)
    high, low = (pairs[:, 0], pairs[:, 1]) if high_first else (pairs[:, 1], pairs[:, 0])
    result = {"packed": (high * 16 + low).to(torch.uint8), "absmax": absmax}
    if double_quant:
        offset = absmax.mean() if offset is None else offset(absmax)
        codes, nested = blockwise(absmax - offset, nf4.dynamic_code(), nested_blocksize,
                                  nested_nearest, divide_partial and nested_divide_partial)
        result.update(absmax=codes.to(torch.uint8), nested_absmax=nested, offset=offset)
    return result


def plain_dequantize(q, dtype, high_first=True, multiply_dtype=torch.float32, offset=True,
                     nested_blocksize=256, nested_modulo=False):
    flat = q.packed.reshape(-1)
    pairs = [flat >> 4, flat & 15] if high_first else [flat & 15, flat >> 4]
    indices = torch.stack(pairs, dim=1).view(-1)[: q.numel].long()  # (n,)
    absmax = q.absmax
    if q.nested_blocksize is not None:  # dynamic[c] * c1 + offset, two float32 roundings
        block = torch.arange(absmax.numel(), device=flat.device)  # (nblocks,)
        nested = q.nested_absmax[block % q.nested_absmax.numel() if nested_modulo else
                                 (block // nested_blocksize).clamp(max=q.nested_absmax.numel() - 1)]
        absmax = nf4.dynamic_code().to(flat.device)[absmax.long()] * nested
        absmax = absmax + q.offset if offset else absmax
    scales = absmax.repeat_interleave(q.blocksize)[: q.numel].to(multiply_dtype)
    values = nf4.nf4_code().to(flat.device)[indices].to(multiply_dtype)
    return (values * scales).to(dtype).view(q.shape)


def plain_lora(x, weight, bias, A, B, scaling, forget_scaling=False, scale_bias=False,
               detach_x=False, in_base_dtype=False):
    if in_base_dtype:  # every GEMM in the base's dtype, adapters included (a 16-bit kernel)
        A, B = A.to(weight.dtype), B.to(weight.dtype)
    x32, b = x.to(A.dtype), None if bias is None else bias.to(A.dtype)
    low_rank = ((x32.detach() if detach_x else x32) @ A.t()) @ B.t()  # (..., r) @ (r, out)
    s = 1.0 if forget_scaling else scaling
    if scale_bias and b is not None:
        return (F.linear(x32, weight.to(A.dtype)) + s * (low_rank + b)).to(x.dtype)
    return (F.linear(x32, weight.to(A.dtype), b) + s * low_rank).to(x.dtype)


def plain_dora(x, weight, bias, A, B, magnitude, scaling, scale_bias=False, detach=True,
               norm_of_base=False, floor=True):
    V = weight.to(A.dtype) + scaling * B @ A  # (out, in)
    norm = (weight.to(A.dtype) if norm_of_base else V).norm(dim=1)  # (out,)
    norm = norm.clamp_min(dora.DORA_NORM_EPS) if floor else norm
    g = magnitude / (norm.detach() if detach else norm)  # (out,)
    b = 0.0 if bias is None else bias.to(A.dtype)
    y = g * F.linear(x.to(A.dtype), V) + (g * b if scale_bias else b)  # (..., out)
    return y.to(x.dtype)


def plain_vera(x, weight, bias, A, B, lambda_d, lambda_b, drop_lambda_b=False, detach_d=False,
               per_rank=False, in_base_dtype=False):
    if in_base_dtype:  # every GEMM and scaling in the base's dtype (a 16-bit kernel)
        A, B = A.to(weight.dtype), B.to(weight.dtype)
        lambda_d, lambda_b = lambda_d.to(weight.dtype), lambda_b.to(weight.dtype)
    x32 = x.to(A.dtype)
    hidden = (x32 @ A.t()) * (lambda_d.detach() if detach_d else lambda_d)  # (..., r)
    update = hidden @ B.t() * (1.0 if drop_lambda_b else lambda_b)  # (..., out)
    update = update / A.shape[0] if per_rank else update
    b = None if bias is None else bias.to(A.dtype)
    return (F.linear(x32, weight.to(A.dtype), b) + update).to(x.dtype)


def adamw(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay,
          eps_inside=False, decay_after=False, l2=False, textbook=False):
    (beta1, beta2), correction2 = betas, (1 - betas[1] ** step) ** 0.5
    if l2:
        grad = grad + weight_decay * param
    elif not decay_after:
        param.mul_(1 - lr * weight_decay)
    if textbook:  # the same math as torch's, in the paper's order
        exp_avg.mul_(beta1).add_((1 - beta1) * grad)
        exp_avg_sq.mul_(beta2).add_((1 - beta2) * grad * grad)
        m_hat, v_hat = exp_avg / (1 - beta1 ** step), exp_avg_sq / (1 - beta2 ** step)
        param.sub_(lr * m_hat / (v_hat.sqrt() + eps))
        return
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq / correction2**2 + eps).sqrt() if eps_inside else \
        (exp_avg_sq.sqrt() / correction2).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))
    if decay_after:
        param.mul_(1 - lr * weight_decay)


def torch_adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    """One step of torch.optim.AdamW(foreach=False) itself on param, with the given state."""
    leaf = torch.nn.Parameter(param.detach().clone())
    leaf.grad = grad.clone()
    optimizer = torch.optim.AdamW([leaf], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                  foreach=False)
    optimizer.state[leaf] = {"step": torch.tensor(float(step - 1)), "exp_avg": exp_avg,
                             "exp_avg_sq": exp_avg_sq}
    optimizer.step()
    param.copy_(leaf.detach())


def negative_zeros(q, dtype):
    """The reference's values with -0.0 for every zero: equal as numbers, not bit for bit."""
    values = nf4.dequantize_nf4(q, dtype)
    return torch.where(values == 0, -torch.zeros_like(values), values)


def variant(fn, **options):
    def candidate(*args, **kwargs):
        return fn(*args, **kwargs, **options)
    candidate.__name__ = f"{fn.__name__}({options})"
    return candidate


# ----------------------------------------------------------------------------- accepting
ACCEPTED = [
    (oracle.check_nf4_quantize, nf4.quantize_nf4), (oracle.check_nf4_quantize, plain_quantize),
    (oracle.check_nf4_dequantize, nf4.dequantize_nf4),
    (oracle.check_nf4_dequantize, plain_dequantize),
    (oracle.check_lora_forward, lora.lora_forward), (oracle.check_lora_forward, plain_lora),
    (oracle.check_dora_forward, dora.dora_forward), (oracle.check_dora_forward, plain_dora),
    (oracle.check_vera_forward, vera.vera_forward), (oracle.check_vera_forward, plain_vera),
    (oracle.check_adamw_step, paged_optim.adamw_step),
    (oracle.check_adamw_step, torch_adamw_step), (oracle.check_adamw_step, adamw)]


@pytest.mark.parametrize("checker, fn", ACCEPTED, ids=lambda f: getattr(f, "__name__", f))
def test_checker_accepts_the_reference_and_a_plain_implementation(checker, fn):
    tried = checker(fn, examples=EXAMPLES)
    contract = checker.__name__[len("check_"):]
    assert tried["cases"] >= len(cases.EXAMPLES[contract]) + 1
    if contract == "nf4_quantize":
        assert {"nf4_ties", "dynamic_ties", "zero_blocks", "heavy"} <= set(tried["values"])
        assert set(tried["dtype"]) == {"float32", "float16", "bfloat16"}


# ----------------------------------------------------------------------------- rejecting
REJECTED = [  # (checker, wrong implementation, what the message must show)
    (oracle.check_nf4_quantize, variant(plain_quantize, nearest=nearest_by_argmin),
     "'values': 'nf4_ties'", r"packed differs at byte \d+ \(elements \d+, \d+; block \d+\)"),
    (oracle.check_nf4_quantize, variant(plain_quantize, nested_nearest=nearest_by_argmin),
     "'values': 'dynamic_ties'",
     r"absmax differs at block \d+ \(nested block \d+\): expected 0x.., got 0x.. \(expected from "
     r"the candidate's own offset\)"),
    (oracle.check_nf4_quantize, variant(plain_quantize, high_first=False),
     "'blocksize': 32", r"packed differs at byte 0 .* \(codes (\d+), (\d+) vs \2, \1\)"),
    (oracle.check_nf4_quantize, variant(plain_quantize, absmax_dtype=torch.bfloat16),
     "'double_quant'", r"(absmax|nested_absmax|offset) differs at"),
    (oracle.check_nf4_quantize, variant(plain_quantize, divide_partial=False),
     "'values': 'partial_ties'", r"packed differs at byte (3[2-9]|4\d|5[0-1]) "),
    (oracle.check_nf4_dequantize, negative_zeros, "'values': 'random_bytes'",
     r"dequantized differs at index \(\d+,\) .*: expected 0.0, got -0.0, 0 ulps apart"),
    (oracle.check_nf4_dequantize, variant(plain_dequantize, high_first=False),
     "'values': 'random_bytes'", r"dequantized differs at index \(\d+,\) \(byte \d+, \w+ nibble"),
    (oracle.check_nf4_dequantize, lambda q, dtype: plain_dequantize(q, dtype, multiply_dtype=dtype),
     "'dtype': 'bfloat16'", r"dequantized differs at .* ulps apart"),
    (oracle.check_nf4_dequantize, variant(plain_dequantize, offset=False),
     "'double_quant': True", r"dequantized differs at index"),
    (oracle.check_lora_forward, variant(plain_lora, forget_scaling=True),
     "'scaling': 2.0",
     r"y differs at index \(0?,?\): expected .* \(exact\), got .* ulps apart: .* > tolerance"),
    (oracle.check_lora_forward, variant(plain_lora, scale_bias=True),
     "'bias': True", r"y differs at index"),
    (oracle.check_lora_forward, variant(plain_lora, detach_x=True),
     "'r': 1", r"grad_x differs at index"),
    (oracle.check_dora_forward, variant(plain_dora, scale_bias=True), "'bias': True", r"y differs"),
    (oracle.check_dora_forward, variant(plain_dora, detach=False), "case: {",
     r"grad_(A|B) differs"),
    (oracle.check_dora_forward, variant(plain_dora, norm_of_base=True), "case: {", r"y differs"),
    (oracle.check_dora_forward, variant(plain_dora, floor=False), "'zero_row': True",
     r"y differs at index \(0, 0, 0\): expected .* \(exact\), got nan"),
    (oracle.check_vera_forward, variant(plain_vera, drop_lambda_b=True), "case: {", r"y differs"),
    (oracle.check_vera_forward, variant(plain_vera, detach_d=True), "case: {",
     r"grad_lambda_d: expected torch.float32 \(1,\), got None"),
    (oracle.check_vera_forward, variant(plain_vera, per_rank=True), "'r': 3", r"y differs"),
    (oracle.check_adamw_step, variant(adamw, eps_inside=True), "case: {",
     r"param_after differs at index \(\d, \d\): .* ulps apart"),
    (oracle.check_adamw_step, variant(adamw, decay_after=True), "'weight_decay': 0.1",
     r"param_after differs"),
    (oracle.check_adamw_step, variant(adamw, l2=True), "'weight_decay': 0.1", r"differs at"),
]


@pytest.mark.parametrize("checker, wrong, case_text, difference", REJECTED,
                         ids=lambda v: getattr(v, "__name__", None))
def test_checker_rejects_a_known_mistake_with_the_minimal_case(checker, wrong, case_text,
                                                                difference):
    with pytest.raises(AssertionError) as failure:
        checker(wrong, examples=EXAMPLES)
    message = str(failure.value)
    assert message.startswith(oracle.FUNCTIONS[checker.__name__[6:]] + " contract")
    assert case_text in message.splitlines()[1], message  # the "case: {...}" line
    assert re.search(difference, message), message
    assert "reproduce:\n  import oracle\n  inputs = oracle.case_inputs(" in message


def test_the_reproduce_lines_raise_the_same_error():
    wrong = variant(plain_quantize, nearest=nearest_by_argmin)
    with pytest.raises(AssertionError) as failure:
        oracle.check_nf4_quantize(wrong, examples=EXAMPLES)
    message = str(failure.value)
    lines = [line.strip() for line in message.split("reproduce:", 1)[1].splitlines()]
    with pytest.raises(AssertionError) as again:
        exec("\n".join(lines), {"candidate": wrong})
    assert str(again.value) == message


def test_right_math_in_another_order_is_named_and_accepted_when_not_exact():
    textbook = variant(adamw, textbook=True)
    with pytest.raises(AssertionError, match=r"call \d of \d \(step \d+\) is the first whose state "
                       r"differs\n  within the port contract's bound .*: check_adamw_step\("
                       r"exact=False\) accepts it"):
        oracle.check_adamw_step(textbook, examples=EXAMPLES)
    oracle.check_adamw_step(textbook, examples=EXAMPLES, exact=False)
    with pytest.raises(AssertionError):  # wrong math stays wrong
        oracle.check_adamw_step(variant(adamw, eps_inside=True), examples=EXAMPLES, exact=False)


def test_a_crash_a_wrong_type_and_a_missing_gradient_are_reported_with_the_case():
    def crash(w, blocksize, double_quant):
        raise RuntimeError("kernel launch failed\nsecond line")
    with pytest.raises(AssertionError, match=r"case: .*\n.*\n  fn raised RuntimeError: kernel "
                                             r"launch failed\n  reproduce:"):
        oracle.check_nf4_quantize(crash, examples=0)
    with pytest.raises(AssertionError, match="returned tuple: expected an nf4.NF4Weight"):
        oracle.check_nf4_quantize(lambda w, blocksize, double_quant: (1, 2), examples=0)
    with pytest.raises(AssertionError, match="packed: expected torch.uint8 \\(25,\\), got 3"):
        oracle.check_nf4_quantize(lambda w, **_: {"packed": 3, "absmax": None}, examples=0)

    def no_grad(*args):
        with torch.no_grad():
            return lora.lora_forward(*args)
    with pytest.raises(AssertionError, match="y does not require grad"):
        oracle.check_lora_forward(no_grad, examples=0)
    tried = oracle.check_lora_forward(no_grad, examples=0, gradients=False)
    assert tried["cases"] == len(cases.EXAMPLES["lora_forward"])


@pytest.mark.parametrize("options, error", [({"examples": -1}, ValueError),
                                            ({"examples": 2.5}, ValueError),
                                            ({"derandomize": "yes"}, TypeError),
                                            ({"device": "no-such-device"}, ValueError)])
def test_bad_options_are_refused(options, error):
    with pytest.raises(error):
        oracle.check_nf4_dequantize(nf4.dequantize_nf4, **options)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_inputs_are_made_on_the_candidates_device():
    def on_cuda(q, dtype):
        assert q.packed.is_cuda and q.absmax.is_cuda
        return nf4.dequantize_nf4(q, dtype)
    oracle.check_nf4_dequantize(on_cuda, examples=EXAMPLES, device="cuda")
    oracle.check_lora_forward(lora.lora_forward, examples=EXAMPLES, device="cuda")
    oracle.check_adamw_step(torch_adamw_step, examples=EXAMPLES, device="cuda")


# ----------------------------------------------------------------------------- docs/oracle.md
def read_docs():
    with open(os.path.join(ROOT, "docs", "oracle.md"), encoding="utf-8") as file:
        return file.read()


def test_the_docs_example_runs_as_written():
    block = re.search(r"## In your test suite\n.*?```python\n(.*?)```", read_docs(), re.S).group(1)
    assert len(block.strip().splitlines()) <= 12
    namespace = {}
    exec(compile(block, "docs/oracle.md", "exec"), namespace)
    tests = [fn for name, fn in namespace.items() if name.startswith("test_")]
    assert len(tests) >= 2
    for test in tests:
        test()


def test_the_docs_failure_message_is_what_the_checker_prints():
    sample = re.search(r"```text\n(nf4.quantize_nf4 contract.*?)```", read_docs(), re.S).group(1)
    with pytest.raises(AssertionError) as failure:
        oracle.check_nf4_quantize(variant(plain_quantize, nearest=nearest_by_argmin))
    printed = str(failure.value).splitlines()
    for line in sample.splitlines()[:4]:  # the header, the case, the inputs, the difference
        assert line in printed
