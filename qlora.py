"""QLoRA: LoRA adapters on a frozen 4-bit NormalFloat base model, trained with a paged optimizer.

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv 2305.14314, section 3.
For one adapted linear layer (the paper writes X W with W of shape (in, out); here W is (out, in) as in
torch.nn.Linear, so the product is X W^T):

    Y^BF16 = X^BF16 doubleDequant(c1^FP32, c2^k-bit, W^NF4)^T + X^BF16 L1^BF16 L2^BF16     (eq. 5)
    doubleDequant(c1, c2, W) = dequant(dequant(c1, c2), W^4bit) = W^BF16                   (eq. 6)

`NF4Linear` is the first term (plus the bias): the weight stays in NF4 (nf4.py) and is dequantized to
the compute dtype for every matmul, "we dequantize the storage data type to the computation data
type to perform the forward and backward pass, but we only compute weight gradients for the LoRA
parameters" (sec. 3). The second term is `lora.LoRALinear` wrapped around it. `quantize_model` swaps
a model's linears for NF4Linears; `prepare_qlora` is the whole recipe; `qlora_memory_report` and
`dense_weight_bytes` count what is stored.

Deviations from the paper:
- Adapters are float32, not BF16 (lora.LoRALinear's rule for a low-precision base): the adapter sum
  is taken in float32 and rounded to the layer's output dtype once.
- The output of NF4Linear is returned in the input's dtype, like bitsandbytes' Linear4bit, so a float32
  model with a bfloat16-compute base keeps float32 activations between layers.
- The paged optimizer pages explicitly (paged_optim.py), not through CUDA unified memory.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import adapters
import lora
import nf4
from checks import check_bool, check_int, check_tensor
from paged_optim import DEFAULT_PAGE_BYTES, PagedAdamW

DEFAULT_COMPUTE_DTYPE = torch.bfloat16  # "BFloat16 as computation data type" (sec. 3)
# float64 is allowed too, for oracle use: the float32 dequantized weight is exact in float64.
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def check_compute_dtype(compute_dtype) -> None:
    if not isinstance(compute_dtype, torch.dtype) or compute_dtype not in COMPUTE_DTYPES:
        raise TypeError(f"compute_dtype must be a floating-point torch.dtype, one of "
                        f"{', '.join(str(d) for d in COMPUTE_DTYPES)}; got {compute_dtype!r}")


def check_double_quant(double_quant) -> None:
    check_bool(double_quant, "double_quant")


# ---------------------------------------------------------------------------------------------------
# Pure functions: what an oracle user calls.

def dequantize_to(q: nf4.NF4Weight, compute_dtype: torch.dtype) -> torch.Tensor:
    """doubleDequant(c1, c2, W) (eq. 6) as a dense (out, in) tensor in `compute_dtype`.

    nf4.dequantize_nf4 forms code[k] * absmax in float32 and rounds once; float64 takes that float32
    value unchanged (every float32 is a float64)."""
    check_compute_dtype(compute_dtype)
    if compute_dtype == torch.float64:
        return nf4.dequantize_nf4(q, torch.float32).to(torch.float64)
    return nf4.dequantize_nf4(q, compute_dtype)


class _NF4LinearFunction(torch.autograd.Function):
    """y = x W^T + b with W dequantized in forward and again in backward: no dense W is kept.

    The only gradient the frozen base passes on is the input's, dL/dx = dL/dy W, which needs W but
    not x; so nothing larger than the 4-bit storage is saved for backward (bitsandbytes' MatMul4Bit
    does the same). x and b arrive already in the compute dtype.
    """

    @staticmethod
    def forward(ctx, x, bias, q: nf4.NF4Weight, compute_dtype):
        ctx.names = tuple(q.tensors())
        ctx.nf4_metadata = q.metadata()
        ctx.compute_dtype = compute_dtype
        ctx.save_for_backward(*q.tensors().values())  # version-checked: an in-place edit would raise
        W = dequantize_to(q, compute_dtype)  # (out, in), a temporary
        return F.linear(x, W, bias)  # (..., in) @ (in, out) + (out,) -> (..., out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q = nf4.NF4Weight.from_tensors(dict(zip(ctx.names, ctx.saved_tensors)), **ctx.nf4_metadata)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            W = dequantize_to(q, ctx.compute_dtype)  # (out, in), dequantized again
            grad_x = grad_out.matmul(W)  # (..., out) @ (out, in) -> (..., in)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)  # (N, out) -> (out,)
        return grad_x, grad_bias, None, None


def nf4_linear(x: torch.Tensor, q: nf4.NF4Weight, bias: torch.Tensor | None = None,
               compute_dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE) -> torch.Tensor:
    """y = x · dequantize(q)^T + b, computed in `compute_dtype`, returned in x's dtype.

    x and b are cast to the compute dtype first. Gradients reach x (and b, if it requires them); q is
    integer storage and never receives one.
    """
    check_compute_dtype(compute_dtype)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    out_features, in_features = q.shape
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x must end in in_features={in_features}, got shape {tuple(x.shape)}")
    b = None if bias is None else bias.to(compute_dtype)
    y = _NF4LinearFunction.apply(x.to(compute_dtype), b, q, compute_dtype)  # (..., out)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# The frozen 4-bit layer.

class NF4Linear(nn.Module):
    """A frozen linear layer with an NF4 weight: `y = x · dequantize(W)^T + b` (eq. 5, first term).

    Stored (all in the state dict, moved by `.to(device)`):
    - buffers `packed` (uint8, two 4-bit codes a byte), `absmax` (float32 per block of `blocksize`, or
      uint8 codes with double quantization), and with double quantization `nested_absmax` (float32 per
      256 scales) and `offset` (float32 scalar): the fields of nf4.NF4Weight;
    - `bias`: a frozen Parameter in the original linear's dtype (not quantized: out_features values);
    - buffer `nf4_format` (int32 [out_features, in_features, blocksize, nested_blocksize or 0]), so
      that loading a state dict made for another shape, blocksize or double_quant setting fails with a
      clear ValueError (a tensor, not `_extra_state`, so state dicts stay tensor-only as
      bitsandbytes' are: safetensors and `torch.equal` over values keep working).
    The 4-bit format keeps its dtypes: `.to(torch.float64)`, `.half()` and friends move these buffers
    but never cast them (a cast would round the float32 scales); the bias is cast as usual, and
    `compute_dtype` stays what it was set to.

    Forward: x is cast to `compute_dtype` (bfloat16 by default; float16, float32 and float64 are
    allowed), the weight is dequantized to it once, y = x W^T + b is computed there, and y is returned
    in x's dtype (as bitsandbytes' Linear4bit). Backward dequantizes again instead of saving W.
    """
    linear_like = True  # found by adapters.find_targets, wrapped by lora.LoRALinear

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 blocksize: int = nf4.DEFAULT_BLOCKSIZE, double_quant: bool = True,
                 compute_dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE, dtype: torch.dtype = torch.float32,
                 device=None):
        """An all-zero quantized weight, to be filled by `from_linear` or `load_state_dict`."""
        super().__init__()
        check_int(in_features, "in_features", low=1)
        check_int(out_features, "out_features", low=1)
        check_double_quant(double_quant)
        check_compute_dtype(compute_dtype)
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        q = nf4.quantize_nf4(torch.zeros(out_features, in_features, dtype=dtype, device=device),
                             blocksize, double_quant)
        self._metadata = q.metadata()  # shape, dtype, blocksize, nested_blocksize: plain attributes
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
        """Quantize `linear.weight` to NF4 (bytes equal to bitsandbytes'); copy the bias unchanged."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        check_tensor(linear.weight, "linear.weight")  # a meta tensor has no values to quantize
        if linear.weight.dtype not in nf4.SUPPORTED_DTYPES:
            raise TypeError(f"linear.weight must be float32, float16 or bfloat16 to quantize to NF4 "
                            f"(as bitsandbytes), got {linear.weight.dtype}")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype,
                    dtype=linear.weight.dtype, device=linear.weight.device)
        q = nf4.quantize_nf4(linear.weight.detach(), blocksize, double_quant)
        for name, tensor in q.tensors().items():
            setattr(layer, name, tensor)  # replaces the zero buffer
        if linear.bias is not None:
            layer.bias.copy_(check_tensor(linear.bias, "linear.bias", finite=True))
        return layer

    @property
    def blocksize(self) -> int:
        return self._metadata["blocksize"]

    @property
    def double_quant(self) -> bool:
        return self._metadata["nested_blocksize"] is not None

    @property
    def quantized_weight(self) -> nf4.NF4Weight:
        """The NF4Weight over this layer's buffers (built on demand, so it follows .to() and loads)."""
        return nf4.NF4Weight.from_tensors({n: getattr(self, n) for n in self._storage_names},
                                          **self._metadata)

    def dequantized_weight(self) -> torch.Tensor:
        """W = doubleDequant(...) (eq. 6), (out, in), in the compute dtype; what adapters.dense_weight reads."""
        return dequantize_to(self.quantized_weight, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.quantized_weight, self.bias, self.compute_dtype)

    # --- dtypes, devices and state dicts -------------------------------------------------------------
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
        # Check everything before anything is copied: nn.Module's loader would cast a float32 absmax
        # into uint8 codes silently, and (out, in) = (32, 128) into (64, 64) without a word.
        key = prefix + "nf4_format"
        if key in state_dict and state_dict[key].tolist() != self.nf4_format.tolist():
            raise ValueError(f"state dict for NF4Linear {prefix!r} has nf4_format [out, in, blocksize, "
                             f"nested_blocksize] = {state_dict[key].tolist()}, this layer is "
                             f"{self.nf4_format.tolist()}")
        for name in self._storage_names:
            own, key = self._buffers[name], prefix + name
            if key in state_dict and (state_dict[key].shape != own.shape or state_dict[key].dtype != own.dtype):
                raise ValueError(f"state dict entry {key!r} is {state_dict[key].dtype} "
                                 f"{tuple(state_dict[key].shape)}, NF4Linear expects {own.dtype} "
                                 f"{tuple(own.shape)} (another shape, blocksize or double_quant setting)")
        for name in self._storage_names + ("bias",):  # float32 scales, offset and bias: no NaN/Inf
            if prefix + name in state_dict:
                check_tensor(state_dict[prefix + name], f"state dict entry {prefix + name!r}", finite=True)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


