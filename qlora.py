"""QLoRA: LoRA adapters on a frozen 4-bit NormalFloat base, trained with a paged optimizer.

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv 2305.14314, section 3.
One adapted linear layer (the paper writes X W with W of shape (in, out); here W is (out, in) as in
torch.nn.Linear, so the product is X W^T; L1 = A^T, L2 = B^T in lora.py's names):

    Y^BF16 = X^BF16 doubleDequant(c1^FP32, c2^k-bit, W^NF4)^T + X^BF16 L1^BF16 L2^BF16      (eq. 5)
    doubleDequant(c1, c2, W) = dequant(dequant(c1, c2), W^4bit) = W^BF16                    (eq. 6)

c1: the float32 scales of the scales (nested_absmax, offset); c2: the 8-bit scales (absmax); W: the
4-bit codes (packed); nf4.py holds them. "We dequantize the storage data type to the computation
data type to perform the forward and backward pass, but we only compute weight gradients for the
LoRA parameters" (sec. 3): the frozen base passes on dL/dX = dL/dY W only.

Deviations from the paper:
- Adapters are float32, not BF16 (lora.py's rule for a low-precision base): the adapter sum is taken
  in float32 and rounded to the layer's output dtype once. (eq. 5 leaves LoRA's s out.)
- NF4Linear returns its output in the input's dtype, like bitsandbytes' Linear4bit, so a float32
  model with a bfloat16-compute base keeps float32 activations between layers.
- The paged optimizer pages explicitly (paged_optim.py), not through CUDA unified memory.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

import adapters
import lora
import nf4
from checks import (
    check_blocksize,
    check_bool,
    check_features,
    check_int,
    check_quantized_state,
    check_tensor,
)
from fast_paths.nf4_lookup import dequantize_nf4_chunked, lookup_tables
from paged_optim import DEFAULT_PAGE_BYTES, PagedAdamW

DEFAULT_COMPUTE_DTYPE = torch.bfloat16  # "BFloat16 as computation data type" (sec. 3)
# float64 is allowed too, for oracle use: the float32 dequantized weight is exact in float64.
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def check_compute_dtype(compute_dtype) -> torch.dtype:
    if not isinstance(compute_dtype, torch.dtype) or compute_dtype not in COMPUTE_DTYPES:
        raise TypeError(f"compute_dtype must be a floating-point torch.dtype, one of "
                        f"{', '.join(map(str, COMPUTE_DTYPES))}; got {compute_dtype!r}")
    return compute_dtype


# --------------------------------------------------------------------------------------------------
# 1. The equations, plain. Letters: N tokens (leading dims flattened), q an nf4.NF4Weight (out, in).

def double_dequant(q: nf4.NF4Weight, compute_dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE):
    """doubleDequant(c1, c2, W) (eq. 6): the dense (out, in) weight in `compute_dtype`, rounded once
    from the float32 code[k] * scale (float64 holds that float32 value exactly)."""
    if compute_dtype == torch.float64:
        return nf4.dequantize_nf4(q, torch.float32).to(torch.float64)
    return nf4.dequantize_nf4(q, compute_dtype)


def qlora_linear(x, q: nf4.NF4Weight, bias, lora_A, lora_B, scaling: float,
                 compute_dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE) -> torch.Tensor:
    """Y = X doubleDequant(c1, c2, W)^T + b + s (X A^T) B^T (eq. 5 with LoRA's s), in x's dtype:
    the base term in the compute dtype, the adapter term in the adapters' dtype (float32)."""
    W = double_dequant(q, compute_dtype)  # (out, in)
    b = None if bias is None else bias.to(compute_dtype)
    base = F.linear(x.to(compute_dtype), W, b).to(x.dtype)  # (..., in) @ (in, out) -> (..., out)
    low_rank = (x.to(lora_A.dtype) @ lora_A.t()) @ lora_B.t()  # (..., r) -> (..., out)
    return (base.to(lora_A.dtype) + scaling * low_rank).to(x.dtype)


def nf4_linear_input_grad(grad_out, q: nf4.NF4Weight,
                          compute_dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE) -> torch.Tensor:
    """dL/dX = dL/dY · doubleDequant(c1, c2, W) for Y = X W^T + b: the only gradient the frozen base
    passes on (sec. 3: no weight gradient for W), with W dequantized again rather than kept.
    grad_out (..., out) -> (..., in), both in the compute dtype."""
    return grad_out.matmul(double_dequant(q, compute_dtype))  # (..., out) @ (out, in)


# --------------------------------------------------------------------------------------------------
# 2. Autograd without a dense W: forward and backward each dequantize into a temporary.

@functools.lru_cache(maxsize=None)
def _lookup_tables(device: torch.device) -> dict:
    return lookup_tables(nf4.nf4_code(), nf4.dynamic_code(), device)


def _dense_weight(q: nf4.NF4Weight, compute_dtype: torch.dtype) -> torch.Tensor:
    """double_dequant(q, compute_dtype), bit for bit, by the lookup kernel (what the reference
    would cost the layer instead: docs/benchmarks.md, "NF4Linear: reference or kernel")."""
    if compute_dtype == torch.float64:
        return double_dequant(q, compute_dtype)
    # equals nf4.dequantize_nf4: tests/test_nf4.py::test_lookup_kernels_pass_the_oracle
    return dequantize_nf4_chunked(q, compute_dtype, _lookup_tables(q.packed.device))


class _NF4LinearFunction(torch.autograd.Function):
    """y = x W^T + b, dL/dx = dL/dy W (nf4_linear_input_grad, with the lookup kernel's W): nothing
    larger than the 4-bit storage is kept for backward (bitsandbytes' MatMul4Bit does the same).
    x and b arrive in the compute dtype."""

    @staticmethod
    def forward(ctx, x, bias, q: nf4.NF4Weight, compute_dtype):
        ctx.quantized_weight = q
        ctx.compute_dtype = compute_dtype
        # Saved for autograd's version counters: an edit in place before backward raises.
        ctx.save_for_backward(*q.tensors().values())
        W = _dense_weight(q, compute_dtype)  # (out, in), a temporary
        return F.linear(x, W, bias)  # (..., in) @ (in, out) + (out,) -> (..., out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        ctx.saved_tensors  # the version check
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            # nf4_linear_input_grad: dL/dX = dL/dY W     (..., out) @ (out, in)
            grad_x = grad_out.matmul(_dense_weight(ctx.quantized_weight, ctx.compute_dtype))
        if ctx.needs_input_grad[1]:  # only when a user unfreezes the bias
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)  # (N, out) -> (out,)
        return grad_x, grad_bias, None, None


