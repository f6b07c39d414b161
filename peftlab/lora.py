"""The LoRA layer: a frozen linear map plus trainable low-rank updates.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"
(arXiv:2106.09685).  A frozen weight W (out x in) is adapted as

    h = x W^T + b + s * dropout(x) A^T B^T,     s = alpha / r   (alpha / sqrt(r) with rsLoRA)

with A (r x in) initialised like ``nn.Linear`` (Kaiming-uniform, a = sqrt(5)) and
B (out x r) initialised to zero, so the adapted model starts out identical to the
base model.  Explained in notebooks/03_lora.ipynb.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353)
splits the adapted weight into a learned magnitude m (out,) and a direction:

    W' = m * (W + s B A) / ||W + s B A||_c,     m initialised to ||W||_c

where ||.||_c is the L2 norm of each output row (over the inputs), so W' = W at init.  As
in the paper (section 4.3) and HF peft, the norm is a constant in backward (no gradient).

Adapters are kept per name in ``nn.ModuleDict``s (``lora_A[name]``,
``lora_B[name]``, bias-free ``nn.Linear``s), which gives state-dict keys of the
form ``<path>.lora_A.<name>.weight`` -- the same layout HF peft uses, so
checkpoints convert by dropping the adapter name (DoRA's m: ``<path>.lora_magnitude_vector.<name>.weight``,
which peft's files store as ``<path>.lora_magnitude_vector``).  Every LoRA parameter name
contains ``lora_``; freezing and saving key off that prefix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .quant import Linear4bit
from .tree import AdapterLayer
from .wrappers import adapter_dtype

try:  # GPT-2 style layer storing its weight transposed, (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency in practice
    Conv1D = None  # type: ignore[assignment,misc]

__all__ = ["LoRALinear", "Magnitude", "SUPPORTED_TYPES", "is_supported", "linear_shape"]

SUPPORTED_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ()) + (Linear4bit,)


def is_supported(module: nn.Module) -> bool:
    """True if :class:`LoRALinear` can wrap ``module`` (``nn.Linear`` or GPT-2 ``Conv1D``)."""
    return isinstance(module, SUPPORTED_TYPES)


def linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of an ``nn.Linear``, GPT-2 ``Conv1D`` or 4-bit ``Linear4bit``.

    ``nn.Linear`` keeps its weight as (out, in) and computes x W^T; ``Conv1D`` keeps (in, out) and
    computes x W (``fan_in_fan_out``, HF peft's name for it). The one place peftlab reads the layout.
    """
    if isinstance(module, Linear4bit):  # its .weight would de-quantize the whole matrix just for the shape
        return module.in_features, module.out_features, False
    transposed = Conv1D is not None and isinstance(module, Conv1D)
    rows, cols = module.weight.shape
    return (rows, cols, True) if transposed else (cols, rows, False)


