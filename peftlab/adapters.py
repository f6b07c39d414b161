"""Bottleneck adapters: a small trainable MLP inside every layer of a frozen transformer.

Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP" (arXiv:1902.00751);
Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer
Learning" (arXiv:2005.00247); He et al. 2022, "Towards a Unified View of
Parameter-Efficient Transfer Learning" (arXiv:2110.04366).

An adapter of bottleneck b on a model of hidden size d is the branch

    A(h) = s * (W_up f(W_down h + b_down) + b_up),   W_down (b, d), W_up (d, b)

with 2*d*b + b + d parameters. It is always sized by the model's hidden size d (the
width of the residual stream), never by the width of some layer's input. W_up and b_up
start at zero, so at init A(h) = 0 and the model equals the base model exactly.

Placements, per transformer layer (He et al.'s notation):

* ``"houlsby"``: serial, twice: h <- h + A(h) on the attention sub-layer's output and on
  the feed-forward sub-layer's output, before each residual add (and, in BERT, before the
  LayerNorm that follows it);
* ``"pfeiffer"``: serial, once, on the feed-forward output only (Pfeiffer et al. 2021);
* ``"parallel"``: beside the feed-forward block: FFN(x) + s * A'(x), where x is the
  FFN's input and A' has no inner skip (He et al. 2022; default s = 4).

How it plugs in: forward hooks on the module whose output is a sub-layer's output just
before the residual add (BERT/RoBERTa: the ``dropout`` after ``dense`` in BertSelfOutput /
BertOutput; DistilBERT, GPT-2, Llama: the attention and MLP modules themselves), found
through the small table ``ARCHITECTURES``. The module tree is unchanged except for one
child per hooked module, ``adapter_attn`` / ``adapter_ffn`` / ``adapter_par`` (an
:class:`AdapterBank`, name -> :class:`Bottleneck`), so every adapter parameter name contains
``adapter_``, and LoRA layers and their checkpoint keys are untouched. Which adapter runs is
read from the root model (``peftlab.set_active`` / ``peftlab.disabled``), as for prefix-tuning.

Files (:func:`peftlab.save_adapter`): ``adapter_config.json`` (``{"format": "peftlab-adapter",
"model_type", "hidden_size", "num_layers", "bottleneck"}``), ``peftlab_adapter.json``
(``{"format_version", "adapter_name", "config"}``) and ``adapter_model.safetensors`` with keys
``layers.<i>.<attn|ffn|par>.<W_down|b_down|W_up|b_up>`` and
``modules_to_save.<module path>.<tensor>``. Explained in notebooks/05_adapters.ipynb.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig
from .inject import inject
from .io import FORMAT_VERSION, read_adapter_json
from .registry import MethodHooks, active_adapter, adapters_disabled, configs
from .wrappers import adapter_dtype, add_saves, delete_saves, find_saves, mark_saves, saved_copies, saved_shapes

__all__ = ["AdapterConfig", "Bottleneck", "AdapterBank", "Layout", "ARCHITECTURES", "register_architecture",
           "adapter_sites", "placement_parameters"]

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}
ROLES = {"houlsby": ("attn", "ffn"), "pfeiffer": ("ffn",), "parallel": ("par",)}
FORMAT = "peftlab-adapter"


@dataclass(frozen=True)
class Layout:
    """Where the sub-layers of one architecture are (dotted paths; ``attn``/``ffn``/``parallel`` inside a layer).

    layers:   the ``nn.ModuleList`` of transformer layers (matched as a suffix of the full name)
    attn:     module whose output (or output[0]) is the attention sub-layer's output before the residual add
    ffn:      the same for the feed-forward sub-layer
    parallel: module that receives the feed-forward input x; ``parallel_mode`` says how A'(x) is added:
              "beside" -> output += s*A'(args[0]); "residual" -> args[1] (the residual) += s*A'(args[1])
    """

    layers: str
    attn: str
    ffn: str
    parallel: str
    parallel_mode: str = "beside"


_BERT = Layout("encoder.layer", "attention.output.dropout", "output.dropout", "output", "residual")
ARCHITECTURES: dict[str, Layout] = {
    "bert": _BERT,
    "roberta": _BERT,
    "distilbert": Layout("transformer.layer", "attention", "ffn", "ffn"),
    "gpt2": Layout("h", "attn", "mlp", "mlp"),
    "llama": Layout("layers", "self_attn", "mlp", "mlp"),
}


def register_architecture(model_type: str, layout: Layout) -> None:
    """Teach peftlab where the sub-layers of ``model_type`` (``model.config.model_type``) are."""
    if layout.parallel_mode not in ("beside", "residual"):
        raise ValueError(f"Layout.parallel_mode must be 'beside' or 'residual', got {layout.parallel_mode!r}")
    ARCHITECTURES[model_type] = layout


class Bottleneck(nn.Module):
    """One adapter at one site: h (..., d) -> A(h) (..., d), the branch only (no skip).

    Parameters W_down (b, d), b_down (b), W_up (d, b), b_up (d): 2*d*b + b + d in total.
    Explained in notebooks/05_adapters.ipynb, section "An adapter in cells".
    """

    def __init__(self, d: int, b: int, activation: str = "relu", scaling: float = 1.0, *,
                 device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.W_down = nn.Parameter(torch.empty(b, d, **kw))
        self.b_down = nn.Parameter(torch.zeros(b, **kw))
        self.W_up = nn.Parameter(torch.zeros(d, b, **kw))  # zero: A(h) = 0 at init
        self.b_up = nn.Parameter(torch.zeros(d, **kw))
        nn.init.kaiming_uniform_(self.W_down, a=math.sqrt(5))  # nn.Linear's own law
        self.activation, self.scaling = activation, scaling

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = ACTIVATIONS[self.activation](F.linear(h, self.W_down, self.b_down))  # (..., d) -> (..., b)
        return F.linear(z, self.W_up, self.b_up) * self.scaling  # (..., b) -> (..., d)

    def extra_repr(self) -> str:
        b, d = self.W_down.shape
        return f"d={d}, b={b}, f={self.activation}, s={self.scaling}"


def _branch(adapter: Bottleneck, h: torch.Tensor) -> torch.Tensor:
    """A(h) computed in the adapter's dtype (fp32 for a half-precision base), returned in h's."""
    return adapter(h.to(adapter.W_down.dtype)).to(h.dtype)


class AdapterBank(nn.ModuleDict):
    """The adapters (name -> Bottleneck) at one site, and the forward hooks that apply the active one.

    Explained in notebooks/05_adapters.ipynb, section "Where the adapters go".
    """

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self.__dict__["_root"] = root  # not a submodule: read for peftlab_active / peftlab_disabled

    def current(self) -> Bottleneck | None:
        root = self.__dict__["_root"]
        name = active_adapter(root)
        if name is None or adapters_disabled(root) or name not in self:
            return None
        return self[name]

    def serial_hook(self, module, args, output):
        """Output hook (serial): h (B, T, d) -> h + A(h), h the output or output[0] (attention modules return tuples)."""
        a = self.current()
        if a is None:
            return None
        if isinstance(output, tuple):
            return (output[0] + _branch(a, output[0]),) + output[1:]
        return output + _branch(a, output)

    def beside_hook(self, module, args, kwargs, output):
        """Output hook (parallel): FFN(x) (B, T, d) -> FFN(x) + s A'(x), x (B, T, d) the module's first input."""
        a = self.current()
        if a is None:
            return None
        x = args[0] if args else next(iter(kwargs.values()))
        return output + _branch(a, x)

    def residual_prehook(self, module, args, kwargs):
        """Pre-hook (parallel, BERT): BertOutput(hidden, x) with x (B, T, d) the FFN input, also its residual;
        x -> x + s A'(x), so BertOutput computes LayerNorm(FFN(x) + x + s A'(x)), the parallel adapter."""
        a = self.current()
        if a is None:
            return None
        if len(args) >= 2:
            x = args[1]
            return (args[0], x + _branch(a, x)) + tuple(args[2:]), kwargs
        x = kwargs["input_tensor"]
        return args, {**kwargs, "input_tensor": x + _branch(a, x)}


# -- finding the sites ----------------------------------------------------------------------
def _layout(model: nn.Module) -> Layout:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in ARCHITECTURES:
        raise TypeError(
            f"AdapterConfig cannot place adapters in {type(model).__name__} (model_type={mt!r}): peftlab must know, "
            "per transformer layer, (1) the nn.ModuleList holding the layers, (2) the module whose output is the "
            "attention sub-layer's output just before the residual add, (3) the same module for the feed-forward "
            "sub-layer, and (4) a module that receives the feed-forward input (for placement='parallel'). Known "
            f"model types: {sorted(ARCHITECTURES)}; add yours with "
            "peftlab.adapters.register_architecture(model_type, Layout(layers, attn, ffn, parallel))")
    return ARCHITECTURES[mt]


def _transformer_layers(model: nn.Module, layout: Layout) -> list[nn.Module]:
    hits = [m for n, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and (n == layout.layers or n.endswith("." + layout.layers))]
    if len(hits) != 1:
        raise TypeError(f"{type(model).__name__}: expected one nn.ModuleList named '*{layout.layers}' holding the "
                        f"transformer layers, found {len(hits)}; register a Layout that names it")
    return list(hits[0])


def hidden_size(model: nn.Module) -> int:
    d = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(d, int):
        raise TypeError(f"{type(model).__name__} has no config.hidden_size: adapters are sized by it")
    return d


def adapter_sites(model: nn.Module, placement: str) -> list[tuple[int, str, nn.Module]]:
    """(layer index, role, hooked module) for every adapter ``placement`` puts into ``model``; pure."""
    layout = _layout(model)
    paths = {"attn": layout.attn, "ffn": layout.ffn, "par": layout.parallel}
    out = []
    for i, layer in enumerate(_transformer_layers(model, layout)):
        for role in ROLES[placement]:
            try:
                out.append((i, role, layer.get_submodule(paths[role])))
            except AttributeError:
                raise TypeError(f"layer {i} of {type(model).__name__} ({type(layer).__name__}) has no sub-module "
                                f"{paths[role]!r}, where the {role} adapter goes: register a Layout for it") from None
    return out


def placement_parameters(d: int, b: int, placement: str, num_layers: int) -> int:
    """Parameters one adapter of ``placement`` adds: ``peftlab.lowrank.adapter_parameters`` with the
    placement's sites per layer (houlsby 2, pfeiffer 1, parallel 1)."""
    from .lowrank import adapter_parameters

    return adapter_parameters(d, b, len(ROLES[placement]), num_layers)