# ---------------------------------------------------------------------------------------------------
# Model surgery and the recipe.

def quantize_model(model: nn.Module, targets=adapters.ALL_LINEAR, blocksize: int = nf4.DEFAULT_BLOCKSIZE,
                   double_quant: bool = True,
                   compute_dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE) -> nn.Module:
    """Replace the target nn.Linears by NF4Linears, in place; returns `model`.

    `targets` is read as by adapters.find_targets: "all-linear" is every linear in the blocks, so the
    quantized layers are exactly the ones `lora.apply_lora(model, "all-linear")` adapts next. Left as
    they are by default:
    - embeddings: a row lookup, not a matmul, so there is no GEMM to dequantize into (bitsandbytes
      quantizes linears only, and eq. 5 is stated for a linear layer);
    - norms: a few vectors (2 C values each) that scale every activation; 4 bits would save almost
      nothing, and PEFT's `prepare_model_for_kbit_training` even casts them up to float32;
    - `lm_head`: its error lands on the logits with no later layer and no adapter to absorb it
      (lora's "all-linear" leaves it unadapted); transformers keeps it unquantized "for numerical
      stability reasons" (`get_keys_to_not_convert`). Name it in `targets` to quantize it anyway.
    Other parameters keep their requires_grad; the quantized layers have none that train.
    """
    check_double_quant(double_quant)
    check_compute_dtype(compute_dtype)
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize not in nf4.ALLOWED_BLOCKSIZES:
        raise ValueError(f"blocksize must be a power of two in [32, 4096], got {blocksize!r}")
    if adapters.adapter_layers(model):
        raise ValueError("model already carries adapters: quantize the base before applying them")
    names = adapters.find_targets(model, targets)
    for name in names:  # all checked before the first is replaced
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise TypeError(f"targets: {name!r} is a {type(module).__name__}, not an nn.Linear "
                            f"(already quantized?)")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, NF4Linear.from_linear(getattr(parent, child), blocksize, double_quant,
                                                     compute_dtype))
    return model