def _nf4_linear(x, q, bias, compute_dtype) -> torch.Tensor:
    b = None if bias is None else bias.to(compute_dtype)
    return _NF4LinearFunction.apply(x.to(compute_dtype), b, q, compute_dtype).to(x.dtype)


def nf4_linear(x: torch.Tensor, q: nf4.NF4Weight, bias: torch.Tensor | None = None,
               compute_dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE) -> torch.Tensor:
    """y = x · doubleDequant(q)^T + b (eq. 5, first term): x and b cast to `compute_dtype`, y
    returned in x's dtype. Gradients reach x (and b, if it requires them); q never gets one."""
    check_compute_dtype(compute_dtype)
    check_features(x, q.shape[1])
    return _nf4_linear(x, q, bias, compute_dtype)


# --------------------------------------------------------------------------------------------------
# 3. The frozen 4-bit layer.

class NF4Linear(nn.Module):
    """A frozen linear layer with an NF4 weight: y = x doubleDequant(W)^T + b (eq. 5, first term),
    computed in `compute_dtype` (bfloat16 by default; float16, float32, float64), returned in x's.

    State dict: the nf4.NF4Weight fields as buffers (`packed`; `absmax`; with double quantization
    `nested_absmax` and `offset`), the frozen unquantized `bias`, and `nf4_format` (int32 [out, in,
    blocksize, nested_blocksize or 0]) so that a state dict of another layout fails clearly; tensors
    only, as bitsandbytes'. Loading refuses NaN or Inf in the scales, offset and bias. Module casts
    (`.double()`, `.to(dtype)`) move the storage but never cast it (that would round the scales)."""
    linear_like = True  # found by adapters.find_targets, wrapped by lora.LoRALinear

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 blocksize: int = nf4.DEFAULT_BLOCKSIZE, double_quant: bool = True,
                 compute_dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE,
                 dtype: torch.dtype = torch.float32, device=None):
        """An all-zero quantized weight, to be filled by `from_linear` or `load_state_dict`."""
        super().__init__()
        self.in_features = check_int(in_features, "in_features", low=1)
        self.out_features = check_int(out_features, "out_features", low=1)
        self.compute_dtype = check_compute_dtype(compute_dtype)
        check_bool(double_quant, "double_quant")
        zeros = torch.zeros(out_features, in_features, dtype=dtype, device=device)
        q = nf4.quantize_nf4(zeros, blocksize, double_quant)  # checks blocksize and dtype
        self._metadata = q.metadata()  # shape, dtype, blocksize, nested_blocksize: plain values
        self._storage_names = tuple(q.tensors())
        for name, tensor in q.tensors().items():
            self.register_buffer(name, tensor)
        self.register_buffer("nf4_format", torch.tensor(
            [out_features, in_features, q.blocksize, q.nested_blocksize or 0], dtype=torch.int32,
            device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, blocksize: int = nf4.DEFAULT_BLOCKSIZE,
                    double_quant: bool = True,
                    compute_dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE) -> "NF4Linear":
        """Quantize `linear.weight` to NF4 (bitsandbytes' bytes); copy the bias unchanged."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        if linear.weight.dtype not in nf4.SUPPORTED_DTYPES:
            raise TypeError(f"linear.weight must be float32, float16 or bfloat16 to quantize to "
                            f"NF4 (as bitsandbytes), got {linear.weight.dtype}")
        check_tensor(linear.weight, "linear.weight")  # a meta tensor has no values to quantize
        if linear.bias is not None:
            check_tensor(linear.bias, "linear.bias", finite=True)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype,
                    dtype=linear.weight.dtype, device=linear.weight.device)
        q = nf4.quantize_nf4(linear.weight.detach(), blocksize, double_quant)  # NaN/Inf refused
        for name, tensor in q.tensors().items():
            setattr(layer, name, tensor)  # replaces the zero buffer
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer

    blocksize = property(lambda self: self._metadata["blocksize"])
    double_quant = property(lambda self: self._metadata["nested_blocksize"] is not None)

    @property
    def quantized_weight(self) -> nf4.NF4Weight:
        """The NF4Weight over this layer's buffers. Built and checked once, when they enter, and
        again only when one is replaced (.to(), an assignment): not on every forward."""
        q = self.__dict__.get("_quantized_weight")
        if q is None or any(getattr(q, n) is not self._buffers[n] for n in self._storage_names):
            storage = {n: self._buffers[n] for n in self._storage_names}
            q = nf4.NF4Weight.from_tensors(storage, **self._metadata)
            self._quantized_weight = q
        return q  # views the buffers, no copy: a load into them is seen at once

    def dequantized_weight(self) -> torch.Tensor:
        """W = doubleDequant(c1, c2, W) (eq. 6), (out, in), in the compute dtype."""
        return _dense_weight(self.quantized_weight, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_features(x, self.in_features)  # x enters here: no other place can name it
        return _nf4_linear(x, self.quantized_weight, self.bias, self.compute_dtype)

    def _apply(self, fn, recurse=True):
        """nn.Module.to/.half/.cuda/...: the storage follows the device, never a dtype cast."""
        before = {name: self._buffers[name] for name in self._storage_names}
        super()._apply(fn, recurse)
        for name, tensor in before.items():
            moved = self._buffers[name]
            if moved.dtype != tensor.dtype:  # cast: discard it, move the original (no rounding)
                self._buffers[name] = tensor.to(moved.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Check everything before anything is copied: nn.Module's loader would cast a float32
        # absmax into uint8 codes silently, and (out, in) = (32, 128) into (64, 64) without a word.
        own = {name: getattr(self, name) for name in self._storage_names + ("bias",)}
        check_quantized_state(state_dict, prefix, own, self.nf4_format)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


# --------------------------------------------------------------------------------------------------
# 4. Model surgery and the recipe.

def quantize_model(model: nn.Module, targets=adapters.ALL_LINEAR,
                   blocksize: int = nf4.DEFAULT_BLOCKSIZE, double_quant: bool = True,
                   compute_dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE) -> nn.Module:
    """Replace the target nn.Linears by NF4Linears, in place; returns `model`.

    `targets` as in adapters.find_targets: "all-linear", the linears in the blocks that
    `lora.apply_lora` adapts next, leaves embeddings (a lookup: eq. 5 is for a linear layer), norms
    and `lm_head` (no adapter absorbs its error; transformers keeps it unquantized "for numerical
    stability reasons") as they are. Other parameters keep their requires_grad.
    """
    check_bool(double_quant, "double_quant")  # all checked before the first layer is replaced
    check_compute_dtype(compute_dtype)
    check_blocksize(blocksize, nf4.ALLOWED_BLOCKSIZES)
    if adapters.adapter_layers(model):
        raise ValueError("model already carries adapters: quantize the base before applying them")
    names = adapters.find_targets(model, targets)
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise TypeError(f"targets: {name!r} is a {type(module).__name__}, not an nn.Linear "
                            f"(already quantized?)")
    for name in names:
        adapters.replace_submodule(model, name, NF4Linear.from_linear(
            model.get_submodule(name), blocksize, double_quant, compute_dtype))
    return model


def prepare_qlora(model: nn.Module, targets=adapters.ALL_LINEAR, r: int = 8, alpha: float = 16.0,
                  dropout: float = 0.0, lr: float = 3e-3, *,
                  blocksize: int = nf4.DEFAULT_BLOCKSIZE, double_quant: bool = True,
                  compute_dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE, betas=(0.9, 0.999),
                  eps: float = 1e-8, weight_decay: float = 0.0,
                  page_bytes: int = DEFAULT_PAGE_BYTES, device_budget_bytes: int | None = None,
                  seed: int | None = None) -> tuple[nn.Module, PagedAdamW]:
    """The QLoRA recipe (sec. 3-4), in place on `model`: returns (model, PagedAdamW over adapters).
    Defaults suit the tiny GPT; the paper used r=64, alpha=16, dropout 0.1, lr 2e-4 (appendix B)."""
    # 1. The frozen base in NF4 with double quantization (sec. 3).
    quantize_model(model, targets, blocksize, double_quant, compute_dtype)
    # 2. LoRA on every linear of the blocks: "LoRA on all linear transformer block layers is
    #    required to match full finetuning performance" (sec. 4). apply_lora freezes the rest.
    lora.apply_lora(model, targets, r=r, alpha=alpha, dropout=dropout, seed=seed)
    # 3. A paged optimizer over the adapter parameters only (sec. 3, "Paged Optimizers").
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = PagedAdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                           page_bytes=page_bytes, device_budget_bytes=device_budget_bytes)
    return model, optimizer
