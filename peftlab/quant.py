"""4-bit NormalFloat (NF4) weights and a 4-bit linear layer that LoRA can train on (QLoRA).

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv:2305.14314).
A frozen weight is cut into blocks of ``block_size`` (64) values; each block is divided by
its absolute maximum (absmax) and every value is replaced by the index of the nearest of 16
NF4 code values (quantiles of a standard normal, :func:`nf4_code`), two indices per byte.
Double quantization (paper, section 3) quantizes the fp32 absmax values once more: their
mean is subtracted and they are stored as int8 in blocks of 256, with one fp32 scale per
block.  Cost per parameter: 4 + 8/64 + 32/(64*256) ~ 4.127 bits instead of 4 + 32/64 = 4.5.
(The paper stores the absmax values as FP8; plain absmax int8 here costs the same 8 bits.)

:class:`Linear4bit` keeps the packed weight as buffers and de-quantizes it inside a custom
autograd function, in forward and again in backward, so no full-precision copy of W lives
between the two: that, with the 4-bit storage, is where QLoRA's memory saving comes from.
Pure torch (CPU or CUDA), no bitsandbytes.  A weight whose size is not a multiple of
``block_size`` is refused (no padding): pick a block size that divides it or skip the layer.

LoRA wraps a :class:`Linear4bit` like an ``nn.Linear``; merging into the 4-bit weight is
refused (re-quantizing W + s*B*A would round most of the update away).  To merge, de-quantize
a copy first: ``m = copy.deepcopy(model); dequantize_model(m); peftlab.merge(m)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .tree import replace_module, walk

__all__ = ["nf4_code", "NF4Tensor", "quantize_nf4", "dequantize_nf4", "bits_per_parameter", "Linear4bit",
           "quantize_model", "dequantize_model"]

DQ_BLOCK = 256  # absmax values per block in double quantization (paper, section 3)
# bitsandbytes' offset: the mean of 1 - 1/(2*15) and 1 - 1/(2*16), the outermost quantile probability
# (the quantile at probability 1 itself would be infinite)
NF4_OFFSET = 0.9677083


def nf4_code() -> torch.Tensor:
    """The 16 NF4 code values (float32, sorted, in [-1, 1], 0 included exactly).

    Asymmetric, as in the paper: 8 positive and 7 negative normal quantiles plus an exact 0,
    so that 0 (padding, pruned weights) is represented without error; all divided by the max.
    """
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64),
                                        torch.tensor(1.0, dtype=torch.float64))
    p = torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1]  # 8 probabilities in (0.5, offset]
    positive = normal.icdf(p)  # 8 quantiles > 0
    q = torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1]  # 7 probabilities
    negative = -normal.icdf(q)  # 7 quantiles < 0
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values  # (16,)
    return (values / values.max()).to(torch.float32)  # max is 1; the min is -1 too (same outer quantile)


@dataclass(frozen=True)
class NF4Tensor:
    """A weight in NF4.  ``n`` = number of elements, ``nb = n / block_size`` blocks.

    packed: uint8 (n/2,), code index of element 2i in the high nibble, 2i+1 in the low one.
    absmax: float32 (nb,) per-block absmax; with double quantization int8 (nb,) codes instead, and
    absmax_scale: float32 (ceil(nb/256),) one scale per 256 absmax values, absmax_mean: float32 ()
    (None without double quantization).  ``dtype``: the dtype the weight had.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    absmax_scale: torch.Tensor | None
    absmax_mean: torch.Tensor | None
    shape: tuple[int, ...]
    block_size: int
    dtype: torch.dtype


def _check_block_size(block_size) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0 or block_size % 2:
        raise ValueError(f"block_size must be a positive even int (two 4-bit codes per byte), got {block_size!r}: "
                         "use 64, the paper's choice")


def _check_weight(weight: torch.Tensor, block_size: int) -> None:
    """Raise ``ValueError`` if ``weight`` cannot be quantized in blocks of ``block_size``."""
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point tensor, got dtype {weight.dtype}: "
                         "quantize a float weight (e.g. weight.float())")
    _check_block_size(block_size)
    n = weight.numel()
    if n == 0 or n % block_size:
        divisors = [b for b in (256, 128, 64, 32, 16, 8, 4, 2) if n and n % b == 0]
        hint = f"use block_size={divisors[0]}" if divisors else "pad the weight"
        raise ValueError(f"weight of shape {tuple(weight.shape)} has {n} elements, not a multiple of "
                         f"block_size={block_size}: {hint} (a block size that divides {n}), or leave this "
                         "layer unquantized (quantize_model(..., skip=(name,)))")


