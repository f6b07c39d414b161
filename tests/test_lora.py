"""LoRA layer, config and injection: numbers checked against independent references."""

from __future__ import annotations

import json
import math

import pytest
import torch
from lora_helpers import assert_unchanged, ids, out, randomize_lora_b, snapshot, tiny
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.config import AdapterConfigBase, LoRAConfig
from peftlab.inject import count_parameters, delete, disabled, explain, inject, merge, set_active, unload, unmerge
from peftlab.lora import LoRALinear
from peftlab.wrappers import ModulesToSaveWrapper


# -- config ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"r": 0}, ["LoRAConfig.r", "got 0", "pick a rank"]),
        ({"r": -2}, ["LoRAConfig.r", "-2"]),
        ({"r": 2.5}, ["LoRAConfig.r", "2.5"]),
        ({"r": True}, ["LoRAConfig.r", "True"]),
        ({"alpha": 0}, ["LoRAConfig.alpha", "got 0"]),
        ({"alpha": -1.0}, ["LoRAConfig.alpha", "-1.0"]),
        ({"dropout": 1.0}, ["LoRAConfig.dropout", "1.0", "[0, 1)"]),
        ({"dropout": -0.1}, ["LoRAConfig.dropout", "-0.1"]),
        ({"bias": "some"}, ["LoRAConfig.bias", "'some'", "lora_only"]),
        ({"init": "xavier"}, ["LoRAConfig.init", "'xavier'", "kaiming"]),
        ({"target_modules": ()}, ["LoRAConfig.target_modules", "non-empty"]),
        ({"target_modules": "(unclosed"}, ["LoRAConfig.target_modules", "regular expression"]),
        ({"target_modules": ("query", 3)}, ["LoRAConfig.target_modules"]),
        ({"modules_to_save": "classifier"}, ["LoRAConfig.modules_to_save", '["classifier"]']),
        ({"use_rslora": "yes"}, ["LoRAConfig.use_rslora"]),
    ],
)
def test_config_rejects_bad_values(kwargs, words):
    with pytest.raises(ValueError) as info:
        LoRAConfig(**kwargs)
    for w in words:
        assert w in str(info.value)


def test_config_roundtrip_and_defaults():
    c = LoRAConfig()
    assert (c.r, c.alpha, c.dropout, c.bias, c.init) == (8, 16, 0.0, "none", "kaiming")
    assert c.target_modules == ("query", "value") and c.modules_to_save == ()
    assert c.scaling == 2.0 and LoRAConfig(r=16, alpha=8, use_rslora=True).scaling == 2.0
    c2 = LoRAConfig(r=4, alpha=8, target_modules=["q", "v", "q"], modules_to_save=["classifier"], use_rslora=True)
    assert c2.target_modules == ("q", "v")  # lists normalised, duplicates dropped
    d = json.loads(json.dumps(c2.to_dict()))
    assert d["method"] == "lora"
    assert AdapterConfigBase.from_dict(d) == c2 == LoRAConfig.from_dict(d)
    with pytest.raises(ValueError, match="unknown field"):
        LoRAConfig.from_dict({**d, "rank": 3})
    with pytest.raises(ValueError, match="unknown adapter method"):
        AdapterConfigBase.from_dict({"method": "nope"})


# -- the layer ---------------------------------------------------------------------------
def test_linear_matches_hand_computation_float64():
    torch.manual_seed(0)
    base = nn.Linear(6, 5).double()
    layer = LoRALinear(base)
    layer.add_adapter("default", r=3, alpha=7, dropout=0.0)
    layer.active = {"default"}
    a = torch.randn(3, 6, dtype=torch.float64)
    b = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    x = torch.randn(4, 2, 6, dtype=torch.float64)
    w, bias = base.weight.detach(), base.bias.detach()
    expected = x @ w.T + bias + (7 / 3) * (x @ a.T @ b.T)  # y = xW^T + b + (alpha/r) x A^T B^T
    assert torch.allclose(layer(x), expected, atol=1e-12, rtol=0)
    # rsLoRA: alpha / sqrt(r)
    layer.add_adapter("rs", r=3, alpha=7, use_rslora=True)
    assert layer.scaling["rs"] == pytest.approx(7 / math.sqrt(3))


def test_conv1d_matches_hand_computation_float64():
    torch.manual_seed(0)
    base = Conv1D(nf=9, nx=4).double()  # weight (in=4, out=9), y = x W + b
    nn.init.normal_(base.weight)
    layer = LoRALinear(base)
    assert (layer.in_features, layer.out_features, layer.fan_in_fan_out) == (4, 9, True)
    layer.add_adapter("default", r=2, alpha=4)
    layer.active = {"default"}
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    assert a.shape == (2, 4) and b.shape == (9, 2)
    x = torch.randn(3, 4, dtype=torch.float64)
    expected = x @ base.weight.detach() + base.bias.detach() + 2.0 * (x @ a.T @ b.T)
    assert torch.allclose(layer(x), expected, atol=1e-12, rtol=0)
    w0 = base.weight.detach().clone()
    layer.merge()
    assert torch.allclose(base.weight.detach() - w0, 2.0 * (b @ a).T, atol=1e-12)  # stored as (in, out)
    assert torch.allclose(layer(x), expected, atol=1e-12, rtol=0)


