"""Finding the modules an adapter config selects (pure: nothing is changed).

Matching rules for LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models") target modules, as explained in notebooks/03_lora.ipynb:

* a list of names matches a module whose dotted name equals the entry or ends
  with ``"." + entry`` ("query" matches ``bert.encoder.layer.0.attention.self.query``);
* a single string is a full-match regular expression on the dotted name;
* ``"all-linear"`` takes every ``nn.Linear`` / GPT-2 ``Conv1D`` except the output
  head (``classifier``, ``score``, ``lm_head``, ``get_output_embeddings()``) and
  the ``modules_to_save``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

from torch import nn

from .config import LoRAConfig
from .lora import SUPPORTED_TYPES, LoRALinear, is_supported
from .wrappers import ModulesToSaveWrapper

__all__ = ["walk", "replace_module", "find_modules", "checked_plan", "linear_suffixes", "HEAD_NAMES"]

HEAD_NAMES = ("classifier", "score", "lm_head")  # excluded from "all-linear"
_WRAPPERS = (LoRALinear, ModulesToSaveWrapper)


def walk(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Like ``named_modules`` but does not descend into peftlab wrappers (skips the root)."""
    for child_name, child in model.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        yield name, child
        if not isinstance(child, _WRAPPERS):
            yield from walk(child, name)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new)


def _suffix_match(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def _head_names(model: nn.Module) -> set[str]:
    """Dotted names of output-head modules (never adapted by "all-linear")."""
    out = {n for n, _ in walk(model) if any(_suffix_match(n, h) or f".{h}." in f".{n}." for h in HEAD_NAMES)}
    get_out = getattr(model, "get_output_embeddings", None)
    emb = get_out() if callable(get_out) else None
    if emb is not None:
        out |= {n for n, m in walk(model) if m is emb or getattr(m, "base_layer", None) is emb}
    return out


@dataclass
class _Plan:
    targets: list[tuple[str, nn.Module, str]]  # (name, module, why it matched)
    unsupported: list[tuple[str, nn.Module, str]]
    saves: list[tuple[str, nn.Module]]
    unmatched_saves: list[str]


def find_modules(model: nn.Module, config: LoRAConfig) -> _Plan:
    """Which modules ``config`` selects in ``model``; pure, changes nothing."""
    tm, saves, unmatched = config.target_modules, [], []
    for key in config.modules_to_save:
        hits = [(n, m) for n, m in walk(model) if _suffix_match(n, key)]
        saves += hits
        unmatched += [] if hits else [key]
    skip = {n for n, _ in saves}
    if tm == "all-linear":
        skip |= _head_names(model)
    targets, unsupported = [], []
    for name, mod in walk(model):
        if name in skip:
            continue
        if tm == "all-linear":
            why = "all-linear" if isinstance(mod, SUPPORTED_TYPES + (LoRALinear,)) else None
        elif isinstance(tm, str):
            why = f"regex {tm!r}" if re.fullmatch(tm, name) else None
        else:
            why = next((f"suffix {k!r}" for k in tm if _suffix_match(name, k)), None)
        if why is None:
            continue
        if isinstance(mod, LoRALinear) or is_supported(mod):
            targets.append((name, mod, why))
        else:
            unsupported.append((name, mod, why))
    return _Plan(targets, unsupported, saves, unmatched)


def linear_suffixes(model: nn.Module) -> str:
    counts: dict[str, int] = {}
    for n, m in walk(model):
        if is_supported(m) or isinstance(m, LoRALinear):
            leaf = n.rsplit(".", 1)[-1]
            counts[leaf] = counts.get(leaf, 0) + 1
    return ", ".join(f"{k} (x{v})" if v > 1 else k for k, v in counts.items()) or "none"


def checked_plan(model: nn.Module, config: LoRAConfig, name: str) -> _Plan:
    plan = find_modules(model, config)
    cls = type(model).__name__
    if plan.unsupported:
        n, m, why = plan.unsupported[0]
        kinds = ", ".join(t.__name__ for t in SUPPORTED_TYPES)
        raise ValueError(
            f"LoRAConfig.target_modules={config.target_modules!r} matches {n!r} ({why}), a {type(m).__name__}, "
            f"which LoRA cannot adapt: supported types are {kinds}. Target the linear layers inside it instead; "
            f"linear layers here: {linear_suffixes(model)}"
        )
    if not plan.targets:
        raise ValueError(
            f"LoRAConfig.target_modules={config.target_modules!r} matched no module of {cls}: "
            f"choose among its linear layers (by suffix): {linear_suffixes(model)}"
        )
    if plan.unmatched_saves:
        raise ValueError(
            f"LoRAConfig.modules_to_save entries {plan.unmatched_saves} match no module of {cls}: "
            f"use a module name such as 'classifier' or 'score' that exists in the model"
        )
    for n, m in plan.saves:
        if isinstance(m, LoRALinear):
            raise ValueError(f"modules_to_save entry {n!r} is already a LoRA layer: list it in only one place")
        if isinstance(m, ModulesToSaveWrapper) and name in m.modules_to_save:
            raise ValueError(f"{n!r} already holds a trainable copy for {name!r}")
    for n, m, _ in plan.targets:
        if isinstance(m, LoRALinear) and name in m.lora_A:
            raise ValueError(f"{n!r} already has a LoRA adapter named {name!r}")
    return plan