def _double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """absmax (nb,) fp32 -> int8 codes (nb,), fp32 scales (ceil(nb/256),), fp32 mean ()."""
    mean = absmax.mean()
    centred = absmax - mean  # (nb,), symmetric around 0 so int8's range is used on both sides
    nb = centred.numel()
    groups = -(-nb // DQ_BLOCK)  # ceil
    padded = torch.zeros(groups * DQ_BLOCK, dtype=centred.dtype, device=centred.device)
    padded[:nb] = centred  # zero padding does not raise a group's absmax
    padded = padded.view(groups, DQ_BLOCK)  # (groups, 256)
    scale = padded.abs().amax(dim=1) / 127  # (groups,) one step of the int8 grid
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.round(padded / safe[:, None]).clamp(-127, 127).to(torch.int8)  # (groups, 256)
    return codes.view(-1)[:nb], scale, mean


def _absmax_of(q: NF4Tensor) -> torch.Tensor:
    """The per-block absmax (nb,) in float32, de-quantized if it was double-quantized."""
    if q.absmax_scale is None:
        return q.absmax.float()
    nb = q.absmax.numel()
    scale = q.absmax_scale.float().repeat_interleave(DQ_BLOCK)[:nb]  # (nb,) each block's group scale
    return q.absmax.float() * scale + q.absmax_mean.float()


def quantize_nf4(weight: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize ``weight`` (any shape, n elements, n a multiple of ``block_size``) to NF4.

    Each value is mapped to the nearest code value of ``weight / absmax(its block)``.
    """
    _check_weight(weight, block_size)
    dt = torch.promote_types(weight.dtype, torch.float32)  # float32, or float64 for a float64 weight
    blocks = weight.detach().reshape(-1, block_size).to(dt)  # (nb, block)
    absmax = blocks.abs().amax(dim=1)  # (nb,)
    if not torch.isfinite(absmax).all():
        raise ValueError(f"weight of shape {tuple(weight.shape)} contains inf or NaN: it cannot be quantized")
    safe = torch.where(absmax == 0, torch.ones_like(absmax), absmax)  # an all-zero block stays all zero
    x = blocks / safe[:, None]  # (nb, block) in [-1, 1]
    code = nf4_code().to(device=weight.device, dtype=dt)  # (16,)
    midpoints = (code[1:] + code[:-1]) / 2  # (15,) x between two midpoints -> the code value between them
    idx = torch.bucketize(x, midpoints).to(torch.uint8).view(-1)  # (n,) in 0..15
    packed = (idx[0::2] << 4) | idx[1::2]  # (n/2,) two codes per byte
    absmax = absmax.float()
    if double_quant:
        codes, scale, mean = _double_quantize(absmax)
        return NF4Tensor(packed, codes, scale, mean, tuple(weight.shape), block_size, weight.dtype)
    return NF4Tensor(packed, absmax, None, None, tuple(weight.shape), block_size, weight.dtype)


@functools.lru_cache(maxsize=8)
def _byte_table(device: torch.device) -> torch.Tensor:
    """(256, 2) float32: the two code values a packed byte stands for (high nibble, low nibble)."""
    code = nf4_code().to(device)  # (16,)
    byte = torch.arange(256, device=device)
    return torch.stack([code[byte >> 4], code[byte & 0x0F]], dim=1)


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight back, shape ``q.shape``, in ``dtype`` (default ``q.dtype``).

    One table look-up per byte (both of its 4-bit codes at once), then one scale per block.
    """
    pairs = torch.index_select(_byte_table(q.packed.device), 0, q.packed.int())  # (n/2, 2) code values
    values = pairs.view(-1, q.block_size) * _absmax_of(q)[:, None]  # (nb, block) float32
    return values.view(q.shape).to(q.dtype if dtype is None else dtype)


def bits_per_parameter(q: NF4Tensor) -> float:
    """Bits stored per weight element: packed codes plus the (double-quantized) scales."""
    stored = [q.packed, q.absmax, q.absmax_scale, q.absmax_mean]
    bits = sum(t.numel() * t.element_size() * 8 for t in stored if t is not None)
    return bits / (q.packed.numel() * 2)


class _NF4Linear(torch.autograd.Function):
    """y = x W^T + b with W de-quantized on the fly; saves no tensor for backward.

    grad_input = grad_y W needs only W, which backward de-quantizes again from the (frozen)
    4-bit buffers; there is no gradient for the 4-bit weight.
    """

    @staticmethod
    def forward(ctx, x, q: NF4Tensor, bias):
        ctx.q = q  # the module's own 4-bit buffers, not a new full-precision tensor
        ctx.has_bias = bias is not None
        w = dequantize_nf4(q, x.dtype)  # (out, in), freed when forward returns
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))  # (..., out)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize_nf4(ctx.q, grad_out.dtype)  # (..., out) @ (out, in) -> (..., in)
        if ctx.has_bias and ctx.needs_input_grad[2]:  # e.g. LoRAConfig(bias="all") trains the bias
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)  # (out,)
        return grad_x, None, grad_bias