# -- inject / trainable / delete hooks ------------------------------------------------------
def _plan(model: nn.Module, config: AdapterConfig) -> tuple[list[tuple[int, str, nn.Module]], int, int]:
    """Every check inject needs, before any change: sites, hidden size d and bottleneck b."""
    sites = adapter_sites(model, config.placement)
    d = hidden_size(model)
    return sites, d, config.bottleneck_size(d)


def _attach(module: nn.Module, role: str, root: nn.Module, mode: str) -> AdapterBank:
    bank = module._modules.get(f"adapter_{role}")
    if bank is None:
        bank = AdapterBank(root)
        module.add_module(f"adapter_{role}", bank)
        if role != "par":
            module.register_forward_hook(bank.serial_hook)
        elif mode == "beside":
            module.register_forward_hook(bank.beside_hook, with_kwargs=True)
        else:
            module.register_forward_pre_hook(bank.residual_prehook, with_kwargs=True)
    return bank


def _detach(module: nn.Module, role: str) -> None:
    """Remove an empty bank and the hooks it registered (found by owner, so copies of the model work)."""
    bank = module._modules.pop(f"adapter_{role}")
    for hooks in (module._forward_hooks, module._forward_pre_hooks):
        for key in [k for k, fn in hooks.items() if getattr(fn, "__self__", None) is bank]:
            del hooks[key]
            for extra in (module._forward_hooks_with_kwargs, module._forward_pre_hooks_with_kwargs,
                          module._forward_hooks_always_called):
                extra.pop(key, None)