def prepare_qlora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                  lr: float = 3e-3, *, targets=adapters.ALL_LINEAR, blocksize: int = nf4.DEFAULT_BLOCKSIZE,
                  double_quant: bool = True, compute_dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE,
                  betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                  page_bytes: int = DEFAULT_PAGE_BYTES, device_budget_bytes: int | None = None,
                  seed: int | None = None) -> tuple[nn.Module, PagedAdamW]:
    """The QLoRA recipe (sec. 3-4), in place on `model`: returns (model, PagedAdamW over the adapters).

    Defaults are train.py's for the tiny GPT (r=8, alpha=16, lr=3e-3, no dropout or weight decay);
    the paper used r=64, alpha=16, dropout 0.1 (models up to 13B) and lr 2e-4 or 1e-4 (appendix B).
    """
    # 1. The frozen base in NF4 with double quantization (sec. 3).
    quantize_model(model, targets, blocksize, double_quant, compute_dtype)
    # 2. LoRA on every linear of the blocks: "LoRA on all linear transformer block layers is required
    #    to match full finetuning performance" (sec. 4, "Default LoRA hyperparameters do not match
    #    16-bit performance"). apply_lora freezes everything but the adapters.
    lora.apply_lora(model, targets, r=r, alpha=alpha, dropout=dropout, seed=seed)
    # 3. A paged optimizer over the adapter parameters only (sec. 3, "Paged Optimizers").
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = PagedAdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                           page_bytes=page_bytes, device_budget_bytes=device_budget_bytes)
    return model, optimizer


