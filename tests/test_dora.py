"""DoRA (Liu et al. 2024, arXiv:2402.09353) on tiny random models: identity at init, equality with
HF peft (forward, gradients, merge, files both ways), exact unmerge, counts, refusals."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from lora_helpers import assert_unchanged, clone, ids, out, snapshot, targets, tiny
from safetensors.torch import load_file
from torch import nn

from peftlab.config import LoRAConfig
from peftlab.inject import count_parameters, explain, inject, merge, unload, unmerge
from peftlab.io import adapter_state_dict, load_adapter, save_adapter
from peftlab.lora import LoRALinear
from peftlab.quant import Linear4bit, dequantize_model, quantize_model

KINDS = ["bert", "gpt2", "llama"]  # with bias, GPT-2 Conv1D (fan_in_fan_out), without bias


def _perturb(model, seed=3):
    """Non-zero B and a magnitude moved away from ||W||_c, so DoRA really changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))


def _peft_dora(base, kind, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out notice for GPT-2's Conv1D
        pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets(kind)),
                                                       use_dora=True, **kw))
    _perturb(pm)
    return pm.eval()


def _ours(base, kind, **kw):
    return inject(clone(base), LoRAConfig(r=4, alpha=8, target_modules=targets(kind), use_dora=True, **kw))


def _copy_from_peft(pm, model):
    theirs = peft.get_peft_model_state_dict(pm)
    ours = adapter_state_dict(model)
    assert set(theirs) == set(ours)  # same file keys, magnitude included
    with torch.no_grad():
        for k, v in theirs.items():
            ours[k].copy_(v)
    return theirs


def _layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def test_config_checks_use_dora():
    with pytest.raises(ValueError, match="LoRAConfig.use_dora must be a bool"):
        LoRAConfig(use_dora="yes")
    c = LoRAConfig(use_dora=True, use_rslora=True)  # allowed together, as in peft
    assert LoRAConfig.from_dict(c.to_dict()) == c
    assert LoRAConfig.from_dict({k: v for k, v in LoRAConfig().to_dict().items() if k != "use_dora"}).use_dora is False


@pytest.mark.parametrize("kind", KINDS)
def test_identity_at_init(kind):
    base, x = tiny(kind), ids()
    model = _ours(base, kind)
    for m in _layers(model):
        w = m._rows(m.base_layer.weight)  # (out, in)
        torch.testing.assert_close(m.lora_magnitude_vector["default"].weight, torch.linalg.vector_norm(w, dim=1),
                                   rtol=1e-6, atol=0)
    assert torch.equal(out(model, x), out(base, x))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rslora", [False, True])
def test_same_outputs_counts_and_merge_as_peft(kind, rslora):
    base, x = tiny(kind), ids()
    ref = out(base, x)
    pm = _peft_dora(clone(base), kind, use_rslora=rslora)
    model = _ours(base, kind, use_rslora=rslora)
    theirs = _copy_from_peft(pm, model)
    mags = [k for k in theirs if "magnitude" in k]
    assert mags and all(k.endswith(".lora_magnitude_vector") for k in mags)  # peft's file key: no ".weight"
    expected = out(pm, x)
    assert (expected - ref).abs().max() > 1e-4
    assert (out(model, x) - expected).abs().max() <= 1e-5
    assert count_parameters(model).trainable == pm.get_nb_trainable_parameters()[0]
    assert (out(unload(model), x) - out(pm.merge_and_unload(), x)).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_gradients_match_peft(kind):
    base, x = tiny(kind), ids(batch=3)
    pm = _peft_dora(clone(base), kind)
    model = _ours(base, kind)
    _copy_from_peft(pm, model)
    for m in (pm, model):
        m(input_ids=x, labels=x).loss.backward()
    g_theirs = {n.removeprefix("base_model.model."): p.grad for n, p in pm.named_parameters() if p.requires_grad}
    g_ours = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert g_theirs.keys() == g_ours.keys()  # same in-memory names: lora_magnitude_vector.default.weight
    assert any("magnitude" in k for k in g_ours)
    for k in g_ours:
        assert torch.allclose(g_ours[k], g_theirs[k], atol=1e-6, rtol=1e-4), k


def test_dropout_in_training_matches_peft():
    base, x = tiny("llama"), ids()
    pm = _peft_dora(clone(base), "llama", lora_dropout=0.3)
    model = _ours(base, "llama", dropout=0.3)
    _copy_from_peft(pm, model)
    pm.train()
    model.train()
    torch.manual_seed(7)
    theirs = pm(input_ids=x).logits
    torch.manual_seed(7)
    ours = model(input_ids=x).logits
    assert (ours - theirs).abs().max() <= 1e-5
    model.eval()
    with torch.no_grad():
        assert not torch.equal(model(input_ids=x).logits, ours)  # dropout really acted


