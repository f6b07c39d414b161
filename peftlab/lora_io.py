"""LoRA adapters on disk, in HF peft's format, and LoRA's method record.

A LoRA adapter (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models", arXiv:2106.09685) is tiny next to its base model, so only the adapter
is written: ``adapter_config.json`` plus ``adapter_model.safetensors`` (and
peftlab's own record, see ``peftlab.io``).  The layout is the one HF peft uses, so
``peft.PeftModel.from_pretrained(base, dir)`` reads what ``save_adapter`` writes and
``load_adapter`` reads what peft writes:

* ``base_model.model.<module path>.lora_A.weight``  (r, in)
* ``base_model.model.<module path>.lora_B.weight``  (out, r)
* ``base_model.model.<module path>.lora_magnitude_vector``  (out,), DoRA's m (Liu et al. 2024,
  arXiv:2402.09353); peft's file key has no ``.weight``, unlike its in-memory name
* ``base_model.model.<module path>.<param>`` for each ``modules_to_save`` copy
  (peft drops the ``modules_to_save.<name>`` part when saving)
* ``base_model.model.<module path>.base_layer.bias`` etc. when biases are trained.

HF peft adapters whose ``init_lora_weights`` rewrote the base weights (PiSSA, OLoRA,
CorDA, LoRA-GA, LoftQ) are refused, with how to convert them; ``exclude_modules`` is
honoured. Explained in notebooks/03_lora.ipynb.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from torch import nn

from .config import LoRAConfig
from .inject import inject
from .io import (CONFIG_NAME, FORMAT_VERSION, PEFT_PREFIX as PREFIX, fmt_list as _fmt, peft_task_type,
                 read_adapter_config)
from .lora import LoRALinear, linear_shape
from .lora_inject import delete_lora, explain_lora, inject_lora, mark_lora_trainable, merge_lora, owns_lora, unload_lora
from .registry import MethodHooks, configs
from .targets import base_parameters, checked_plan, find_modules, walk
from .wrappers import saved_copies, saved_shapes

__all__ = ["HOOKS", "lora_state_dict", "save_lora", "load_lora"]


def _bias_all_names(model: nn.Module, exclude: list[str], targets: list[str]) -> list[tuple[str, str]]:
    """(current name, name after injection) of every bias trained by bias="all"."""
    out = []
    for n, _ in base_parameters(model):
        if not n.endswith("bias") or "lora_" in n or ".original_module." in n or ".modules_to_save." in n:
            continue
        owner = n.rsplit(".", 1)[0] if "." in n else ""
        if any(owner == e or owner.startswith(e + ".") for e in exclude):
            continue
        out.append((n, f"{owner}.base_layer.bias" if owner in targets else n))
    return out


def lora_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """LoRA adapter ``name``'s tensors under peft's checkpoint keys (live tensors, not copies)."""
    config = configs(model)[name]
    out: dict[str, torch.Tensor] = {}
    for path, mod in walk(model):
        if isinstance(mod, LoRALinear) and name in mod.lora_A:
            out[f"{PREFIX}{path}.lora_A.weight"] = mod.lora_A[name].weight
            out[f"{PREFIX}{path}.lora_B.weight"] = mod.lora_B[name].weight
            if name in mod.lora_magnitude_vector:
                out[f"{PREFIX}{path}.lora_magnitude_vector"] = mod.lora_magnitude_vector[name].weight
            if config.bias == "lora_only" and mod.base_layer.bias is not None:
                out[f"{PREFIX}{path}.base_layer.bias"] = mod.base_layer.bias
    out.update(saved_copies(model, name, prefix=PREFIX))  # peft drops "modules_to_save.<name>" from the key
    if config.bias == "all":
        params = dict(model.named_parameters())
        for n, _ in _bias_all_names(model, [], []):
            out[PREFIX + n] = params[n]
    return out



def _peft_config(model: nn.Module, config: LoRAConfig, name: str) -> dict:
    lora_layers = [(p, m) for p, m in walk(model) if isinstance(m, LoRALinear) and name in m.lora_A]
    targets = config.target_modules
    if targets == "all-linear":  # peft's "all-linear" excludes slightly different heads: be explicit
        targets = [p for p, _ in lora_layers]
    return {
        "peft_type": "LORA",
        "task_type": peft_task_type(model, config.modules_to_save),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "name_or_path", None) or None,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets if isinstance(targets, str) else list(targets),
        "modules_to_save": list(config.modules_to_save) or None,
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "fan_in_fan_out": any(m.fan_in_fan_out for _, m in lora_layers),
        "init_lora_weights": True if config.init == "kaiming" else config.init,
        "inference_mode": True,
        "peftlab": {"format_version": FORMAT_VERSION, "adapter_name": name, "config": config.to_dict()},
    }


def save_lora(model: nn.Module, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(live tensors under peft's keys, peft's adapter_config.json with peftlab's record)."""
    return lora_state_dict(model, name), _peft_config(model, configs(model)[name], name)