class Linear4bit(nn.Module):
    """A frozen ``nn.Linear`` stored in NF4.  Input (..., in_features) -> (..., out_features).

    The 4-bit weight lives in buffers (``packed``, ``absmax``, ``absmax_scale``, ``absmax_mean``):
    they move with ``.to(device)`` and are saved in the state dict, but are not parameters (nothing
    to train).  ``bias`` stays a frozen ``nn.Parameter`` (or None).  ``weight`` is a read-only
    property returning a fresh de-quantized copy: writing into it changes nothing.
    Computes in the input's dtype.
    """

    def __init__(self, q: NF4Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.block_size = q.block_size
        self.weight_dtype = q.dtype
        self.register_buffer("packed", q.packed)
        self.register_buffer("absmax", q.absmax)
        self.register_buffer("absmax_scale", q.absmax_scale)
        self.register_buffer("absmax_mean", q.absmax_mean)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, double_quant: bool = True) -> "Linear4bit":
        """Quantize ``linear``'s weight (out, in); the bias is copied as is."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Linear4bit.from_linear needs an nn.Linear, got {type(linear).__name__}")
        return cls(quantize_nf4(linear.weight, block_size, double_quant), linear.bias)

    @property
    def quantized(self) -> NF4Tensor:
        """The weight as an :class:`NF4Tensor` over this module's buffers (current device)."""
        return NF4Tensor(self.packed, self.absmax, self.absmax_scale, self.absmax_mean,
                         (self.out_features, self.in_features), self.block_size, self.weight_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """A de-quantized copy of the weight, (out, in), in the original dtype (read-only)."""
        return dequantize_nf4(self.quantized)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NF4Linear.apply(x, self.quantized, self.bias)  # (..., in) -> (..., out)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the de-quantized weight (and the bias)."""
        w = self.weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        dq = self.absmax_scale is not None
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block_size={self.block_size}, double_quant={dq}")


def _matches(name: str, keys: tuple[str, ...]) -> bool:
    return any(name == k or name.endswith("." + k) for k in keys)


def quantize_model(model: nn.Module, block_size: int = 64, skip: tuple[str, ...] = ("lm_head",),
                   double_quant: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` by a :class:`Linear4bit`, in place, and return ``model``.

    Left alone: the output head (``get_output_embeddings()``), modules whose dotted name is or ends
    with an entry of ``skip``, and anything inside an adapter layer (quantize before injecting).
    Every layer is checked before the first is replaced: a refusal leaves the model unchanged.
    """
    _check_block_size(block_size)
    if isinstance(skip, str):
        raise ValueError(f"skip must be a tuple of module names, got the string {skip!r}: use ({skip!r},)")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    todo = [(n, m) for n, m in walk(model)
            if type(m) is nn.Linear and m is not head and not _matches(n, tuple(skip))]
    for n, m in todo:
        try:
            _check_weight(m.weight, block_size)
        except ValueError as exc:
            raise ValueError(f"cannot quantize layer {n!r}: {exc}") from None
    for n, m in todo:
        replace_module(model, n, Linear4bit.from_linear(m, block_size, double_quant))
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every :class:`Linear4bit` (also inside LoRA layers) by a plain ``nn.Linear``, in place."""
    for n, m in [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]:
        replace_module(model, n, m.to_linear())
    return model
