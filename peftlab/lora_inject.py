"""LoRA's hooks: put :class:`peftlab.lora.LoRALinear` layers in, train, merge and delete them.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685);
DoRA (``use_dora``): Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation" (arXiv:2402.09353).
``peftlab.targets`` decides which modules a :class:`peftlab.config.LoRAConfig` selects (and
refuses impossible configs before anything changes); these functions carry the plan out.
They are called through LoRA's record (``peftlab.lora_io.HOOKS``) by the generic
``peftlab.inject`` functions, exactly like every other method's hooks.
Explained in notebooks/03_lora.ipynb.
"""

from __future__ import annotations

from torch import nn

from .config import LoRAConfig
from .inject import ExplainReport, ExplainRow
from .lora import LoRALinear, linear_shape
from .quant import Linear4bit
from .targets import base_parameters, checked_plan, find_modules, linear_suffixes, replace_module, walk
from .wrappers import ModulesToSaveWrapper, add_saves, delete_saves, mark_saves

__all__ = ["inject_lora", "mark_lora_trainable", "delete_lora", "merge_lora", "explain_lora", "owns_lora"]


def owns_lora(parameter_name: str) -> bool:
    """Every LoRA parameter's name contains ``lora_`` (``lora_A`` / ``lora_B`` / DoRA's ``lora_magnitude_vector``)."""
    return "lora_" in parameter_name


def inject_lora(model: nn.Module, config: LoRAConfig, name: str) -> None:
    plan = checked_plan(model, config, name)  # every check happens before the first change
    for mod_name, mod, _ in plan.targets:
        layer = mod if isinstance(mod, LoRALinear) else LoRALinear(mod)
        layer.add_adapter(name, config.r, config.alpha, config.dropout, config.use_rslora, config.init,
                          config.use_dora)
        if layer is not mod:
            replace_module(model, mod_name, layer)
    add_saves(model, config.modules_to_save, name, plan.saves)


def mark_lora_trainable(model: nn.Module, config: LoRAConfig, name: str) -> None:
    for _, mod in walk(model):
        if isinstance(mod, LoRALinear) and name in mod.lora_A:
            mod.lora_A[name].weight.requires_grad_(True)
            mod.lora_B[name].weight.requires_grad_(True)
            if name in mod.lora_magnitude_vector:
                mod.lora_magnitude_vector[name].weight.requires_grad_(True)
            if config.bias == "lora_only" and mod.base_layer.bias is not None:
                mod.base_layer.bias.requires_grad_(True)
    mark_saves(model, name)
    if config.bias == "all":  # the base model's biases only: never another adapter's (e.g. a prefix MLP's)
        for pname, p in base_parameters(model):
            if pname.endswith("bias") and ".original_module." not in pname and ".modules_to_save." not in pname:
                p.requires_grad_(True)


def delete_lora(model: nn.Module, name: str) -> None:
    for mod_name, mod in list(walk(model)):
        if isinstance(mod, LoRALinear) and name in mod.lora_A:
            mod.delete_adapter(name)
            if not mod.adapter_names:
                replace_module(model, mod_name, mod.base_layer)
    delete_saves(model, name)


def merge_lora(model: nn.Module, name: str) -> None:
    """Fold adapter ``name`` (the active one) into the base weights: W <- W + s * B A (DoRA: W <- W')."""
    layers = [m for _, m in walk(model) if isinstance(m, LoRALinear) and name in m.lora_A]
    if not layers:
        raise RuntimeError(f"adapter {name!r} has no LoRA layers in this model to merge")
    if any(m.merged for m in layers):
        raise RuntimeError("LoRA weights are already merged: calling merge() twice would add them twice")
    _refuse_4bit(layers)  # before the first layer changes: a refusal leaves the model as it was
    for m in layers:
        m.merge([name])


def _refuse_4bit(layers: list[LoRALinear]) -> None:
    four_bit = [m for m in layers if isinstance(m.base_layer, Linear4bit)]
    if four_bit:
        raise RuntimeError(f"{len(four_bit)} of the adapter's {len(layers)} LoRA layers sit on 4-bit (NF4) weights: "
                           "merging would round the update away; merge into a de-quantized copy instead: "
                           "m = copy.deepcopy(model); peftlab.quant.dequantize_model(m); peftlab.merge(m)")


def unload_lora(model: nn.Module, name: str) -> None:
    """LoRA folds into full-precision weights; on a 4-bit base ``unload`` is refused before anything changes."""
    _refuse_4bit([m for _, m in walk(model) if isinstance(m, LoRALinear) and name in m.lora_A])


def explain_lora(model: nn.Module, config: LoRAConfig) -> ExplainReport:
    """Which modules ``config`` would adapt or copy, why, and the parameters each adds (pure)."""
    plan = find_modules(model, config)
    rows = []
    for n, m, why in plan.targets:
        base = m.base_layer if isinstance(m, LoRALinear) else m
        fan_in, fan_out, _ = linear_shape(base)
        rows.append(ExplainRow(n, "lora", type(base).__name__, why, f"{fan_in} -> {fan_out}",
                               config.r * (fan_in + fan_out) + (fan_out if config.use_dora else 0)))
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
                     if not owns_lora(n) and ".modules_to_save." not in n)
    return ExplainReport(config, rows, base_total, notes)