class Magnitude(nn.Module):
    """DoRA's learned magnitude of one adapter: ``weight`` (out,), the length of each row of W'."""

    def __init__(self, norm: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(norm)  # (out,)


class LoRALinear(AdapterLayer):
    """Wrap an ``nn.Linear`` or GPT-2 ``Conv1D`` with any number of named LoRA adapters.

    Input ``x``: (..., in_features); output: (..., out_features), same as the base layer.

    Attributes:
        base_layer: the wrapped (frozen) layer, unchanged.
        lora_A / lora_B / lora_dropout: ``nn.ModuleDict`` keyed by adapter name.
        lora_magnitude_vector: ``nn.ModuleDict`` of :class:`Magnitude`, for the DoRA adapters only.
        scaling: adapter name -> float multiplier of its branch.
        active: names whose branch is added in ``forward``.
        merged: names currently folded into ``base_layer.weight``.
        disabled: if True, ``forward`` returns the base output only.

    Merging is explicit only (``merge`` / ``unmerge``; ``train()``/``eval()``
    never merge).  Merging an adapter that is already merged raises
    ``RuntimeError`` -- it would otherwise silently add the update twice.

    On a half-precision base (fp16 / bf16) ``W + delta - delta`` rounds twice and
    would drift a little per merge/unmerge cycle, so the first merge keeps an exact
    copy of the weight (the non-persistent buffer ``unmerged_weight``: not in the
    state dict, moved and cast with the layer) and ``unmerge`` restores it
    bit-exactly.  The cost is one extra copy of the weight while merged.  fp32 / fp64
    bases keep no copy: ``unmerge`` subtracts the update again, which leaves a
    rounding error of the order of float32's epsilon times the weight per cycle.
    A layer holding a DoRA adapter always keeps the copy (W' = m * V / ||V||_c has no cheap
    exact inverse), so its ``unmerge`` is bit-exact in every dtype.
    """

    # per-row adapter choice of a mixed batch (a ``peftlab.serving.RowRoute``), set only inside
    # ``peftlab.serving.adapter_rows``; None: the usual ``active`` adapters apply to every row
    row_route = None

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not is_supported(base_layer):
            names = ", ".join(t.__name__ for t in SUPPORTED_TYPES)
            raise TypeError(f"LoRALinear cannot wrap {type(base_layer).__name__}; supported types: {names}")
        self.base_layer = base_layer
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only
        self.scaling: dict[str, float] = {}
        self.ranks: dict[str, int] = {}
        self.active: set[str] = set()
        self.merged: list[str] = []
        self.disabled = False
        # exact pre-merge weight of a half-precision base while merged (see the class docstring)
        self.register_buffer("unmerged_weight", None, persistent=False)

    # -- adapter management -------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        use_dora: bool = False,
    ) -> None:
        """Create adapter ``name``: A (r, in) random, B (out, r) zero (DoRA: m = ||W||_c).  Does not activate it."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists in this layer: pick another name or delete it first")
        if use_dora and self.merged:
            raise RuntimeError(f"cannot add DoRA adapter {name!r} while {self.merged} are merged: its magnitude would "
                               "start from the merged weight; unmerge() first")
        w = self.base_layer.weight
        dtype = adapter_dtype(w)  # float32 on a half-precision base
        a = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=dtype)  # weight (r, in)
        b = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=dtype)  # weight (out, r)
        with torch.no_grad():
            if init == "kaiming":
                nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))  # same law nn.Linear uses
            elif init == "gaussian":
                nn.init.normal_(a.weight, std=1.0 / r)
            else:
                raise ValueError(f"unknown LoRA init {init!r}: use 'kaiming' or 'gaussian'")
            nn.init.zeros_(b.weight)  # B = 0 => the adapted layer starts equal to the base layer
        self.lora_A[name] = a
        self.lora_B[name] = b
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.ranks[name] = r
        if use_dora:  # B = 0, so ||W + s B A||_c = ||W||_c and W' = W
            self.lora_magnitude_vector[name] = Magnitude(self.weight_norm(name).to(dtype))

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (it must not be merged)."""
        if name in self.merged:
            raise RuntimeError(f"adapter {name!r} is merged into the weight: unmerge() before deleting it")
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        self.scaling.pop(name)
        self.ranks.pop(name)
        self.active.discard(name)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def activate(self, name: str | None) -> None:
        self.active = {name} if name in self.lora_A else set()

    @property
    def is_merged(self) -> bool:
        return bool(self.merged)

    def unloaded(self) -> nn.Module:
        """The base layer with the active adapters folded in (those not merged yet)."""
        pending = [n for n in sorted(self.active) if n not in self.merged]
        if pending:
            self.merge(pending)
        return self.base_layer

    # -- merging ------------------------------------------------------------------
    def _merge_dtype(self) -> torch.dtype:
        # at least float32 (fp16/bf16 are upcast), float64 stays float64; a 4-bit base's .weight would de-quantize
        base = self.base_layer
        dt = base.weight_dtype if isinstance(base, Linear4bit) else base.weight.dtype
        return torch.promote_types(dt, torch.float32)

    def _rows(self, w: torch.Tensor) -> torch.Tensor:
        """A weight laid out like ``base_layer.weight`` -> (out, in) (and back: Conv1D's is a transpose)."""
        return w.T if self.fan_in_fan_out else w

    def _base_rows(self) -> torch.Tensor:
        """The base weight W as (out, in), in (at least) float32 (a 4-bit base is de-quantized)."""
        return self._rows(self.base_layer.weight).to(self._merge_dtype())

    def _delta_rows(self, name: str) -> torch.Tensor:
        dt = self._merge_dtype()
        a = self.lora_A[name].weight.to(dt)  # (r, in)
        b = self.lora_B[name].weight.to(dt)  # (out, r)
        return (b @ a) * self.scaling[name]  # (out, in)

    def delta_weight(self, name: str) -> torch.Tensor:
        """The update s * B @ A in (at least) float32, laid out like ``base_layer.weight``.

        Returns (out, in) for ``nn.Linear`` and (in, out) for ``Conv1D``.
        """
        return self._rows(self._delta_rows(name))  # Conv1D: (in, out)

    def weight_norm(self, name: str, w: torch.Tensor | None = None) -> torch.Tensor:
        """DoRA's ||W + s B A||_c: the L2 norm of each output row, (out,), without gradient.

        ``w``: the base weight as (out, in) in (at least) float32, if the caller already has it.
        """
        with torch.no_grad():
            v = (self._base_rows() if w is None else w) + self._delta_rows(name)  # (out, in)
            return torch.linalg.vector_norm(v, dim=1)  # (out,)

    def dora_weight(self, name: str) -> torch.Tensor:
        """DoRA's W' = m * (W + s B A) / ||W + s B A||_c, (at least) float32, laid out like ``base_layer.weight``."""
        with torch.no_grad():
            v = self._base_rows() + self._delta_rows(name)  # (out, in)
            m = self.lora_magnitude_vector[name].weight.to(v.dtype)  # (out,)
            return self._rows((m / torch.linalg.vector_norm(v, dim=1)).unsqueeze(1) * v)

    def _add_to_weight(self, delta: torch.Tensor) -> None:
        w = self.base_layer.weight
        with torch.no_grad():
            w.copy_((w.to(delta.dtype) + delta).to(w.dtype))  # add in float32 (or wider), cast back once

    def merge(self, names: list[str] | None = None) -> None:
        """Fold the given (default: all active) adapters into ``base_layer.weight``."""
        names = sorted(self.active) if names is None else list(names)
        for n in names:
            if n not in self.lora_A:
                raise ValueError(f"no adapter named {n!r} in this layer (has {self.adapter_names})")
            if n in self.merged:
                raise RuntimeError(f"adapter {n!r} is already merged: call unmerge() before merging again")
        if names and isinstance(self.base_layer, Linear4bit):  # its .weight is a copy: writing into it does nothing
            raise RuntimeError("cannot merge LoRA into a 4-bit (NF4) weight: re-quantizing W + s*B*A would round "
                               "the update away; merge into a de-quantized copy instead: m = copy.deepcopy(model); "
                               "peftlab.quant.dequantize_model(m); peftlab.merge(m)")
        w = self.base_layer.weight
        # DoRA: add_adapter refuses a DoRA adapter while merged, so a layer with one keeps the copy from the start
        if names and not self.merged and (w.dtype in (torch.float16, torch.bfloat16) or self.lora_magnitude_vector):
            self.unmerged_weight = w.detach().clone()  # unmerge() restores this copy bit-exactly
        for n in names:
            if n in self.lora_magnitude_vector:  # W <- W', the whole weight, not an additive update
                with torch.no_grad():
                    w.copy_(self.dora_weight(n).to(w.dtype))
            else:
                self._add_to_weight(self.delta_weight(n))
            self.merged.append(n)

    def unmerge(self) -> None:
        """Take every merged adapter out of ``base_layer.weight`` again.

        Restores the exact pre-merge copy where one was kept (half-precision bases),
        else subtracts the updates in reverse order.  Changes made to the weight
        while merged are lost in the first case and kept in the second.
        """
        if not self.merged:
            raise RuntimeError("nothing to unmerge: no adapter is merged into this layer")
        if self.unmerged_weight is not None:
            with torch.no_grad():
                self.base_layer.weight.copy_(self.unmerged_weight)  # copy_ casts if the layer was cast meanwhile
            self.unmerged_weight = None
            self.merged.clear()
            return
        while self.merged:
            n = self.merged.pop()
            self._add_to_weight(-self.delta_weight(n))

    # -- forward ------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out) = base(x) + sum over active, unmerged adapters of s * B(A(dropout(x)))
        (DoRA adapters add :meth:`_dora_delta` instead)."""
        if self.row_route is not None:  # a mixed batch (peftlab.serving): each row its own adapter
            return self._routed_forward(x)
        if self.disabled and self.merged:
            raise RuntimeError(f"adapters {self.merged} are merged, so they cannot be disabled: call unmerge() first")
        result = base_out = self.base_layer(x)  # (..., out)
        if self.disabled or not self.active:
            return result
        for name in sorted(self.active) if len(self.active) > 1 else self.active:
            if name not in self.merged:
                result = self._add_branch(name, x, result, base_out)
        return result

    def _add_branch(self, name: str, x: torch.Tensor, result: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """``result`` (..., out) plus adapter ``name``'s branch on ``x`` (..., in): s * B(A(dropout(x))),
        or DoRA's :meth:`_dora_delta` (``base_out``: the base layer's output for these rows)."""
        a_w = self.lora_A[name].weight  # (r, in)
        b_w = self.lora_B[name].weight  # (out, r)
        h = x if x.dtype == a_w.dtype else x.to(a_w.dtype)  # low-precision base, fp32 adapter
        if name in self.lora_magnitude_vector:
            return result + self._dora_delta(name, h, base_out).to(result.dtype)
        drop = self.lora_dropout[name]
        if not isinstance(drop, nn.Identity):
            h = drop(h)
        xa = F.linear(h, a_w)  # (..., in) -> (..., r)
        if result.dtype == b_w.dtype or torch.is_autocast_enabled(x.device.type):
            # one fused kernel for "result + s * xa @ B^T" instead of matmul, scale and add
            flat = torch.addmm(
                result.reshape(-1, self.out_features),  # (N, out), N = prod of leading dims
                xa.reshape(-1, xa.shape[-1]),  # (N, r)
                b_w.T,  # (r, out)
                alpha=self.scaling[name],
            )
            return flat.view(result.shape).to(result.dtype)  # (N, out) -> (..., out)
        # e.g. fp16 base with fp32 adapter outside autocast
        return result + (F.linear(xa, b_w) * self.scaling[name]).to(result.dtype)

    def _routed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n, ..., in) -> (n, ..., out): the base layer once on all n rows, then each adapter's
        branch on its own rows only (``row_route.groups``: name -> row indices), written back in place.

        Rows of adapters this layer does not hold (``peftlab.serving.BASE``, or an adapter that
        targets other modules) get the base output alone.  Notebook 11 explains it.
        """
        route = self.row_route
        route.check(x.shape[0], self)
        result = self.base_layer(x)  # (n, ..., out); each group's rows are overwritten in place below
        for name, idx in route.groups.items():  # disjoint groups: a group's rows still hold the plain base output
            if name not in self.lora_A:
                continue
            rows = result.index_select(0, idx)  # (n_name, ..., out): the base output of its rows
            # the same fused kernel as the one-adapter path, so a row gets the same rounding
            rows = self._add_branch(name, x.index_select(0, idx), rows, rows)
            result.index_copy_(0, idx, rows)
        return result

    def _dora_delta(self, name: str, h: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to the base output: W'x - Wx = (m/n - 1) * W x + (m/n) * s * B A x, n = ||W + s B A||_c.

        h: (..., in), the input in the adapter's dtype; base_out: (..., out), the base layer's output
        (bias included, which W' leaves alone).  With dropout (training only) both terms see the
        dropped input, as in HF peft, so W x is recomputed from it.
        """
        w = self._base_rows()  # (out, in); one extra de-quantization on a 4-bit base
        scale = self.lora_magnitude_vector[name].weight / self.weight_norm(name, w)  # (out,); norm: no gradient
        drop = self.lora_dropout[name]
        if isinstance(drop, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            plain = base_out if bias is None else base_out - bias  # x W^T, (..., out)
        else:
            h = drop(h)
            plain = F.linear(h, w.to(h.dtype))  # dropout(x) W^T, (..., out)
        low = F.linear(F.linear(h, self.lora_A[name].weight), self.lora_B[name].weight)  # (..., in) -> (..., out)
        return (scale - 1) * plain + scale * low * self.scaling[name]  # (..., out)

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.ranks[n]}{' (DoRA)' if n in self.lora_magnitude_vector else ''}"
                          for n in self.lora_A)
        return f"in={self.in_features}, out={self.out_features}, adapters=[{ranks}], merged={self.merged}"
