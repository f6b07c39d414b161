"""The module tree: walking it, replacing a module through its parent, and telling what adapters added.

Every method changes a model by swapping modules in place. A module is always replaced
through its parent (``setattr(parent, child_name, new)``): ``setattr(model,
"encoder.layer.0.attention.self.query", new)`` on the root would only add a stray
attribute with a dotted name and leave the real layer untouched.

:class:`AdapterLayer` is what a wrapping layer (``peftlab.lora.LoRALinear``,
``peftlab.wrappers.ModulesToSaveWrapper``) implements so that generic code can switch,
disable and unload it without knowing which method it belongs to.
"""

from __future__ import annotations

from typing import Iterator

from torch import nn

__all__ = ["AdapterLayer", "walk", "replace_module", "flag_new_modules", "base_parameters", "ADDED",
           "adapter_layers"]

# key in ``module.__dict__``: the module was created by an adapter injection and holds only adapter
# parameters (``lora_A`` dicts, trainable copies, prefix encoders, bottleneck banks, ...)
ADDED = "peftlab_added"


class AdapterLayer(nn.Module):
    """A layer that wraps a base module and holds named adapters for it.

    ``disabled`` (bool) makes ``forward`` compute the base module's output.
    """

    disabled: bool

    @property
    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def activate(self, name: str | None) -> None:
        """Run adapter ``name`` from now on (nothing when ``name`` is None or not held here)."""
        raise NotImplementedError

    @property
    def is_merged(self) -> bool:
        """Whether an adapter is folded into the base weights (it then cannot be switched off)."""
        return False

    def unmerge(self) -> None:
        raise RuntimeError(f"{type(self).__name__} has nothing to unmerge")

    def unloaded(self) -> nn.Module:
        """The plain module that replaces this layer on ``peftlab.unload`` (active adapter folded in)."""
        raise NotImplementedError


def walk(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Like ``named_modules`` but does not descend into adapter layers (skips the root)."""
    for child_name, child in model.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        yield name, child
        if not isinstance(child, AdapterLayer):
            yield from walk(child, name)


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """(dotted name, layer) of every adapter layer in ``model``."""
    return [(n, m) for n, m in walk(model) if isinstance(m, AdapterLayer)]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the module with dotted ``name`` is (through its parent)."""
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new)


def flag_new_modules(model: nn.Module, old_modules: list[nn.Module], old_params: list[nn.Parameter]) -> list[nn.Module]:
    """The modules of ``model`` not among ``old_modules`` (what an injection just created).

    Each new module that holds none of ``old_params`` is flagged ``ADDED``: all its parameters
    belong to an adapter.  New modules that wrap base layers (``LoRALinear``,
    ``ModulesToSaveWrapper``) hold old parameters, so only their adapter parts are flagged.
    The caller keeps both lists alive across the injection, so no ``id`` can be reused.
    """
    old_mod_ids = {id(m) for m in old_modules}
    old_param_ids = {id(p) for p in old_params}
    new = [m for m in model.modules() if id(m) not in old_mod_ids]
    for m in new:
        if not any(id(p) in old_param_ids for p in m.parameters()):
            m.__dict__[ADDED] = True
    return new


def base_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``model.named_parameters()`` without those of modules an adapter injection added.

    What is left is the base model's own parameters (a wrapped layer's ``base_layer.*`` and a saved
    module's ``original_module.*`` included); used to restrict ``bias="all"`` to them.
    """
    owned = {id(p) for m in model.modules() if m.__dict__.get(ADDED) for p in m.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) not in owned]