def _inject_adapter(model: nn.Module, config: AdapterConfig, name: str) -> None:
    sites, d, b = _plan(model, config)
    add_saves(model, config.modules_to_save, name)  # checks every entry before wrapping any
    mode = _layout(model).parallel_mode
    ref = next(model.parameters())
    dtype = adapter_dtype(ref)  # float32 on a half-precision base
    for _, role, module in sites:
        device = next(module.parameters(), ref).device
        bank = _attach(module, role, model, mode)
        bank[name] = Bottleneck(d, b, config.activation, config.branch_scaling, device=device, dtype=dtype)


def _banks(model: nn.Module, name: str) -> list[tuple[nn.Module, str, AdapterBank]]:
    return [(m, role, m._modules[f"adapter_{role}"]) for m in model.modules() for role in ("attn", "ffn", "par")
            if isinstance(m._modules.get(f"adapter_{role}"), AdapterBank) and name in m._modules[f"adapter_{role}"]]


def _mark_adapter_trainable(model: nn.Module, config: AdapterConfig, name: str) -> None:
    for _, _, bank in _banks(model, name):
        bank[name].requires_grad_(True)
    mark_saves(model, name)


def _delete_adapter(model: nn.Module, name: str) -> None:
    for module, role, bank in _banks(model, name):
        del bank[name]
        if not len(bank):
            _detach(module, role)
    delete_saves(model, name)


