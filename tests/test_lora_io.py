"""Saving and loading adapters: peft's format both ways, exact round trips, clean failures."""

from __future__ import annotations

import json
import os
import warnings

import peft
import pytest
import torch
from lora_helpers import assert_unchanged, clone, ids, out, randomize_lora_b, snapshot, targets, tiny
from safetensors.torch import load_file, save_file

import peftlab.io as pio
from peftlab.config import LoRAConfig
from peftlab.inject import inject
from peftlab.io import adapter_state_dict, load_adapter, save_adapter


def _adapted(kind="bert", **kw):
    base = tiny(kind)
    cfg = dict(r=4, alpha=8, target_modules=targets(kind))
    cfg.update(kw)
    model = inject(clone(base), LoRAConfig(**cfg))
    randomize_lora_b(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".modules_to_save." in n:
                p.add_(0.25)
    return base, model


def test_roundtrip_is_exact(tmp_path):
    base, model = _adapted(modules_to_save=("classifier",), bias="lora_only")
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.base_layer.bias.add_(0.5)
    x = ids()
    path = save_adapter(model, tmp_path / "adapter")
    assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors", "peftlab_adapter.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp dirs left behind
    fresh = load_adapter(clone(base), path)
    ours, theirs = adapter_state_dict(model), adapter_state_dict(fresh)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(out(fresh, x), out(model, x))
    assert fresh.peftlab_configs["default"] == model.peftlab_configs["default"]


def test_file_holds_only_adapter_tensors(tmp_path):
    base, model = _adapted(modules_to_save=("classifier",))
    path = save_adapter(model, tmp_path / "a")
    tensors = load_file(path / "adapter_model.safetensors")
    expected = {f"base_model.model.bert.encoder.layer.{i}.attention.self.{t}.lora_{m}.weight"
                for i in range(2) for t in ("query", "value") for m in "AB"}
    expected |= {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    assert set(tensors) == expected
    n_values = sum(v.numel() for v in tensors.values())
    assert n_values == 8 * 4 * 32 + 66
    assert os.path.getsize(path / "adapter_model.safetensors") < 4 * n_values + 4096  # fp32 + small header
    meta = json.loads((path / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["task_type"] == "SEQ_CLS" and meta["r"] == 4
    assert meta["lora_alpha"] == 8 and meta["target_modules"] == ["query", "value"]
    assert meta["modules_to_save"] == ["classifier"] and "peftlab" not in meta  # peft warns on unknown keys
    ours = json.loads((path / "peftlab_adapter.json").read_text())
    assert ours["config"]["method"] == "lora" and ours["adapter_name"] == "default"


@pytest.mark.parametrize("kind, mts", [("bert", ("classifier",)), ("gpt2", ()), ("llama", ()), ("distilbert", ())])
def test_peft_loads_peftlab_adapter(tmp_path, kind, mts):
    base, model = _adapted(kind, modules_to_save=mts)
    x = ids()
    save_adapter(model, tmp_path / "a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(clone(base), tmp_path / "a").eval()
    # peft advises "pip install -U peft" when adapter_config.json has keys it does not know
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)], [str(w.message) for w in caught]
    assert (out(pm, x) - out(model, x)).abs().max() <= 1e-5
    assert (out(model, x) - out(base, x)).abs().max() > 1e-4


@pytest.mark.parametrize("kind, mts", [("bert", ["classifier"]), ("gpt2", None), ("llama", None)])
def test_peftlab_loads_peft_adapter(tmp_path, kind, mts, monkeypatch):
    base, x = tiny(kind), ids()
    task = "SEQ_CLS" if mts else "CAUSAL_LM"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(clone(base), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=list(targets(kind)), modules_to_save=list(mts) if mts else None,
            task_type=task)).eval()
    randomize_lora_b(pm)
    pm.save_pretrained(tmp_path / "p")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must never be used"))
    ours = load_adapter(clone(base), tmp_path / "p")
    assert (out(ours, x) - out(pm, x)).abs().max() <= 1e-5
    assert (out(ours, x) - out(base, x)).abs().max() > 1e-4


def test_overwrite_is_atomic(tmp_path, monkeypatch):
    _, model = _adapted()
    target = save_adapter(model, tmp_path / "a")
    old_bytes = (target / "adapter_model.safetensors").read_bytes()
    randomize_lora_b(model, seed=9)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pio, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, target)
    assert (target / "adapter_model.safetensors").read_bytes() == old_bytes  # old adapter intact
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    monkeypatch.setattr(pio, "save_file", save_file)
    save_adapter(model, target)
    assert (target / "adapter_model.safetensors").read_bytes() != old_bytes
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def _corrupt_json(d):
    (d / "adapter_config.json").write_text("{not json")


def _corrupt_weights(d):
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:40])


def _pickle_only(d):
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")


def _no_config(d):
    (d / "adapter_config.json").unlink()


@pytest.mark.parametrize(
    "damage, exc, words",
    [
        (_corrupt_json, ValueError, ["not valid JSON", "corrupt"]),
        (_corrupt_weights, ValueError, ["cannot be read", "corrupt"]),
        (_pickle_only, ValueError, ["adapter_model.bin", "pickle", "safetensors"]),
        (_no_config, FileNotFoundError, ["adapter_config.json", "missing"]),
    ],
)
def test_broken_directory_clear_error_model_unchanged(tmp_path, damage, exc, words):
    base, model = _adapted()
    d = save_adapter(model, tmp_path / "a")
    damage(d)
    target = clone(base)
    before = snapshot(target)
    with pytest.raises(exc) as info:
        load_adapter(target, d)
    assert_unchanged(target, before)
    for w in words:
        assert w in str(info.value)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(tiny(), tmp_path / "nothing")


def test_shape_mismatch_names_keys_and_shapes(tmp_path):
    _, model = _adapted()
    save_adapter(model, tmp_path / "a")
    import transformers as T

    torch.manual_seed(0)
    wider = T.BertForSequenceClassification(T.BertConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=97)).eval()
    before = snapshot(wider)
    with pytest.raises(ValueError) as info:
        load_adapter(wider, tmp_path / "a")
    assert_unchanged(wider, before)
    msg = str(info.value)
    assert "shape mismatch" in msg and "attention.self.query.lora_A.weight" in msg
    assert "file (4, 32) vs model (4, 48)" in msg


def test_wrong_base_and_name_clash(tmp_path):
    _, model = _adapted("bert")
    save_adapter(model, tmp_path / "a")
    gpt2 = tiny("gpt2")
    before = snapshot(gpt2)
    with pytest.raises(ValueError, match="wrong base model.*matched no module.*c_attn"):
        load_adapter(gpt2, tmp_path / "a")
    assert_unchanged(gpt2, before)
    before = snapshot(model)
    with pytest.raises(ValueError, match="already injected"):
        load_adapter(model, tmp_path / "a")
    assert_unchanged(model, before)
    # tampered file: an extra key and a missing one
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    key = next(iter(tensors))
    tensors["base_model.model.bert.pooler.dense.lora_A.weight"] = tensors.pop(key)
    save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
    fresh = tiny("bert")
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="missing keys.*unexpected keys.*pooler"):
        load_adapter(fresh, tmp_path / "a")
    assert_unchanged(fresh, before)
