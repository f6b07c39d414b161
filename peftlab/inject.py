"""Putting adapters into a model, inspecting them, and taking them out again.

``inject(model, LoRAConfig(...))`` swaps the selected linear layers for
:class:`peftlab.lora.LoRALinear` (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models", arXiv:2106.09685) in place, wraps ``modules_to_save`` and
freezes everything else.  Modules an injection creates take the model's current
``training`` flag (a LoRA dropout added to a model in eval mode is off), and are
flagged so that ``bias="all"`` and other base-model-only logic can tell them from
the base model's own modules (``peftlab.targets.base_parameters``).
Modules are always replaced through their parent
(``setattr(parent, child_name, new)``); a dotted name on the root would merely
add a stray attribute and leave the real layer untouched.

Other methods plug in through :func:`register_method`: a config class maps to
the functions that inject it, mark its parameters trainable and delete it.
Explained in notebooks/03_lora.ipynb.
"""

from __future__ import annotations

import contextlib
import html
from dataclasses import dataclass, field
from typing import Callable, Iterator

from torch import nn

from .config import AdapterConfigBase, LoRAConfig
from .lora import LoRALinear
from .targets import (base_parameters, checked_plan, find_modules, flag_new_modules, linear_suffixes,
                      replace_module, walk)
from .wrappers import ModulesToSaveWrapper

__all__ = [
    "inject", "explain", "count_parameters", "merge", "unmerge", "unload", "set_active",
    "disabled", "delete", "register_method", "configs", "ExplainReport", "ParameterCount",
]
_WRAPPERS = (LoRALinear, ModulesToSaveWrapper)


@dataclass
class MethodHooks:
    """How one adapter method injects, marks trainable and deletes itself."""

    inject: Callable[[nn.Module, AdapterConfigBase, str], None]
    mark_trainable: Callable[[nn.Module, AdapterConfigBase, str], None]
    delete: Callable[[nn.Module, str], None]
    # optional, for methods without LoRA layers (peftlab/prefix.py): fold an adapter / refuse unload()
    merge: Callable[[nn.Module, str], None] | None = None
    unload: Callable[[nn.Module, str], None] | None = None


_METHODS: dict[type, MethodHooks] = {}


def register_method(config_cls: type, hooks: MethodHooks) -> None:
    """Make ``inject`` / ``delete`` / ``set_active`` understand configs of ``config_cls``."""
    _METHODS[config_cls] = hooks


# -- registry and module helpers --------------------------------------------------
def configs(model: nn.Module) -> dict[str, AdapterConfigBase]:
    """The adapters injected into ``model``: name -> config (created empty on first use)."""
    reg = model.__dict__.get("peftlab_configs")
    if reg is None:
        reg = {}
        object.__setattr__(model, "peftlab_configs", reg)
    return reg


def active_adapter(model: nn.Module) -> str | None:
    return model.__dict__.get("peftlab_active")


# -- LoRA hooks ---------------------------------------------------------------------
def _inject_lora(model: nn.Module, config: LoRAConfig, name: str) -> None:
    plan = checked_plan(model, config, name)  # every check happens before the first change
    for mod_name, mod, _ in plan.targets:
        layer = mod if isinstance(mod, LoRALinear) else LoRALinear(mod)
        layer.add_adapter(name, config.r, config.alpha, config.dropout, config.use_rslora, config.init)
        if layer is not mod:
            replace_module(model, mod_name, layer)
    for mod_name, mod in plan.saves:
        wrapper = mod if isinstance(mod, ModulesToSaveWrapper) else ModulesToSaveWrapper(mod)
        wrapper.add_copy(name)
        if wrapper is not mod:
            replace_module(model, mod_name, wrapper)


def _mark_lora_trainable(model: nn.Module, config: LoRAConfig, name: str) -> None:
    for _, mod in walk(model):
        if isinstance(mod, LoRALinear) and name in mod.lora_A:
            mod.lora_A[name].weight.requires_grad_(True)
            mod.lora_B[name].weight.requires_grad_(True)
            if config.bias == "lora_only" and mod.base_layer.bias is not None:
                mod.base_layer.bias.requires_grad_(True)
        elif isinstance(mod, ModulesToSaveWrapper) and name in mod.modules_to_save:
            mod.modules_to_save[name].requires_grad_(True)
    if config.bias == "all":  # the base model's biases only: never another adapter's (e.g. a prefix MLP's)
        for pname, p in base_parameters(model):
            if pname.endswith("bias") and ".original_module." not in pname and ".modules_to_save." not in pname:
                p.requires_grad_(True)


