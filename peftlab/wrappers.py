"""Fully-trained module copies ("modules_to_save") shared by all peftlab methods.

A freshly initialised task head (e.g. BERT's ``classifier``) cannot be learned
through a low-rank update of something that does not exist yet, so LoRA
fine-tuning (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models") usually trains such heads in full.  :class:`ModulesToSaveWrapper`
keeps the frozen original and one trainable copy per adapter name, mirroring
HF peft's layout (``<path>.original_module.*`` / ``<path>.modules_to_save.<name>.*``)
so the saved tensors line up with peft's.  Every method (LoRA, prefix and prompt
tuning, bottleneck adapters) adds, trains, saves and deletes these copies through the
helpers below.  Explained in notebooks/03_lora.ipynb.

Also here, because every method needs it: :func:`adapter_dtype`, the rule that adapters on a
half-precision (fp16 / bf16) base are kept in float32 (as HF peft does by default).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .tree import AdapterLayer, replace_module, walk

__all__ = ["ModulesToSaveWrapper", "SAVES_PREFIX", "find_saves", "add_saves", "mark_saves", "delete_saves",
           "saved_copies", "saved_shapes", "is_saved_copy", "adapter_dtype", "mark_root_bank", "delete_from_root_bank"]

SAVES_PREFIX = "modules_to_save."  # key prefix of the copies in peftlab's own file formats


def is_saved_copy(parameter_name: str) -> bool:
    """Whether a parameter belongs to a trained ``modules_to_save`` copy (``<path>.modules_to_save.<adapter>.*``)."""
    return "modules_to_save" in parameter_name.split(".")


def adapter_dtype(reference: torch.Tensor) -> torch.dtype:
    """The dtype for new adapter parameters next to ``reference`` (a base weight): float32 on a
    half-precision base, where Adam's small updates would round away, else the base's own."""
    return torch.float32 if reference.dtype in (torch.float16, torch.bfloat16) else reference.dtype


class ModulesToSaveWrapper(AdapterLayer):
    """Route calls to the active adapter's trainable copy, else to the original.

    Same call signature and output as the wrapped module.  Inside ``peftlab.serving.adapter_rows``
    (``row_route`` set) row i of the batch goes to the copy of adapter ``names[i]`` instead, or to
    the original when this wrapper holds no copy of that name (notebook 11).
    """

    # per-row adapter choice of a mixed batch (a ``peftlab.serving.RowRoute``); None: ``active`` for all rows
    row_route = None

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False

    def add_copy(self, name: str) -> None:
        """Add a trainable deep copy of the original module under ``name``."""
        if name in self.modules_to_save:
            raise ValueError(f"modules_to_save copy {name!r} already exists: pick another adapter name")
        twin = copy.deepcopy(self.original_module)
        for p in twin.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = twin

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def activate(self, name: str | None) -> None:
        self.active = name if name in self.modules_to_save else None

    def unloaded(self) -> nn.Module:
        return self.current

    def delete_copy(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active == name:
            self.active = None

    @property
    def current(self) -> nn.Module:
        """The module ``forward`` uses right now."""
        if self.disabled or self.active is None or self.active not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.row_route is not None:
            return self._routed_forward(args, kwargs)
        return self.current(*args, **kwargs)

    def _routed_forward(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The original on all n rows, then each held copy on its own rows, written over them.

        Every tensor argument whose leading dimension is n is split by rows; the output must be
        one tensor (n, ...), as a classification head's is.
        """
        route = self.row_route
        n = next((a.shape[0] for a in (*args, *kwargs.values()) if torch.is_tensor(a) and a.dim()), None)
        route.check(n, self)
        out = self.original_module(*args, **kwargs)  # (n, ...)
        if not torch.is_tensor(out):
            raise TypeError(f"a mixed batch needs modules_to_save modules that return one tensor, but "
                            f"{type(self.original_module).__name__} returned {type(out).__name__}")

        def pick(a: Any, idx: torch.Tensor) -> Any:  # the rows idx of a per-row tensor argument
            return a.index_select(0, idx) if torch.is_tensor(a) and a.dim() and a.shape[0] == n else a

        for name, idx in route.groups.items():
            if name not in self.modules_to_save:
                continue
            twin = self.modules_to_save[name]
            rows = twin(*(pick(a, idx) for a in args), **{k: pick(v, idx) for k, v in kwargs.items()})
            out = out.index_copy(0, idx, rows.to(out.dtype))  # (n, ...): rows idx replaced
        return out

    def __getattr__(self, name: str) -> Any:
        # let code that reads e.g. ``model.classifier.weight`` or ``.out_features`` keep working
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save", "active", "disabled") or name.startswith("__"):
                raise  # also keeps copy/pickle of a half-built instance from recursing
            return getattr(self.current, name)