@pytest.mark.parametrize("kind", KINDS)
def test_merge_unmerge_exact(kind):
    base, x = tiny(kind), ids()
    model = _ours(base, kind)
    _perturb(model)
    adapted = out(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge(model)
    for m in _layers(model):
        w = m._rows(m.base_layer.weight)  # W', (out, in)
        assert torch.allclose(torch.linalg.vector_norm(w, dim=1), m.lora_magnitude_vector["default"].weight,
                              rtol=1e-5, atol=1e-6)  # each row of W' has length m
    assert (out(model, x) - adapted).abs().max() <= 1e-5
    unmerge(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-exact: the copy is restored
    assert torch.equal(out(model, x), adapted)


def test_half_precision_base_merge_roundtrip():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8).to(torch.bfloat16))
    layer.add_adapter("d", r=2, alpha=4, use_dora=True)
    layer.activate("d")
    assert layer.lora_magnitude_vector["d"].weight.dtype == torch.float32  # fp32 adapter on a bf16 base
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x))
        layer.lora_B["d"].weight.normal_()
        w0 = layer.base_layer.weight.clone()
        y = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), y, atol=5e-2, rtol=2e-2)
        layer.unmerge()
        assert torch.equal(layer.base_layer.weight, w0)


@pytest.mark.parametrize("kind, mts", [("bert", ("classifier",)), ("llama", ()), ("gpt2", ())])
def test_peft_loads_peftlab_dora(tmp_path, kind, mts):
    base, x = tiny(kind), ids()
    model = _ours(base, kind, modules_to_save=mts)
    _perturb(model)
    save_adapter(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["use_dora"] is True
    keys = load_file(tmp_path / "a" / "adapter_model.safetensors")
    pm = _peft_dora(clone(base), kind, modules_to_save=list(mts) or None)
    pm.save_pretrained(tmp_path / "p")
    assert set(keys) == set(load_file(tmp_path / "p" / "adapter_model.safetensors"))  # peft writes the same keys
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(clone(base), tmp_path / "a").eval()
    assert not [w for w in caught if "Unexpected keyword" in str(w.message) or "missing" in str(w.message).lower()]
    assert (out(loaded, x) - out(model, x)).abs().max() <= 1e-5
    assert (out(model, x) - out(base, x)).abs().max() > 1e-4
    fresh = load_adapter(clone(base), tmp_path / "a")  # and our own round trip is exact
    assert fresh.peftlab_configs["default"].use_dora
    assert torch.equal(out(fresh, x), out(model, x))


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_peftlab_loads_peft_dora(tmp_path, kind):
    base, x = tiny(kind), ids()
    pm = _peft_dora(clone(base), kind)
    pm.save_pretrained(tmp_path / "p")
    model = load_adapter(clone(base), tmp_path / "p")
    assert model.peftlab_configs["default"].use_dora
    expected = out(pm, x)
    assert (expected - out(base, x)).abs().max() > 1e-4
    assert (out(model, x) - expected).abs().max() <= 1e-5


def test_peft_file_without_magnitudes_is_refused(tmp_path):
    base = tiny("bert")
    pm = _peft_dora(clone(base), "bert")
    pm.save_pretrained(tmp_path / "p")
    meta_path = tmp_path / "p" / "adapter_config.json"
    meta = json.loads(meta_path.read_text())
    meta["use_dora"] = False  # the file holds magnitudes a plain LoRA has no place for
    meta_path.write_text(json.dumps(meta))
    target = clone(base)
    before = snapshot(target)
    with pytest.raises(ValueError, match="unexpected keys.*lora_magnitude_vector"):
        load_adapter(target, tmp_path / "p")
    assert_unchanged(target, before)


def test_parameter_count_formula():
    base = tiny("llama")
    model = _ours(base, "llama")
    layers = _layers(model)
    expected = sum(4 * (m.in_features + m.out_features) + m.out_features for m in layers)
    count = count_parameters(model)
    assert count.by_kind["lora"] == count.trainable == expected
    report = explain(base, LoRAConfig(r=4, alpha=8, target_modules=targets("llama"), use_dora=True))
    assert sum(r.added for r in report.rows if r.kind == "lora") == expected


def test_adamw_steps_change_magnitude_and_b():
    base, x = tiny("llama"), ids(batch=4)
    model = _ours(base, "llama").train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in changed) and any("lora_B" in n for n in changed)
    assert losses[-1] < losses[0]


def test_4bit_base_trains_but_merge_is_refused():
    base = quantize_model(tiny("llama"))
    x = ids()
    model = _ours(base, "llama")
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, Linear4bit)
    assert torch.equal(out(model, x), out(base, x))  # m = ||dequantized W||_c: identity at init
    _perturb(model)
    adapted = out(model, x)
    before = snapshot(model)
    for call in (merge, unload):
        with pytest.raises(RuntimeError, match="4-bit.*dequantize_model"):
            call(model)
        assert_unchanged(model, before)
    fixed = dequantize_model(copy.deepcopy(model))  # the fix the message names
    merge(fixed)
    assert (out(fixed, x) - adapted).abs().max() <= 1e-4


def test_dora_cannot_be_added_while_merged():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 8))
    layer.add_adapter("plain", r=2, alpha=4)
    layer.merge(["plain"])
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.add_adapter("d", r=2, alpha=4, use_dora=True)
    assert layer.adapter_names == ["plain"] and not layer.lora_magnitude_vector


def test_plain_peft_file_marked_dora_is_refused(tmp_path):
    """use_dora=true over a plain LoRA file (no magnitudes): refused, naming the missing keys."""
    base = tiny("bert")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(clone(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    pm.save_pretrained(tmp_path / "p")
    meta_path = tmp_path / "p" / "adapter_config.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "use_dora": True}))
    target = clone(base)
    before = snapshot(target)
    with pytest.raises(ValueError, match="missing keys.*lora_magnitude_vector"):
        load_adapter(target, tmp_path / "p")
    assert_unchanged(target, before)
