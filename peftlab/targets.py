"""Finding the modules an adapter config selects (pure: nothing is changed).

Matching rules for LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models") target modules, as explained in notebooks/03_lora.ipynb:

* a list of names matches a module whose dotted name equals the entry or ends
  with ``"." + entry`` ("query" matches ``bert.encoder.layer.0.attention.self.query``);
* a single string is a full-match regular expression on the dotted name;
* ``"all-linear"`` takes every ``nn.Linear`` / GPT-2 ``Conv1D`` except the output
  head (``classifier``, ``score``, ``lm_head``, ``get_output_embeddings()``).

Modules inside a ``modules_to_save`` module are never targeted (as in HF peft): the
saved module is replaced by a fully trained copy, so a LoRA inside it would never
run.  :func:`checked_plan` refuses a config whose target entry only matches such
enclosed modules, and a saved module that already holds another adapter's layers.

The module-tree helpers (``walk``, ``replace_module``, ``base_parameters``) live in
``peftlab.tree`` and are re-exported here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .config import LoRAConfig
from .lora import SUPPORTED_TYPES, LoRALinear, is_supported
from .tree import ADDED, AdapterLayer, base_parameters, flag_new_modules, replace_module, walk
from .wrappers import ModulesToSaveWrapper

__all__ = ["walk", "replace_module", "find_modules", "checked_plan", "linear_suffixes", "HEAD_NAMES",
           "flag_new_modules", "base_parameters", "ADDED"]

HEAD_NAMES = ("classifier", "score", "lm_head")  # excluded from "all-linear"


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
    # matches skipped because they lie inside (or are) a modules_to_save module: (name, saved module's name)
    enclosed: list[tuple[str, str]] = field(default_factory=list)
    # target_modules entries whose every match is enclosed (checked_plan refuses these; never "all-linear")
    enclosed_only: list[str] = field(default_factory=list)


def _enclosing(name: str, saved: list[str]) -> str | None:
    """The saved module ``name`` is, or lies inside, if any."""
    return next((s for s in saved if name == s or name.startswith(s + ".")), None)


def find_modules(model: nn.Module, config: LoRAConfig) -> _Plan:
    """Which modules ``config`` selects in ``model``; pure, changes nothing."""
    tm, saves, unmatched = config.target_modules, [], []
    for key in config.modules_to_save:
        hits = [(n, m) for n, m in walk(model) if _suffix_match(n, key)]
        saves += hits
        unmatched += [] if hits else [key]
    saved = [n for n, _ in saves]
    heads = _head_names(model) if tm == "all-linear" else set()
    targets, unsupported, enclosed = [], [], []
    entries_hit: set[str] = set()  # target entries matching at least one module outside the saved ones
    entries_enclosed: list[str] = []  # target entries matching a module inside a saved one
    for name, mod in walk(model):
        if name in heads:
            continue
        if tm == "all-linear":
            keys = ["all-linear"] if isinstance(mod, SUPPORTED_TYPES + (LoRALinear,)) else []
            why = "all-linear"
        elif isinstance(tm, str):
            keys = [tm] if re.fullmatch(tm, name) else []
            why = f"regex {tm!r}"
        else:
            keys = [k for k in tm if _suffix_match(name, k)]
            why = f"suffix {keys[0]!r}" if keys else ""
        if not keys:
            continue
        around = _enclosing(name, saved)
        if around is not None:  # replaced by a trained copy: a LoRA here would never run (HF peft skips too)
            enclosed.append((name, around))
            entries_enclosed += keys
            continue
        entries_hit.update(keys)
        if isinstance(mod, LoRALinear) or is_supported(mod):
            targets.append((name, mod, why))
        else:
            unsupported.append((name, mod, why))
    enclosed_only = [k for k in dict.fromkeys(entries_enclosed) if k not in entries_hit and k != "all-linear"]
    return _Plan(targets, unsupported, saves, unmatched, enclosed, enclosed_only)


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
    if plan.enclosed_only:
        keys = [k for k in config.modules_to_save if any(_suffix_match(s, k) for _, s in plan.enclosed)]
        inner, around = next((n, s) for n, s in plan.enclosed)
        raise ValueError(
            f"LoRAConfig.target_modules entries {plan.enclosed_only} only match modules inside modules_to_save "
            f"{keys} (e.g. {inner!r} inside {around!r}): a saved module is replaced by a fully trained copy, so a "
            f"LoRA inside it would never run. Either remove {plan.enclosed_only} from target_modules, or remove "
            f"{keys} from modules_to_save (save a smaller module, e.g. the head)"
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
        inner = [] if isinstance(m, AdapterLayer) else [
            (p, mod) for p, mod in walk(m, n) if isinstance(mod, AdapterLayer) or mod.__dict__.get(ADDED)]
        if inner:  # its copy would duplicate those layers where no delete/merge/save can reach them
            owners = sorted({a for _, mod in inner for a in _adapter_names(mod)})
            key = next(k for k in config.modules_to_save if _suffix_match(n, k))
            raise ValueError(
                f"modules_to_save entry {key!r} matches {n!r}, which already holds adapter layers "
                f"({inner[0][0]!r}{f' of adapter(s) {owners}' if owners else ''}): its trainable copy would "
                f"duplicate them. Save a module without adapter layers (e.g. the head), or peftlab.delete() "
                f"those adapters first"
            )
        if isinstance(m, LoRALinear):
            raise ValueError(f"modules_to_save entry {n!r} is already a LoRA layer: list it in only one place")
        if isinstance(m, ModulesToSaveWrapper) and name in m.modules_to_save:
            raise ValueError(f"{n!r} already holds a trainable copy for {name!r}")
    for n, m, _ in plan.targets:
        if isinstance(m, LoRALinear) and name in m.lora_A:
            raise ValueError(f"{n!r} already has a LoRA adapter named {name!r}")
    return plan


def _adapter_names(mod: nn.Module) -> list[str]:
    """Names of the adapters an adapter layer holds (none known for other added modules)."""
    return mod.adapter_names if isinstance(mod, AdapterLayer) else []