# ---------------------------------------------------------------------------------------------------
# Memory: what is stored, in bytes, counted from the tensors themselves.

def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _adapter_tensors(model: nn.Module) -> dict[int, torch.Tensor]:
    return {id(t): t for layer in adapters.adapter_layers(model).values()
            for t in (getattr(layer, n) for n in layer.adapter_parameter_names)}


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of the optimizer's state tensors (moments; scalar step counters left out), wherever they
    are: for PagedAdamW the allocated pages, on the device or paged out to the host."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                total += _nbytes(value)
            elif isinstance(value, list):  # PagedAdamW's pages
                total += sum(page.nbytes for page in value if page.location != "unallocated")
    return total


def qlora_memory_report(model: nn.Module, optimizer=None) -> dict:
    """Bytes of each kind of stored tensor (each tensor counted once, whatever device holds it).

    nf4_weights: the packed 4-bit codes; nf4_statistics: absmax (codes), nested absmax and offset;
    other_weights: every other parameter or buffer that is not an adapter (embeddings, norms,
    lm_head, the biases of the NF4 layers and their 16-byte `nf4_format` records); adapters; gradients (of any parameter);
    optimizer_state (optimizer_state_bytes) and, for PagedAdamW, optimizer_state_on_device.
    Also quantized_parameters (weights stored in NF4) and their bits_per_parameter.
    """
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    storage = {id(getattr(m, n)): (n, getattr(m, n)) for m in layers for n in m._storage_names}
    adapters = _adapter_tensors(model)
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    quantized = sum(m.in_features * m.out_features for m in layers)
    report = dict(
        nf4_weights=sum(_nbytes(t) for n, t in storage.values() if n == "packed"),
        nf4_statistics=sum(_nbytes(t) for n, t in storage.values() if n != "packed"),
        other_weights=sum(_nbytes(t) for i, t in tensors.items() if i not in storage and i not in adapters),
        adapters=sum(_nbytes(t) for t in adapters.values()),
        gradients=sum(_nbytes(p.grad) for p in model.parameters() if p.grad is not None),
        optimizer_state=0 if optimizer is None else optimizer_state_bytes(optimizer))
    report["total"] = sum(report.values())
    if isinstance(optimizer, PagedAdamW):
        report["optimizer_state_on_device"] = optimizer.stats.resident_bytes
    report["quantized_parameters"] = quantized
    report["bits_per_parameter"] = (8 * (report["nf4_weights"] + report["nf4_statistics"]) / quantized
                                    if quantized else float("nan"))
    return report


def dense_weight_bytes(model: nn.Module, dtype: torch.dtype) -> dict:
    """The same base model stored densely in `dtype` (float32: 4 bytes a value, bfloat16: 2).

    quantized_layers: the weights that are NF4 in `model`; base_model: those plus every other
    floating-point parameter or buffer that is not an adapter. Compare with qlora_memory_report's
    nf4_weights + nf4_statistics (the ratio is bits_per_parameter / (8 * dtype.itemsize)).
    """
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    storage = {id(getattr(m, n)) for m in layers for n in m._storage_names}
    adapters = _adapter_tensors(model)
    quantized = sum(m.in_features * m.out_features for m in layers)
    other = sum(t.numel() for t in {id(t): t for t in list(model.parameters()) + list(model.buffers())}.values()
                if id(t) not in storage and id(t) not in adapters and t.is_floating_point())
    return dict(quantized_layers=quantized * dtype.itemsize, base_model=(quantized + other) * dtype.itemsize)
