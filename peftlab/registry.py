"""The method registry: one :class:`MethodHooks` record per adapter method.

Generic code (``peftlab.inject``: inject, switch, delete, merge, unload, count;
``peftlab.io``: save and load) never names a method: it looks up the record of the
adapter at hand and calls its hooks. Each method keeps its record next to the code
that saves it:

=========  ==============================  =====================================
method     record                          the method itself
=========  ==============================  =====================================
lora       ``peftlab.lora_io.HOOKS``       ``peftlab.lora``, ``peftlab.lora_inject``
prefix     ``peftlab.prefix_io.PREFIX``    ``peftlab.prefix``
prompt     ``peftlab.prefix_io.PROMPT``    ``peftlab.prompt``
adapter    ``peftlab.adapters.HOOKS``      ``peftlab.adapters``
ia3        ``peftlab.ia3.HOOKS``           ``peftlab.ia3``
=========  ==============================  =====================================

The built-in records are resolved on first lookup (an explicit import of the module
named in ``BUILTIN``, not a side effect of some other import), so whichever peftlab
module a program imports first, every method saves and loads. A new method calls
:func:`register` with its own record.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

__all__ = ["MethodHooks", "register", "hooks_for", "hooks_for_method", "all_hooks", "configs",
           "active_adapter", "adapters_disabled", "under", "BUILTIN", "DISABLED"]

DISABLED = "peftlab_disabled"  # key in the root model's __dict__: True inside ``peftlab.disabled(model)``


def _cannot(what: str) -> Callable[[nn.Module, str], None]:
    def refuse(model: nn.Module, name: str) -> None:
        kind = type(configs(model)[name]).__name__
        raise RuntimeError(f"adapter {name!r} ({kind}) cannot be {what}: remove it with "
                           f"peftlab.delete(model, {name!r}) instead")
    return refuse


@dataclass(frozen=True)
class MethodHooks:
    """Everything generic code needs to know about one method.

    ``inject(model, config, name)`` adds adapter ``name`` in place, after checking everything;
    ``mark_trainable(model, config, name)`` sets ``requires_grad`` on what it trains (all else is
    frozen first); ``delete(model, name)`` removes it and restores what it replaced;
    ``save(model, name)`` returns the CPU tensors and the ``adapter_config.json`` content (with
    peftlab's own record under ``"peftlab"``) that ``peftlab.io`` writes;
    ``load(model, directory, name, tensors)`` checks the already-validated ``tensors`` and the
    folder's JSON against ``model``, then injects and copies them in (the model is unchanged on
    any error); ``owns(parameter_name)`` tells this method's parameters from everything else's;
    ``merge`` / ``unload`` fold the adapter into the weights, or raise saying why they cannot.
    """

    method: str  # the config class's ``method`` ("lora", "prefix", ...): the key of the registry
    config: type  # its config class
    inject: Callable[[nn.Module, object, str], None]
    mark_trainable: Callable[[nn.Module, object, str], None]
    delete: Callable[[nn.Module, str], None]
    save: Callable[[nn.Module, str], tuple[dict[str, torch.Tensor], dict]]
    load: Callable[[nn.Module, Path, str, dict[str, torch.Tensor]], nn.Module]
    owns: Callable[[str], bool]
    merge: Callable[[nn.Module, str], None] = _cannot("merged into the base weights")
    unload: Callable[[nn.Module, str], None] = _cannot("unloaded (merged into the weights)")
    explain: Callable | None = None  # (model, config) -> peftlab.inject.ExplainReport
    peft_type: str | None = None  # HF peft's name for the method in adapter_config.json, if peft has it


def under(container: str) -> Callable[[str], bool]:
    """An ``owns`` for a method whose parameters all live in ``model.<container>``."""
    return lambda parameter_name: parameter_name.startswith(container + ".")


# where each built-in method's record lives: method -> (module, attribute)
BUILTIN = {
    "lora": ("peftlab.lora_io", "HOOKS"),
    "prefix": ("peftlab.prefix_io", "PREFIX"),
    "prompt": ("peftlab.prefix_io", "PROMPT"),
    "adapter": ("peftlab.adapters", "HOOKS"),
    "ia3": ("peftlab.ia3", "HOOKS"),
}
_REGISTRY: dict[str, MethodHooks] = {}


def register(hooks: MethodHooks) -> None:
    """Make every generic operation understand configs of ``hooks.config``."""
    if getattr(hooks.config, "method", None) != hooks.method:
        raise ValueError(f"MethodHooks.method={hooks.method!r} but {hooks.config.__name__}.method is "
                         f"{getattr(hooks.config, 'method', None)!r}: they must be the same string")
    _REGISTRY[hooks.method] = hooks


def _resolve(method: str) -> MethodHooks | None:
    if method not in _REGISTRY and method in BUILTIN:
        module, attr = BUILTIN[method]
        register(getattr(importlib.import_module(module), attr))
    return _REGISTRY.get(method)


def hooks_for_method(method: str) -> MethodHooks:
    """The record of ``method`` (e.g. ``"lora"``); ``KeyError`` naming the known ones otherwise."""
    found = _resolve(method) if isinstance(method, str) else None
    if found is None:
        raise KeyError(f"no peftlab method {method!r}: known methods are {sorted(set(BUILTIN) | set(_REGISTRY))}")
    return found


def hooks_for(config: object) -> MethodHooks:
    """The record for a config instance; ``TypeError`` for anything that is not a registered config."""
    found = _resolve(getattr(config, "method", None)) if isinstance(getattr(config, "method", None), str) else None
    if found is None or not isinstance(config, found.config):
        known = ", ".join(h.config.__name__ for h in all_hooks())
        raise TypeError(f"no peftlab method handles {type(config).__name__}: supported configs are {known}")
    return found


def all_hooks() -> list[MethodHooks]:
    """Every method's record, built-in ones first."""
    builtin = [_resolve(method) for method in BUILTIN]
    return builtin + [h for m, h in _REGISTRY.items() if m not in BUILTIN]


# -- the adapters a model carries ----------------------------------------------------------
def configs(model: nn.Module) -> dict:
    """The adapters injected into ``model``: name -> config (created empty on first use)."""
    reg = model.__dict__.get("peftlab_configs")
    if reg is None:
        reg = {}
        object.__setattr__(model, "peftlab_configs", reg)
    return reg


def active_adapter(model: nn.Module) -> str | None:
    """The name of the adapter that runs (and trains) now, or None."""
    return model.__dict__.get("peftlab_active")


def adapters_disabled(model: nn.Module) -> bool:
    """True inside ``with peftlab.disabled(model):`` (methods without layers of their own read this)."""
    return bool(model.__dict__.get(DISABLED))