def test_kaiming_init_bounds_and_zero_b():
    layer = LoRALinear(nn.Linear(300, 20))
    layer.add_adapter("default", r=8, alpha=16)
    a = layer.lora_A["default"].weight
    assert a.abs().max() <= 1 / math.sqrt(300) + 1e-7  # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
    assert a.abs().max() > 0.5 / math.sqrt(300)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    layer.add_adapter("g", r=8, alpha=16, init="gaussian")
    assert layer.lora_A["g"].weight.std().item() == pytest.approx(1 / 8, rel=0.1)


def test_unsupported_layer_type():
    with pytest.raises(TypeError, match="Embedding.*Linear, Conv1D"):
        LoRALinear(nn.Embedding(3, 4))


# -- injection ---------------------------------------------------------------------------
def test_outputs_exactly_equal_base_at_init():
    model, x = tiny("bert"), ids()
    ref = out(model, x)
    original_query = model.bert.encoder.layer[0].attention.self.query
    inject(model, LoRAConfig(r=4, alpha=8, modules_to_save=("classifier",)))
    assert torch.equal(out(model, x), ref)
    wrapped = model.get_submodule("bert.encoder.layer.0.attention.self.query")
    assert isinstance(wrapped, LoRALinear) and wrapped.base_layer is original_query  # replaced through the parent
    assert not any("." in k for k in vars(model))  # no stray dotted attribute on the root
    assert isinstance(model.classifier, ModulesToSaveWrapper)
    assert all("lora_" in n or "modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad)


def test_parameter_count_is_r_times_in_plus_out():
    model = tiny("bert")
    total_before = sum(p.numel() for p in model.parameters())
    r = 4
    report = explain(model, LoRAConfig(r=r, modules_to_save=("classifier",)))
    inject(model, LoRAConfig(r=r, modules_to_save=("classifier",)))
    expected_lora = 2 * 2 * r * (32 + 32)  # 2 layers x (query, value) x r(in+out)
    head = 32 * 2 + 2
    count = count_parameters(model)
    assert count.by_kind["lora"] == expected_lora and count.by_kind["modules_to_save"] == head
    assert count.trainable == expected_lora + head
    assert count.total == total_before + expected_lora + head
    assert count.by_kind["base_frozen"] == total_before
    assert count.percent == pytest.approx(100 * (expected_lora + head) / count.total)
    assert report.total_added == expected_lora + head and report.base_parameters == total_before
    assert "bert.encoder.layer.1.attention.self.value" in str(report) and "<table>" in report._repr_html_()


def test_merged_equals_unmerged_and_drift():
    model, x = tiny("bert"), ids()
    inject(model, LoRAConfig(r=4, alpha=8))
    randomize_lora_b(model)
    unmerged = out(model, x)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    merge(model)
    assert (out(model, x) - unmerged).abs().max() <= 1e-6
    with pytest.raises(RuntimeError, match="already merged"):
        merge(model)
    unmerge(model)
    with pytest.raises(RuntimeError, match="nothing to unmerge"):
        unmerge(model)
    for _ in range(100):
        merge(model)
        unmerge(model)
    drift = max((p.detach() - w0[n]).abs().max().item() for n, p in model.named_parameters() if n in w0)
    assert drift <= 1e-5
    assert (out(model, x) - unmerged).abs().max() <= 1e-5
    model.train(), model.eval()  # train()/eval() never merge
    assert all(not m.merged for m in model.modules() if isinstance(m, LoRALinear))


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_optimizer_step_changes_only_adapter(bias):
    model, x = tiny("bert"), ids(batch=4)
    inject(model, LoRAConfig(r=4, modules_to_save=("classifier",), bias=bias))
    randomize_lora_b(model, scale=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = nn.functional.cross_entropy(model(input_ids=x).logits, torch.tensor([0, 1, 1, 0]))
    loss.backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}

    def allowed(k: str) -> bool:
        if "lora_" in k or ".modules_to_save." in k:
            return True
        if bias == "lora_only":
            return k.endswith("base_layer.bias")
        if bias == "all":
            return k.endswith("bias") and ".original_module." not in k
        return False

    assert changed and all(allowed(k) for k in changed), sorted(k for k in changed if not allowed(k))
    assert all(k in changed for k in before if "lora_A" in k or "lora_B" in k)  # all adapter matrices learn
    assert any(k.endswith("base_layer.bias") for k in changed) == (bias != "none")


def test_all_linear_and_regex_selection():
    bert = tiny("bert")
    inject(bert, LoRAConfig(r=2, target_modules="all-linear"))
    adapted = {n for n, m in bert.named_modules() if isinstance(m, LoRALinear)}
    assert len(adapted) == 2 * 6 + 1 and "bert.pooler.dense" in adapted and "classifier" not in adapted
    for kind, head in [("gpt2", "lm_head"), ("llama", "lm_head"), ("roberta", "classifier.out_proj")]:
        m = tiny(kind)
        inject(m, LoRAConfig(r=2, target_modules="all-linear"))
        names = {n for n, mod in m.named_modules() if isinstance(mod, LoRALinear)}
        assert head not in names and len(names) > 4
    rx = tiny("bert")
    inject(rx, LoRAConfig(r=2, target_modules=r".*layer\.1\.attention\.self\.(query|key)"))
    assert {n for n, m in rx.named_modules() if isinstance(m, LoRALinear)} == {
        "bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.key"}


@pytest.mark.parametrize(
    "config, words",
    [
        (LoRAConfig(target_modules=("nope",)), ["('nope',)", "matched no module", "query (x2)", "dense (x"]),
        (LoRAConfig(target_modules=("attention",)), ["BertAttention", "Linear, Conv1D"]),
        (LoRAConfig(target_modules=("query",), modules_to_save=("head",)), ["modules_to_save", "'head'"]),
        (LoRAConfig(target_modules=("query",), modules_to_save=("query",)), ["query"]),
    ],
)
def test_bad_injection_leaves_model_unchanged(config, words):
    model = tiny("bert")
    inject(model, LoRAConfig(r=2, target_modules=("value",)), name="first")
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        inject(model, config, name="second")
    assert_unchanged(model, before)
    for w in words:
        assert w in str(info.value)


def test_same_name_twice_and_injecting_while_merged():
    model = tiny("bert")
    inject(model, LoRAConfig(r=2))
    before = snapshot(model)
    with pytest.raises(ValueError, match="'default' is already injected"):
        inject(model, LoRAConfig(r=4))
    assert_unchanged(model, before)
    merge(model)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        inject(model, LoRAConfig(r=2), name="other")
    assert_unchanged(model, before)


def test_named_adapters_set_active_disabled_delete():
    model, x = tiny("bert"), ids()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    base_types = [type(m) for m in model.modules()]
    ref = out(model, x)
    inject(model, LoRAConfig(r=2), name="a")
    randomize_lora_b(model, seed=5)
    out_a = out(model, x)
    inject(model, LoRAConfig(r=3, target_modules=("query", "key"), modules_to_save=("classifier",)), name="b")
    randomize_lora_b(model, seed=6, name="b")
    set_active(model, "a")
    assert torch.equal(out(model, x), out_a)
    assert {n.split(".lora_")[1][2:] for n, p in model.named_parameters() if p.requires_grad} == {"a.weight"}
    set_active(model, "b")
    out_b = out(model, x)
    assert (out_b - out_a).abs().max() > 1e-3
    with disabled(model):
        assert torch.equal(out(model, x), ref)
    assert torch.equal(out(model, x), out_b)
    set_active(model, None)
    assert torch.equal(out(model, x), ref)
    with pytest.raises(ValueError, match="no adapter named 'zzz'"):
        set_active(model, "zzz")
    set_active(model, "a")
    delete(model, "b")
    assert torch.equal(out(model, x), out_a) and list(model.peftlab_configs) == ["a"]
    delete(model, "a")
    assert [type(m) for m in model.modules()] == base_types
    assert all(torch.equal(v, base_sd[k]) for k, v in model.state_dict().items())


def test_unload_gives_plain_model():
    model, x = tiny("bert"), ids()
    inject(model, LoRAConfig(r=4, modules_to_save=("classifier",)))
    randomize_lora_b(model)
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.add_(1.0)
    adapted = out(model, x)
    keys = set(tiny("bert").state_dict())
    plain = unload(model)
    assert not any(isinstance(m, (LoRALinear, ModulesToSaveWrapper)) for m in plain.modules())
    assert set(plain.state_dict()) == keys and not hasattr(plain, "peftlab_configs")
    assert (out(plain, x) - adapted).abs().max() <= 1e-6


def test_dropout_only_on_lora_branch():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 8))
    layer.add_adapter("default", r=2, alpha=2, dropout=0.5)
    layer.active = {"default"}
    x = torch.randn(64, 8)
    layer.train()
    assert torch.equal(layer(x), layer.base_layer(x))  # B = 0: dropout cannot leak into the base path
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    torch.manual_seed(1)
    y1 = layer(x)
    torch.manual_seed(1)
    mask_in = nn.functional.dropout(x, 0.5, training=True)
    expected = layer.base_layer(x) + layer.lora_B["default"](layer.lora_A["default"](mask_in))
    assert torch.allclose(y1, expected, atol=1e-6)
    layer.eval()
    assert torch.allclose(layer(x), layer.base_layer(x) + layer.lora_B["default"](layer.lora_A["default"](x)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inject_merge_roundtrip():
    model, x = tiny("llama").cuda(), ids().cuda()
    ref = out(model, x)
    inject(model, LoRAConfig(r=4, target_modules=("q_proj", "v_proj")))
    assert torch.equal(out(model, x), ref)
    assert all(p.is_cuda for p in model.parameters())
    randomize_lora_b(model, scale=0.1)
    unmerged = out(model, x)
    merge(model)
    assert (out(model, x) - unmerged).abs().max() <= 1e-4  # TF32 matmuls on GPU