# HF peft initialisations that also rewrite the base layer's weight when the adapter is created:
# PiSSA, OLoRA, CorDA and LoRA-GA subtract the initial update (W <- W - scale * B0 A0), LoftQ
# replaces W by a quantised approximation. Their A and B only fit that modified base, so loaded
# onto the original weights they give wrong outputs. Matched as prefixes ("pissa_niter_16"), as peft does.
_BASE_REWRITING_INITS = {"pissa": "PiSSA", "olora": "OLoRA", "corda": "CorDA", "lora_ga": "LoRA-GA",
                         "loftq": "LoftQ"}
# initialisations that only set lora_A / lora_B (which the saved tensors overwrite) and leave W alone
_PLAIN_INITS = {"gaussian", "eva", "orthogonal", "mica"}


def _check_init(path: Path, init) -> None:
    """Refuse an adapter whose ``init_lora_weights`` changed the base weights, or is unknown."""
    if init is None or isinstance(init, bool) or (isinstance(init, str) and init.lower() in _PLAIN_INITS):
        return
    where = f"{path}: init_lora_weights={init!r}"
    method = next((v for k, v in _BASE_REWRITING_INITS.items() if isinstance(init, str) and init.lower().startswith(k)),
                  None)
    if method == "LoftQ":
        raise ValueError(
            f"{where} (LoftQ) replaced the base model's weights by a quantised approximation when the adapter was "
            "created, so the adapter only fits that modified base, and peft has no conversion to a plain LoRA: load "
            "it with peft onto the LoftQ-initialised base, or merge it there (peft's merge_and_unload()) and save the "
            "full model")
    if method is not None:
        raise ValueError(
            f"{where} ({method}) rewrote the base model's weights when the adapter was created (W - scale * B0 A0 for "
            "the initial B0, A0), so the adapter only gives the right outputs on that modified base, while peftlab "
            "loads LoRA adapters onto the original base weights. Convert it with peft into a plain LoRA adapter "
            "(rank 2r) that needs no base change: peft_model.save_pretrained(out_dir, "
            "path_initial_model_for_weight_conversion=<the adapter saved right after initialisation, before "
            "training>), then load out_dir")
    raise ValueError(
        f"{where} is an initialisation peftlab does not know. Some (PiSSA, OLoRA, LoftQ...) rewrite the base weights, "
        "and such an adapter gives wrong outputs on the original base; if this one only initialises lora_A / lora_B, "
        "set init_lora_weights to true in adapter_config.json to load it")


# peft LoraConfig fields that change what the adapter computes, which peftlab does not implement:
# loading such a file as plain LoRA would give wrong outputs, so a set (truthy) one is refused
_UNSUPPORTED_PEFT_KEYS = ("rank_pattern", "alpha_pattern", "layers_to_transform", "lora_bias",
                          "trainable_token_indices", "target_parameters", "layer_replication", "use_qalora",
                          "alora_invocation_tokens", "megatron_config", "arrow_config")


def _read_config(d: Path) -> tuple[LoRAConfig, bool, str | list[str] | None]:
    """Parse the adapter's JSON -> (config, written_by_peftlab, peft's exclude_modules)."""
    path = d / CONFIG_NAME
    raw = read_adapter_config(d)
    _check_init(path, raw.get("init_lora_weights", True))
    if isinstance(raw.get("peftlab"), dict) and "config" in raw["peftlab"]:
        return LoRAConfig.from_dict(raw["peftlab"]["config"]), True, None
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {raw.get('peft_type')!r}, but only 'LORA' adapters can be loaded here")
    unsupported = [k for k in _UNSUPPORTED_PEFT_KEYS if raw.get(k)]
    if unsupported:
        raise ValueError(f"{path} uses peft features peftlab does not implement: {unsupported}")
    init = raw.get("init_lora_weights", True)
    targets = raw.get("target_modules")
    config = LoRAConfig(
        r=raw.get("r", 8),
        alpha=raw.get("lora_alpha", 8),
        dropout=raw.get("lora_dropout", 0.0),
        target_modules=targets if isinstance(targets, str) else tuple(sorted(targets or ())),
        modules_to_save=tuple(raw.get("modules_to_save") or ()),
        bias=raw.get("bias", "none"),
        use_rslora=bool(raw.get("use_rslora", False)),
        use_dora=bool(raw.get("use_dora", False)),
        init="gaussian" if init == "gaussian" else "kaiming",
    )
    exclude = raw.get("exclude_modules") or None
    if exclude is not None and not (isinstance(exclude, str) or (
            isinstance(exclude, list) and all(isinstance(e, str) for e in exclude))):
        raise ValueError(f"{path}: exclude_modules must be a regex string or a list of module names, got {exclude!r}")
    return config, False, exclude