def _delete_lora(model: nn.Module, name: str) -> None:
    for mod_name, mod in list(walk(model)):
        if isinstance(mod, LoRALinear) and name in mod.lora_A:
            mod.delete_adapter(name)
            if not mod.adapter_names:
                replace_module(model, mod_name, mod.base_layer)
        elif isinstance(mod, ModulesToSaveWrapper) and name in mod.modules_to_save:
            mod.delete_copy(name)
            if not len(mod.modules_to_save):
                replace_module(model, mod_name, mod.original_module)


register_method(LoRAConfig, MethodHooks(_inject_lora, _mark_lora_trainable, _delete_lora))


# -- public API -------------------------------------------------------------------
def _hooks(config: AdapterConfigBase) -> MethodHooks:
    hooks = _METHODS.get(type(config))
    if hooks is None:
        known = ", ".join(c.__name__ for c in _METHODS)
        raise TypeError(f"no injector for {type(config).__name__}: supported configs are {known}")
    return hooks


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for _, m in walk(model) if isinstance(m, _WRAPPERS)]


def _any_merged(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) and m.merged for m in _layers(model))


def _require_unmerged(model: nn.Module, action: str) -> None:
    if _any_merged(model):
        raise RuntimeError(f"cannot {action} while LoRA weights are merged: call peftlab.unmerge(model) first")


def inject(model: nn.Module, config: AdapterConfigBase, name: str = "default") -> nn.Module:
    """Add adapter ``name`` described by ``config`` to ``model`` in place and return ``model``.

    The new adapter becomes the active one and the only trainable part (plus its
    ``modules_to_save`` copies and biases per ``config.bias``).  The modules it
    creates follow the model's current ``training`` flag.  Every check runs
    before the model is touched, so a failed call leaves it unchanged.
    """
    hooks = _hooks(config)
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without dots, got {name!r}: e.g. 'default'")
    if name in configs(model):
        raise ValueError(
            f"an adapter named {name!r} is already injected: pick another name or call peftlab.delete(model, {name!r})"
        )
    _require_unmerged(model, "inject a new adapter")
    old = list(model.modules()), list(model.parameters())  # kept alive while new modules are told apart by id
    hooks.inject(model, config, name)
    for mod in flag_new_modules(model, *old):
        mod.training = model.training  # e.g. a new dropout in an eval-mode model must be off
    configs(model)[name] = config
    set_active(model, name)
    return model


def set_active(model: nn.Module, name: str | None) -> None:
    """Use (and train) only adapter ``name``; ``None`` runs the plain base model and trains nothing."""
    if name is not None and name not in configs(model):
        raise ValueError(f"no adapter named {name!r}: injected adapters are {list(configs(model))}")
    _require_unmerged(model, "switch adapters")
    for mod in _layers(model):
        if isinstance(mod, LoRALinear):
            mod.active = {name} if name in mod.lora_A else set()
        else:
            mod.active = name if name in mod.modules_to_save else None
    object.__setattr__(model, "peftlab_active", name)
    _mark_active_trainable(model)


def _mark_active_trainable(model: nn.Module) -> None:
    """requires_grad = True exactly for what the active adapter trains (nothing when none is active)."""
    model.requires_grad_(False)
    name = active_adapter(model)
    if name is not None:
        config = configs(model)[name]
        _hooks(config).mark_trainable(model, config, name)


