"""Regression tests for injection bugs: saved-module targets, bias="all", freezing, eval mode, bf16 merges.

Each test failed before its fix (see the bug number in its docstring).
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from lora_helpers import assert_unchanged, clone, ids, out, randomize_lora_b, snapshot, tiny
from safetensors.torch import load_file

from peftlab.config import AdapterConfig, LoRAConfig, PrefixConfig
from peftlab.inject import delete, explain, inject, merge, set_active, unload, unmerge
from peftlab.io import adapter_state_dict, load_adapter, save_adapter
from peftlab.lora import LoRALinear
from peftlab.targets import find_modules
from peftlab.wrappers import ModulesToSaveWrapper


def _trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# -- bug 3: LoRA targets inside modules_to_save ------------------------------------------------
def test_targets_inside_saved_module_are_skipped_and_peft_loads_the_file(tmp_path):
    """Bug 3: RoBERTa's classifier.dense was wrapped, then copied; the LoRA never ran and peft refused the file."""
    base, x = tiny("roberta"), ids()
    cfg = LoRAConfig(r=4, alpha=8, target_modules=("query", "value", "dense"), modules_to_save=("classifier",))
    planned = [n for n, _, _ in find_modules(base, cfg).targets]
    assert "classifier.dense" not in planned
    assert "roberta.encoder.layer.0.intermediate.dense" in planned and "classifier" not in planned
    model = inject(clone(base), cfg)
    assert isinstance(model.classifier, ModulesToSaveWrapper)
    assert not any(isinstance(m, LoRALinear) for m in model.classifier.modules())  # neither original nor copy
    assert not any("classifier" in n and "lora_" in n for n in _trainable(model))
    randomize_lora_b(model)
    with torch.no_grad():
        for p in model.classifier.modules_to_save["default"].parameters():
            p.add_(0.25)
    report = explain(clone(base), cfg)
    assert ("classifier.dense", "lora") not in [(r.module, r.kind) for r in report.rows]
    assert ("classifier", "modules_to_save") in [(r.module, r.kind) for r in report.rows]
    assert any("skipped inside modules_to_save" in n and "classifier.dense" in n for n in report.notes)
    save_adapter(model, tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(clone(base), tmp_path / "a").eval()
    assert (out(model, x) - out(base, x)).abs().max() > 1e-3  # the adapter and the head copy do something
    assert (out(pm, x) - out(model, x)).abs().max() <= 1e-5
    back = load_adapter(clone(base), tmp_path / "a")
    assert torch.equal(out(back, x), out(model, x))


def test_peft_adapter_with_targets_inside_the_head_loads(tmp_path):
    """Bug 3, the other way: peft skips classifier.dense too, so its file fits peftlab's plan."""
    base, x = tiny("roberta"), ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(clone(base), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["query", "value", "dense"], modules_to_save=["classifier"],
            task_type="SEQ_CLS")).eval()
    randomize_lora_b(pm)
    pm.save_pretrained(tmp_path / "p")
    ours = load_adapter(clone(base), tmp_path / "p")
    assert (out(ours, x) - out(pm, x)).abs().max() <= 1e-5
    assert (out(ours, x) - out(base, x)).abs().max() > 1e-4


@pytest.mark.parametrize(
    "targets, saves, words",
    [
        (("query", "value"), ("attention",),
         ["'query'", "'value'", "modules_to_save", "'attention'", "roberta.encoder.layer.0.attention"]),
        (("query", "value", "dense"), ("attention",), ["'query'", "'value'", "'attention'"]),
        (r".*self\.query", ("attention",), [r"'.*self\\.query'", "'attention'"]),
    ],
)
def test_saved_module_enclosing_every_match_of_a_target_is_refused(targets, saves, words):
    """Bug 3: a LoRA inside a fully trained copy can never run; refuse, name the modules, model unchanged."""
    model = tiny("roberta")
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        inject(model, LoRAConfig(r=2, target_modules=targets, modules_to_save=saves))
    assert_unchanged(model, before)
    for w in words:
        assert w in str(info.value), str(info.value)
    assert "remove" in str(info.value)  # says how to fix it


