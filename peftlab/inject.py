"""Putting adapters into a model, switching them, inspecting them, and taking them out again.

``inject(model, config)`` adds an adapter of any registered method in place (LoRA,
prefix and prompt tuning, bottleneck adapters: ``peftlab.registry``), makes it the
active and only trainable part and returns the model. Every operation here is generic:
it looks up the adapter's :class:`peftlab.registry.MethodHooks` record and calls it, and
it switches, disables and unloads wrapping layers through the
:class:`peftlab.tree.AdapterLayer` interface, so no method is named in this file.

Modules an injection creates take the model's current ``training`` flag (a LoRA dropout
added to a model in eval mode is off), and are flagged so that ``bias="all"`` and other
base-model-only logic can tell them from the base model's own modules
(``peftlab.tree.base_parameters``). Explained in notebooks/03_lora.ipynb.
"""

from __future__ import annotations

import contextlib
import html
from dataclasses import dataclass, field
from typing import Iterator

from torch import nn

from .registry import DISABLED, active_adapter, all_hooks, configs, hooks_for
from .tree import adapter_layers, flag_new_modules, replace_module
from .wrappers import is_saved_copy

__all__ = [
    "inject", "check_adapter_name", "BASE_ROWS", "explain", "count_parameters", "merge", "unmerge", "unload", "set_active",
    "disabled", "delete", "configs", "active_adapter", "ExplainReport", "ExplainRow", "ParameterCount",
]


def _wrapping_layers(model: nn.Module) -> list:
    return [m for _, m in adapter_layers(model)]


def _require_unmerged(model: nn.Module, action: str) -> None:
    if any(m.is_merged for m in _wrapping_layers(model)):
        raise RuntimeError(f"cannot {action} while LoRA weights are merged: call peftlab.unmerge(model) first")


BASE_ROWS = "__base__"  # peftlab.serving.BASE: a mixed batch's rows that get no adapter; no adapter may be called so


def check_adapter_name(name) -> None:
    """Raise ``ValueError`` unless ``name`` can key an adapter in every ``nn.ModuleDict`` a method keeps.

    Adapters live in ``nn.ModuleDict``s keyed by name (``lora_A[name]``, the trainable copies, the
    prefix banks); ``add_module`` refuses a dotted key and any key that is already an attribute of
    the dict (``"forward"``, ``"double"``, ``"keys"``, ...), and that refusal would come after some
    layers had been wrapped. Checking here keeps a failed ``inject`` from changing anything.
    """
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without dots, got {name!r}: e.g. 'default'")
    if name == BASE_ROWS:
        raise ValueError(f"adapter name {name!r} is reserved: in a mixed batch (peftlab.serving) it names the rows "
                         "that run the base model alone; pick another name")
    if hasattr(nn.ModuleDict(), name):
        raise ValueError(f"adapter name {name!r} is an attribute of torch's nn.ModuleDict, which keeps the adapters, "
                         f"so it cannot be a key there: pick another name, e.g. {name + '_adapter'!r}")


def inject(model: nn.Module, config, name: str = "default") -> nn.Module:
    """Add adapter ``name`` described by ``config`` to ``model`` in place and return ``model``.

    The new adapter becomes the active one and the only trainable part (plus its
    ``modules_to_save`` copies and biases per ``config.bias``).  The modules it
    creates follow the model's current ``training`` flag.  Every check runs
    before the model is touched, so a failed call leaves it unchanged.
    """
    hooks = hooks_for(config)
    check_adapter_name(name)
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
    for mod in _wrapping_layers(model):
        mod.activate(name)
    object.__setattr__(model, "peftlab_active", name)  # read by methods without layers of their own
    _mark_active_trainable(model)


def _mark_active_trainable(model: nn.Module) -> None:
    """requires_grad = True exactly for what the active adapter trains (nothing when none is active)."""
    model.requires_grad_(False)
    name = active_adapter(model)
    if name is not None:
        config = configs(model)[name]
        hooks_for(config).mark_trainable(model, config, name)