def delete(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; layers left without adapters get their original module back.

    Afterwards only the active adapter is trainable; if ``name`` was the active one, nothing is.
    """
    if name not in configs(model):
        raise ValueError(f"no adapter named {name!r}: injected adapters are {list(configs(model))}")
    _require_unmerged(model, f"delete adapter {name!r}")
    _hooks(configs(model)[name]).delete(model, name)
    del configs(model)[name]
    if active_adapter(model) == name:
        set_active(model, None)
    else:  # recompute the flags from the active adapter alone
        _mark_active_trainable(model)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes the base model's outputs."""
    _require_unmerged(model, "disable adapters")
    layers = _layers(model)
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    was_disabled = model.__dict__.get("peftlab_disabled", False)
    model.__dict__["peftlab_disabled"] = True  # read by prefix/prompt tuning (peftlab/prefix.py, prompt.py)
    try:
        yield model
    finally:
        for m, flag in zip(layers, before):
            m.disabled = flag
        model.__dict__["peftlab_disabled"] = was_disabled


def merge(model: nn.Module) -> nn.Module:
    """Fold the active LoRA adapter into the base weights (explicit; raises if already merged)."""
    own = _METHODS.get(type(configs(model).get(active_adapter(model))))
    if own is not None and own.merge is not None:  # e.g. prefix-tuning folds its MLP into flat prefixes
        own.merge(model, active_adapter(model))
        return model
    lora = [m for m in _layers(model) if isinstance(m, LoRALinear)]
    if not lora:
        raise RuntimeError("the model has no LoRA layers to merge: inject a LoRAConfig first")
    if active_adapter(model) is None:
        raise RuntimeError("no active adapter to merge: call peftlab.set_active(model, name) first")
    if _any_merged(model):
        raise RuntimeError("LoRA weights are already merged: calling merge() twice would add them twice")
    for m in lora:
        m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take merged LoRA updates out again (raises if nothing is merged).

    Half-precision (fp16 / bf16) bases get their pre-merge weights back bit-exactly from a copy
    kept at merge time; fp32 / fp64 bases subtract the update (see :class:`peftlab.lora.LoRALinear`).
    """
    merged = [m for m in _layers(model) if isinstance(m, LoRALinear) and m.merged]
    if not merged:
        raise RuntimeError("nothing to unmerge: no LoRA adapter is merged into the model")
    for m in merged:
        m.unmerge()
    return model


def unload(model: nn.Module, name: str | None = None, *, discard: bool = False) -> nn.Module:
    """Merge one LoRA adapter and return the plain model with no peftlab modules.

    The adapter folded in is ``name`` if given (it becomes the active one first),
    else the active adapter; every other adapter is dropped.  ``modules_to_save``
    wrappers are replaced by the folded adapter's trainable copy.  With no adapter
    active and no ``name``, nothing would be folded and all trained weights lost, so
    this raises ``RuntimeError`` unless ``discard=True`` asks for exactly that (the
    plain base model back).  ``requires_grad`` flags are left as they are.
    """
    if name is not None and name not in configs(model):
        raise ValueError(f"no adapter named {name!r} to unload: injected adapters are {list(configs(model))}")
    if any(m.disabled for m in _layers(model)):
        raise RuntimeError("cannot unload inside peftlab.disabled(model): leave the with-block first")
    for n, c in list(configs(model).items()):  # methods that cannot be unloaded refuse before any change
        if _hooks(c).unload is not None:
            _hooks(c).unload(model, n)
    if name is None and active_adapter(model) is None and configs(model) and not discard:
        names = list(configs(model))
        raise RuntimeError(
            f"no adapter is active, so unload() would fold nothing in and discard every adapter ({names}): "
            f"call peftlab.set_active(model, {names[0]!r}) first or pass unload(model, name={names[0]!r}) to fold "
            f"one; to throw them away use peftlab.delete(model, name) or unload(model, discard=True)"
        )
    if name is not None and name != active_adapter(model):
        set_active(model, name)  # raises (model unchanged) if weights are merged
    for mod_name, mod in list(walk(model)):
        if isinstance(mod, LoRALinear):
            if mod.active - set(mod.merged):
                mod.merge([n for n in sorted(mod.active) if n not in mod.merged])
            replace_module(model, mod_name, mod.base_layer)
        elif isinstance(mod, ModulesToSaveWrapper):
            replace_module(model, mod_name, mod.current)
    model.__dict__.pop("peftlab_configs", None)
    model.__dict__.pop("peftlab_active", None)
    return model


# -- reports ------------------------------------------------------------------------
def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def _html(header: list[str], rows: list[list[str]], caption: str) -> str:
    cell = lambda t, c: f"<{t}>{html.escape(str(c))}</{t}>"  # noqa: E731
    body = "".join("<tr>" + "".join(cell("td", c) for c in r) + "</tr>" for r in rows)
    head = "<tr>" + "".join(cell("th", h) for h in header) + "</tr>"
    return f"<table><caption>{html.escape(caption)}</caption>{head}{body}</table>"


@dataclass
class ExplainRow:
    module: str
    kind: str  # "lora" | "modules_to_save" | "unsupported"
    type: str
    reason: str
    shape: str  # "in -> out" for LoRA rows
    added: int  # parameters this row adds


@dataclass
class ExplainReport:
    """What ``inject(model, config)`` would do; print it or show it in Jupyter."""

    config: AdapterConfigBase
    rows: list[ExplainRow]
    base_parameters: int
    notes: list[str] = field(default_factory=list)

    @property
    def total_added(self) -> int:
        return sum(r.added for r in self.rows)

    _HEADER = ["module", "kind", "type", "matched by", "shape", "adds"]

    def _cells(self) -> list[list[str]]:
        return [[r.module, r.kind, r.type, r.reason, r.shape, f"{r.added:,}"] for r in self.rows]

    def _summary(self) -> str:
        pct = 100 * self.total_added / max(self.base_parameters, 1)
        return f"adds {self.total_added:,} parameters = {pct:.3f}% of the base model's {self.base_parameters:,}"

    def __str__(self) -> str:
        return "\n".join([_table(self._HEADER, self._cells()), self._summary(), *self.notes])

    def _repr_html_(self) -> str:
        notes = "".join(f"<p>{html.escape(n)}</p>" for n in self.notes)
        return _html(self._HEADER, self._cells(), self._summary()) + notes


def explain(model: nn.Module, config: LoRAConfig) -> ExplainReport:
    """Report which modules ``config`` would adapt or copy, why, and the parameters each adds."""
    plan = find_modules(model, config)
    rows = []
    for n, m, why in plan.targets:
        base = m.base_layer if isinstance(m, LoRALinear) else m
        w = base.weight  # nn.Linear: (out, in); Conv1D: (in, out)
        fan_in, fan_out = (w.shape[1], w.shape[0]) if isinstance(base, nn.Linear) else (w.shape[0], w.shape[1])
        rows.append(ExplainRow(n, "lora", type(base).__name__, why, f"{fan_in} -> {fan_out}",
                               config.r * (fan_in + fan_out)))
    for n, m in plan.saves:
        src = m.original_module if isinstance(m, ModulesToSaveWrapper) else m
        rows.append(ExplainRow(n, "modules_to_save", type(src).__name__, "modules_to_save", "",
                               sum(p.numel() for p in src.parameters())))
    for n, m, why in plan.unsupported:
        rows.append(ExplainRow(n, "unsupported", type(m).__name__, why, "", 0))
    notes = []
    if not plan.targets:
        notes.append(f"nothing matched; linear layers (by suffix): {linear_suffixes(model)}")
    if plan.unsupported:
        notes.append("unsupported rows would make inject() fail: target nn.Linear / Conv1D layers only")
    if plan.unmatched_saves:
        notes.append(f"modules_to_save entries matching nothing: {plan.unmatched_saves}")
    if plan.enclosed:
        notes.append(f"skipped inside modules_to_save (replaced by a trained copy): {[n for n, _ in plan.enclosed]}")
    if plan.enclosed_only:
        notes.append(f"target_modules entries {plan.enclosed_only} match only inside modules_to_save: "
                     "inject() would refuse this config")
    base_total = sum(p.numel() for n, p in base_parameters(model)
                     if "lora_" not in n and ".modules_to_save." not in n)
    return ExplainReport(config, rows, base_total, notes)


@dataclass
class ParameterCount:
    trainable: int
    total: int
    by_kind: dict[str, int]  # base_frozen / lora / modules_to_save / bias / other

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        kinds = ", ".join(f"{k}={v:,}" for k, v in self.by_kind.items())
        return f"trainable {self.trainable:,} / {self.total:,} ({self.percent:.3f}%); {kinds}"


def count_parameters(model: nn.Module) -> ParameterCount:
    """Count parameters (shared tensors once), trainable ones and a breakdown by kind."""
    kinds = {"base_frozen": 0, "lora": 0, "modules_to_save": 0, "bias": 0, "other": 0}
    trainable = total = 0
    for n, p in model.named_parameters():
        k = p.numel()
        total += k
        trainable += k if p.requires_grad else 0
        if "lora_" in n:
            kinds["lora"] += k
        elif n.startswith(("prefix_tuning.", "prompt_tuning.")):  # peftlab/prefix.py, peftlab/prompt.py
            kind = n.split("_", 1)[0]  # "prefix" | "prompt"
            kinds[kind] = kinds.get(kind, 0) + k
        elif ".adapter_" in n or n.startswith("adapter_"):  # bottleneck adapters (peftlab/adapters.py)
            kinds["adapter"] = kinds.get("adapter", 0) + k
        elif ".modules_to_save." in n or n.startswith("modules_to_save."):
            kinds["modules_to_save"] += k
        elif not p.requires_grad:
            kinds["base_frozen"] += k
        elif n.endswith("bias"):
            kinds["bias"] += k
        else:
            kinds["other"] += k
    return ParameterCount(trainable, total, kinds)