# -- the helpers every method uses ------------------------------------------------------------
def find_saves(model: nn.Module, keys: tuple[str, ...], what: str = "modules_to_save") -> list[tuple[str, nn.Module]]:
    """(path, module) for each entry of ``keys`` (equal to, or a dotted suffix of, the path).

    Raises ``ValueError`` naming the first entry that matches nothing; changes nothing.
    """
    found = []
    for key in keys:
        hits = [(n, m) for n, m in walk(model) if n == key or n.endswith("." + key)]
        if not hits:
            raise ValueError(f"{what} entry {key!r} matches no module of {type(model).__name__}: "
                             "use a module name such as 'classifier' or 'score' that exists in the model")
        found += hits
    return found


def add_saves(model: nn.Module, keys: tuple[str, ...], name: str, plan=None) -> None:
    """Wrap the ``modules_to_save`` matches (or ``plan``'s (path, module) pairs) and add a trainable
    copy for adapter ``name``; every entry is checked before the first wrapper is made."""
    for path, mod in plan if plan is not None else find_saves(model, keys):
        wrapper = mod if isinstance(mod, ModulesToSaveWrapper) else ModulesToSaveWrapper(mod)
        wrapper.add_copy(name)
        if wrapper is not mod:
            replace_module(model, path, wrapper)


def mark_saves(model: nn.Module, name: str) -> None:
    """Make adapter ``name``'s copies trainable."""
    for _, mod in walk(model):
        if isinstance(mod, ModulesToSaveWrapper) and name in mod.modules_to_save:
            mod.modules_to_save[name].requires_grad_(True)


def delete_saves(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``'s copies; a wrapper left with none gives its original module back."""
    for path, mod in list(walk(model)):
        if isinstance(mod, ModulesToSaveWrapper) and name in mod.modules_to_save:
            mod.delete_copy(name)
            if not len(mod.modules_to_save):
                replace_module(model, path, mod.original_module)


def saved_copies(model: nn.Module, name: str, prefix: str = SAVES_PREFIX) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s copies as live tensors keyed ``<prefix><path>.<param>``."""
    out = {}
    for path, mod in walk(model):
        if isinstance(mod, ModulesToSaveWrapper) and name in mod.modules_to_save:
            for k, v in mod.modules_to_save[name].state_dict(keep_vars=True).items():
                out[f"{prefix}{path}.{k}"] = v
    return out


def saved_shapes(found: list[tuple[str, nn.Module]], prefix: str = SAVES_PREFIX) -> dict[str, tuple]:
    """The keys and shapes ``saved_copies`` will give once the ``find_saves`` matches ``found`` are
    wrapped (pure)."""
    shapes = {}
    for path, mod in found:
        src = mod.original_module if isinstance(mod, ModulesToSaveWrapper) else mod
        shapes.update({f"{prefix}{path}.{k}": tuple(v.shape) for k, v in src.state_dict().items()})
    return shapes


# -- methods that keep their modules in a ModuleDict on the root (prefix and prompt tuning) ----
def mark_root_bank(model: nn.Module, container: str, name: str) -> None:
    """Make ``model.<container>[name]`` and adapter ``name``'s copies trainable."""
    model._modules[container][name].requires_grad_(True)
    mark_saves(model, name)


def delete_from_root_bank(model: nn.Module, container: str, name: str) -> bool:
    """Remove ``model.<container>[name]`` and its copies; True when that emptied (and removed) the bank."""
    bank = model._modules[container]
    del bank[name]
    delete_saves(model, name)
    if len(bank):
        return False
    del model._modules[container]
    return True