def _is_excluded(name: str, exclude: str | list[str]) -> bool:
    """HF peft's rule (``check_target_module_exists``): a string is a full-match regex on the
    module's dotted name, a list excludes a name that equals an entry or ends with "." + entry."""
    if isinstance(exclude, str):
        return re.fullmatch(exclude, name) is not None
    return any(name == e or name.endswith("." + e) for e in exclude)


def _without_excluded(model: nn.Module, config: LoRAConfig, exclude: str | list[str], path: Path) -> LoRAConfig:
    """``config`` with target_modules spelled out as the selected modules minus peft's exclude_modules."""
    plan = find_modules(model, config)
    selected = [n for n, _, _ in plan.targets + plan.unsupported]  # unsupported ones still raise in checked_plan
    kept = tuple(n for n in selected if not _is_excluded(n, exclude))
    if selected and not kept:
        raise ValueError(f"{path}: exclude_modules={exclude!r} excludes every module target_modules="
                         f"{config.target_modules!r} selects in this {type(model).__name__}, so the adapter adapts "
                         "nothing here: load it onto the base model it was trained on")
    return dataclasses.replace(config, target_modules=kept) if selected else config


def _expected_lora_keys(model: nn.Module, config: LoRAConfig, name: str) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """Checkpoint keys the adapter must provide and optional (bias) keys, each with its shape."""
    plan = checked_plan(model, config, name)
    required: dict[str, tuple] = {}
    optional: dict[str, tuple] = {}
    for path, mod, _ in plan.targets:
        base = mod.base_layer if isinstance(mod, LoRALinear) else mod
        fan_in, fan_out, _ = linear_shape(base)
        required[f"{PREFIX}{path}.lora_A.weight"] = (config.r, fan_in)
        required[f"{PREFIX}{path}.lora_B.weight"] = (fan_out, config.r)
        if config.use_dora:
            required[f"{PREFIX}{path}.lora_magnitude_vector"] = (fan_out,)
        if config.bias == "lora_only" and base.bias is not None:
            optional[f"{PREFIX}{path}.base_layer.bias"] = tuple(base.bias.shape)
    required.update(saved_shapes(plan.saves, prefix=PREFIX))
    if config.bias == "all":
        params = dict(model.named_parameters())
        saves = [p for p, _ in plan.saves]
        for now, later in _bias_all_names(model, saves, [p for p, _, _ in plan.targets]):
            optional[PREFIX + later] = tuple(params[now].shape)
    return required, optional


def load_lora(model: nn.Module, d: Path, name: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Check a LoRA folder (config and already-read ``tensors``) against ``model``, then inject and copy."""
    config, ours, exclude = _read_config(d)
    if not ours and config.modules_to_save:  # peft lists heads (e.g. "score") that may not exist in this model
        present = tuple(k for k in config.modules_to_save if k not in find_modules(model, config).unmatched_saves)
        config = dataclasses.replace(config, modules_to_save=present)
    if exclude is not None:
        config = _without_excluded(model, config, exclude, d / CONFIG_NAME)
    if name in configs(model):
        raise ValueError(f"an adapter named {name!r} is already injected: load under another name or delete it first")
    try:
        required, optional = _expected_lora_keys(model, config, name)
    except ValueError as exc:
        raise ValueError(f"adapter in {d} does not fit this {type(model).__name__} (wrong base model?): {exc}") from exc
    if config.bias == "all":  # peft also writes the bias of the frozen original / copy under wrapper paths;
        # the copy's bias is already present as "<path>.bias", so these duplicates are dropped
        tensors = {k: v for k, v in tensors.items()
                   if not (k.endswith("bias") and (".original_module." in k or ".modules_to_save." in k))}
    missing = [k for k in required if k not in tensors]
    unexpected = [k for k in tensors if k not in required and k not in optional]
    shapes = {**required, **optional}
    wrong = [f"{k}: file {tuple(v.shape)} vs model {shapes[k]}" for k, v in tensors.items()
             if k in shapes and tuple(v.shape) != shapes[k]]
    if missing or unexpected or wrong:
        parts = [f"shape mismatch: {_fmt(wrong)}" if wrong else "", f"missing keys: {_fmt(missing)}" if missing else "",
                 f"unexpected keys: {_fmt(unexpected)}" if unexpected else ""]
        raise ValueError(
            f"adapter in {d} does not fit this {type(model).__name__} -- " + " | ".join(p for p in parts if p)
            + ": load it onto the base model it was trained on"
        )
    inject(model, config, name)
    live = lora_state_dict(model, name)
    with torch.no_grad():
        for k, v in tensors.items():
            live[k].copy_(v)
    return model


HOOKS = MethodHooks(method="lora", config=LoRAConfig, inject=inject_lora, mark_trainable=mark_lora_trainable,
                    delete=delete_lora, save=save_lora, load=load_lora, owns=owns_lora, merge=merge_lora,
                    unload=unload_lora, explain=explain_lora, peft_type="LORA")
