"""Fully-trained module copies ("modules_to_save") shared by all peftlab methods.

A freshly initialised task head (e.g. BERT's ``classifier``) cannot be learned
through a low-rank update of something that does not exist yet, so LoRA
fine-tuning (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models") usually trains such heads in full.  :class:`ModulesToSaveWrapper`
keeps the frozen original and one trainable copy per adapter name, mirroring
HF peft's layout (``<path>.original_module.*`` / ``<path>.modules_to_save.<name>.*``)
so the saved tensors line up with peft's.  Explained in notebooks/03_lora.ipynb.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

__all__ = ["ModulesToSaveWrapper"]


class ModulesToSaveWrapper(nn.Module):
    """Route calls to the active adapter's trainable copy, else to the original.

    Same call signature and output as the wrapped module.
    """

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
        return self.current(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # let code that reads e.g. ``model.classifier.weight`` or ``.out_features`` keep working
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save", "active", "disabled") or name.startswith("__"):
                raise  # also keeps copy/pickle of a half-built instance from recursing
            return getattr(self.current, name)