def test_saving_a_module_that_holds_another_adapters_layers_is_refused():
    """Bug 3: copying attention would duplicate adapter 'first''s LoRA layers inside the copy."""
    model = tiny("bert")
    inject(model, LoRAConfig(r=2, target_modules=("value",)), name="first")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'attention'.*'first'.*delete") as info:
        inject(model, LoRAConfig(r=2, target_modules=("dense",), modules_to_save=("attention",)), name="second")
    assert "bert.encoder.layer.0.attention.self.value" in str(info.value)
    assert_unchanged(model, before)


# -- bug 4: bias="all" restricted to the base model's own parameters ------------------------------
def _other_method(kind: str):
    if kind == "prefix":  # its MLP has biases: prefix_tuning.<name>.prefix_mlp.{0,2}.bias
        return PrefixConfig(num_virtual_tokens=3, projection_hidden=8, init="vocab", modules_to_save=("classifier",))
    return AdapterConfig(bottleneck=4, modules_to_save=("classifier",))


@pytest.mark.parametrize("kind", ["prefix", "adapter"])
def test_bias_all_trains_and_saves_only_base_model_biases(tmp_path, kind):
    """Bug 4: bias="all" trained and saved another method's biases, so the file did not load into a plain model."""
    base, x = tiny("bert"), ids()
    model = clone(base)
    inject(model, _other_method(kind), name="other")
    other = _trainable(model)  # the other adapter's parameters (and its head copy)
    inject(model, LoRAConfig(r=2, bias="all"), name="lora")
    trainable = _trainable(model)
    assert not trainable & other
    assert not [n for n in trainable if "prefix_" in n or "adapter_" in n or ".modules_to_save." in n]
    plain_biases = {n for n, _ in base.named_parameters() if n.endswith("bias") and not n.startswith("classifier")}
    lora_biases = {n.replace(".base_layer.", ".") for n in trainable if n.endswith("bias")}
    assert lora_biases == plain_biases  # every bias of the base model, the head (wrapped by "other") aside
    randomize_lora_b(model, name="lora")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and n.endswith("bias"):
                p.add_(0.1)
    keys = set(adapter_state_dict(model, "lora"))
    assert not [k for k in keys if "prefix_" in k or "adapter_" in k or "modules_to_save" in k]
    save_adapter(model, tmp_path / "lora", name="lora")
    assert set(load_file(tmp_path / "lora" / "adapter_model.safetensors")) == keys
    fresh = load_adapter(clone(base), tmp_path / "lora")
    set_active(model, "lora")  # the other adapter off: base + LoRA + trained biases
    # (prefix-tuning swaps in its own attention function: equal up to float rounding)
    assert (out(fresh, x) - out(model, x)).abs().max() <= 1e-5
    assert (out(fresh, x) - out(base, x)).abs().max() > 1e-3


# -- bug 6: freezing follows the active adapter; unload() never silently discards ----------------
def test_set_active_none_and_delete_leave_nothing_trainable():
    """Bug 6: after set_active(None) or delete() parameters stayed trainable."""
    model = tiny("bert")
    inject(model, LoRAConfig(r=2, modules_to_save=("classifier",), bias="all"), name="a")
    inject(model, LoRAConfig(r=2, target_modules=("key",)), name="b")
    set_active(model, None)
    assert _trainable(model) == set()
    set_active(model, "a")
    trainable_a = _trainable(model)
    assert trainable_a and all("lora_A.b" not in n for n in trainable_a)
    delete(model, "b")  # an inactive adapter: "a" stays the only trainable one (key's base_layer is unwrapped)
    assert _trainable(model) == {n.replace("key.base_layer.", "key.") for n in trainable_a}
    delete(model, "a")  # the active one: nothing left to train
    assert _trainable(model) == set()
    inject(model, LoRAConfig(r=2), name="c")
    set_active(model, "c")
    delete(model, "c")
    assert _trainable(model) == set()


def test_unload_without_active_adapter_refuses_unless_told():
    """Bug 6: unload() with no active adapter silently threw every trained LoRA weight away."""
    base, x = tiny("bert"), ids()
    model = inject(clone(base), LoRAConfig(r=4, modules_to_save=("classifier",)), name="a")
    randomize_lora_b(model)
    with torch.no_grad():
        model.classifier.modules_to_save["a"].weight.add_(0.5)
    adapted = out(model, x)
    set_active(model, None)
    before = snapshot(model)
    with pytest.raises(RuntimeError) as info:
        unload(model)
    assert_unchanged(model, before)
    for w in ("['a']", "set_active", "unload(model, name=", "delete", "discard=True"):
        assert w in str(info.value), str(info.value)
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        unload(model, name="zz")
    assert_unchanged(model, before)
    folded = unload(clone(model), name="a")  # fold a named adapter
    assert not any(isinstance(m, (LoRALinear, ModulesToSaveWrapper)) for m in folded.modules())
    assert (out(folded, x) - adapted).abs().max() <= 1e-5
    plain = unload(model, discard=True)  # explicitly thrown away: the base model
    assert set(plain.state_dict()) == set(base.state_dict())
    assert torch.equal(out(plain, x), out(base, x))