def delete(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; layers left without adapters get their original module back.

    Afterwards only the active adapter is trainable; if ``name`` was the active one, nothing is.
    """
    if name not in configs(model):
        raise ValueError(f"no adapter named {name!r}: injected adapters are {list(configs(model))}")
    _require_unmerged(model, f"delete adapter {name!r}")
    hooks_for(configs(model)[name]).delete(model, name)
    del configs(model)[name]
    if active_adapter(model) == name:
        set_active(model, None)
    else:  # recompute the flags from the active adapter alone
        _mark_active_trainable(model)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes the base model's outputs."""
    _require_unmerged(model, "disable adapters")
    layers = _wrapping_layers(model)
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    was_disabled = model.__dict__.get(DISABLED, False)
    model.__dict__[DISABLED] = True  # read by methods without layers of their own (prefix, prompt, adapters)
    try:
        yield model
    finally:
        for m, flag in zip(layers, before):
            m.disabled = flag
        model.__dict__[DISABLED] = was_disabled


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapter into the model (explicit; raises if it cannot be, or already is).

    LoRA adds s * B A to the base weights; prefix-tuning folds its MLP into flat prefixes;
    bottleneck adapters and prompt tuning refuse, saying why.
    """
    name = active_adapter(model)
    if name is None:
        if not configs(model):
            raise RuntimeError("the model has no adapter to merge: inject one first (peftlab.inject(model, config))")
        raise RuntimeError("no active adapter to merge: call peftlab.set_active(model, name) first")
    hooks_for(configs(model)[name]).merge(model, name)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take merged LoRA updates out again (raises if nothing is merged).

    Half-precision (fp16 / bf16) bases get their pre-merge weights back bit-exactly from a copy
    kept at merge time; fp32 / fp64 bases subtract the update (see :class:`peftlab.lora.LoRALinear`).
    """
    merged = [m for m in _wrapping_layers(model) if m.is_merged]
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
    if any(m.disabled for m in _wrapping_layers(model)):
        raise RuntimeError("cannot unload inside peftlab.disabled(model): leave the with-block first")
    for n, c in list(configs(model).items()):  # each method checks (and may refuse) before any change
        hooks_for(c).unload(model, n)
    if name is None and active_adapter(model) is None and configs(model) and not discard:
        names = list(configs(model))
        raise RuntimeError(
            f"no adapter is active, so unload() would fold nothing in and discard every adapter ({names}): "
            f"call peftlab.set_active(model, {names[0]!r}) first or pass unload(model, name={names[0]!r}) to fold "
            f"one; to throw them away use peftlab.delete(model, name) or unload(model, discard=True)"
        )
    if name is not None and name != active_adapter(model):
        set_active(model, name)  # raises (model unchanged) if weights are merged
    for mod_name, mod in adapter_layers(model):
        replace_module(model, mod_name, mod.unloaded())
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

    config: object  # the method's config (a peftlab.config.AdapterConfigBase)
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


def explain(model: nn.Module, config) -> ExplainReport:
    """Report which modules ``config`` would adapt or copy, why, and the parameters each adds.

    Changes nothing. Methods without a report of their own (``MethodHooks.explain``) raise ``TypeError``.
    """
    hooks = hooks_for(config)
    if hooks.explain is None:
        raise TypeError(f"explain() has no report for {type(config).__name__} yet: it covers "
                        f"{[h.config.__name__ for h in all_hooks() if h.explain is not None]}")
    return hooks.explain(model, config)


@dataclass
class ParameterCount:
    trainable: int
    total: int
    by_kind: dict[str, int]  # base_frozen, each injected method ("lora", "prefix", ...), modules_to_save, bias, other

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        kinds = ", ".join(f"{k}={v:,}" for k, v in self.by_kind.items())
        return f"trainable {self.trainable:,} / {self.total:,} ({self.percent:.3f}%); {kinds}"


def count_parameters(model: nn.Module) -> ParameterCount:
    """Count parameters (shared tensors once), trainable ones and a breakdown by kind.

    Kinds: the base model's frozen parameters, each injected method's own under its name
    (``MethodHooks.owns``: "lora", "prefix", ...), ``modules_to_save`` copies, trainable biases, other.
    """
    present = [hooks_for(c).method for c in configs(model).values()]
    kinds = {"base_frozen": 0, **{m: 0 for m in present}, "modules_to_save": 0, "bias": 0, "other": 0}
    methods = all_hooks()
    trainable = total = 0
    for n, p in model.named_parameters():
        k = p.numel()
        total += k
        trainable += k if p.requires_grad else 0
        owner = next((h.method for h in methods if h.owns(n)), None)
        if owner is not None:
            kinds[owner] = kinds.get(owner, 0) + k
        elif is_saved_copy(n):
            kinds["modules_to_save"] += k
        elif not p.requires_grad:
            kinds["base_frozen"] += k
        elif n.endswith("bias"):
            kinds["bias"] += k
        else:
            kinds["other"] += k
    return ParameterCount(trainable, total, kinds)