def _refuse_merge(model: nn.Module, name: str) -> None:
    raise RuntimeError(f"adapter {name!r} is a bottleneck adapter: its non-linear branch f(h W_down^T) W_up^T cannot "
                       "be folded into the base weights; serve it unmerged (or train a LoRA adapter to merge)")


def _refuse_unload(model: nn.Module, name: str) -> None:
    raise RuntimeError(f"adapter {name!r} is a bottleneck adapter, which unload() cannot merge into the weights: "
                       f"remove it with peftlab.delete(model, {name!r}) first")


# -- saving and loading (peftlab's own format, see the module docstring) ---------------------
def _expected_bottleneck_keys(model: nn.Module, config: AdapterConfig) -> tuple[dict[str, tuple], dict]:
    """Tensor keys and shapes an adapter of ``config`` has in ``model``, and its JSON metadata; pure."""
    sites, d, b = _plan(model, config)
    shapes = {"W_down": (b, d), "b_down": (b,), "W_up": (d, b), "b_up": (d,)}
    keys = {f"layers.{i}.{role}.{p}": s for i, role, _ in sites for p, s in shapes.items()}
    keys.update(saved_shapes(find_saves(model, config.modules_to_save)))
    meta = {"format": FORMAT, "model_type": model.config.model_type, "hidden_size": d, "bottleneck": b,
            "num_layers": len({i for i, _, _ in sites})}
    return keys, meta


def _save(model: nn.Module, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    config = configs(model)[name]
    live = {f"layers.{i}.{role}.{p}": t for i, role, mod in adapter_sites(model, config.placement)
            for p, t in mod._modules[f"adapter_{role}"][name].named_parameters()}
    live.update(saved_copies(model, name))
    _, meta = _expected_bottleneck_keys(model, config)
    meta["peftlab"] = {"format_version": FORMAT_VERSION, "adapter_name": name, "config": config.to_dict()}
    meta["base_model_name_or_path"] = getattr(model.config, "name_or_path", None) or None
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in live.items()}, meta


def _load(model: nn.Module, d: Path, name: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Check everything against ``model``, then inject adapter ``name`` and copy the tensors in."""
    try:
        raw = read_adapter_json(d)
        config = AdapterConfig.from_dict(raw["peftlab"]["config"])
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise ValueError(f"{d} does not hold a valid peftlab adapter config ({exc}): save it again") from exc
    if name in configs(model):
        raise ValueError(f"an adapter named {name!r} is already injected: load under another name or delete it first")
    cls = type(model).__name__
    try:
        required, meta = _expected_bottleneck_keys(model, config)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"adapter in {d} does not fit this {cls} (wrong base model?): {exc}") from exc
    wrong = [f"{k}: file {tuple(v.shape)} vs model {required[k]}" for k, v in tensors.items()
             if k in required and tuple(v.shape) != required[k]]
    missing = [k for k in required if k not in tensors]
    extra = [k for k in tensors if k not in required]
    other_type = raw.get("model_type") not in (None, meta["model_type"])
    if wrong or missing or extra or other_type:
        saved = {k: raw.get(k) for k in ("model_type", "hidden_size", "num_layers", "bottleneck")}
        here = {k: meta[k] for k in saved}
        parts = [f"model_type {saved['model_type']!r} vs {here['model_type']!r}" if other_type else "",
                 f"shape mismatch: {'; '.join(wrong[:3])}" if wrong else "",
                 f"missing keys: {missing[:3]}" if missing else "", f"unexpected keys: {extra[:3]}" if extra else ""]
        raise ValueError(f"adapter in {d} does not fit this {cls} -- saved for {saved}, this model is {here}; "
                         + " | ".join(p for p in parts if p) + ": load it onto the base model it was trained on")
    inject(model, config, name)
    live = {f"layers.{i}.{role}.{p}": t for i, role, mod in adapter_sites(model, config.placement)
            for p, t in mod._modules[f"adapter_{role}"][name].named_parameters()}
    live.update(saved_copies(model, name))
    with torch.no_grad():
        for k, v in tensors.items():
            live[k].copy_(v)
    return model


def owns_adapter(parameter_name: str) -> bool:
    """Bottleneck parameters live in the ``adapter_<role>`` banks attached to sub-layers."""
    return ".adapter_" in parameter_name or parameter_name.startswith("adapter_")


HOOKS = MethodHooks(method="adapter", config=AdapterConfig, inject=_inject_adapter,
                    mark_trainable=_mark_adapter_trainable, delete=_delete_adapter, save=_save, load=_load,
                    owns=owns_adapter, merge=_refuse_merge, unload=_refuse_unload)