# -- bug 11: new modules follow the model's training flag -----------------------------------------
@pytest.mark.parametrize("how", ["inject", "load_adapter"])
def test_new_modules_follow_eval_mode(tmp_path, how):
    """Bug 11: LoRA dropout injected into an eval-mode model stayed in train mode: forwards differed."""
    x = ids()
    model = tiny("bert")  # eval mode
    if how == "inject":
        inject(model, LoRAConfig(r=4, dropout=0.5))
        randomize_lora_b(model)
    else:
        trained = inject(tiny("bert"), LoRAConfig(r=4, dropout=0.5))
        randomize_lora_b(trained)
        save_adapter(trained, tmp_path / "a")
        load_adapter(model, tmp_path / "a")
    assert not any(m.training for m in model.modules())
    assert torch.equal(out(model, x), out(model, x))
    model.train()
    inject(model, LoRAConfig(r=2, dropout=0.5), name="second")  # a training model gets training modules
    assert all(m.training for m in model.modules())


# -- bug 14: half-precision merge/unmerge is exact --------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_merge_unmerge_cycles_restore_base_exactly(dtype):
    """Bug 14: ten bf16 merge/unmerge cycles changed about half the base weights' entries."""
    model, x = tiny("llama").to(dtype), ids()
    inject(model, LoRAConfig(r=4, target_modules=("q_proj", "v_proj")))
    randomize_lora_b(model)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = out(model, x)
    for _ in range(10):
        merge(model)
        assert set(model.state_dict()) == set(start)  # the kept original is not saved with the model
        unmerge(model)
    state = model.state_dict()
    assert all(torch.equal(state[k], start[k]) for k in start)
    assert torch.equal(out(model, x), unmerged)
    merge(model)
    merged = out(model, x)
    assert (merged.float() - unmerged.float()).abs().max() <= 0.1 * unmerged.float().abs().max()
    assert any(not torch.equal(model.state_dict()[k], start[k]) for k in start)  # merging changed weights


def test_layer_unmerge_restores_after_several_merges_and_moves_with_the_layer():
    """Bug 14: the kept original follows .to() and survives merging two adapters one after the other."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(16, 8).to(torch.bfloat16))
    for n in ("a", "b"):
        layer.add_adapter(n, r=2, alpha=4)
        torch.nn.init.normal_(layer.lora_B[n].weight)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge(["a"])
    layer.merge(["b"])
    layer.to(torch.float32)  # the kept copy is cast with the layer
    layer.unmerge()
    assert layer.base_layer.weight.dtype == torch.float32
    assert torch.equal(layer.base_layer.weight, w0.float())


# -- adapter names that torch's nn.ModuleDict cannot hold as keys -------------------------------
@pytest.mark.parametrize("kind", ["lora", "prefix", "adapter"])
@pytest.mark.parametrize("name", ["double", "forward", "keys", "training"])
def test_module_attribute_names_are_refused_before_any_change(kind, name):
    """An adapter named like an nn.Module attribute made add_module raise after some layers were wrapped."""
    model = tiny("bert")
    config = (LoRAConfig(r=4, alpha=8, target_modules=("query", "value"), modules_to_save=("classifier",))
              if kind == "lora" else _other_method(kind))
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"{name!r} is an attribute of torch's nn.ModuleDict.*pick another name"):
        inject(model, config, name=name)
    assert_unchanged(model, before)
    inject(model, config, name=f"{name}_adapter")  # the suggested name works
    assert f"{name}_adapter" in model.peftlab_configs


def test_the_base_rows_name_of_mixed_batches_is_reserved():
    from peftlab import serving

    model = tiny("bert")
    before = snapshot(model)
    with pytest.raises(ValueError, match="'__base__' is reserved"):
        inject(model, LoRAConfig(r=4, alpha=8, target_modules=("query",)), name=serving.BASE)
    assert_unchanged(model, before)
